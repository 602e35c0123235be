# OpenBao/Vault server for production: one node of a 3- or 5-node raft cluster,
# auto-unsealed by AWS KMS, TLS on the listener, file audit device.
# Replace the values in <angle brackets>. Credentials for KMS come from the
# instance role (no access keys here).

ui            = false
api_addr      = "https://<this-node>.vault.internal:8200"
cluster_addr  = "https://<this-node>.vault.internal:8201"
# Required by keybroker: standbys forward reads to the active node. By default an OpenBao
# standby answers reads from its own, possibly lagging copy of the raft log, so a grant revoked
# or a key suspended through one node could still read as before through another.
disable_standby_reads = true

storage "raft" {
  path    = "/var/lib/vault/raft"
  node_id = "<this-node>"

  retry_join {
    leader_api_addr         = "https://vault-1.vault.internal:8200"
    leader_ca_cert_file     = "/etc/vault/tls/ca.pem"
  }
  retry_join {
    leader_api_addr         = "https://vault-2.vault.internal:8200"
    leader_ca_cert_file     = "/etc/vault/tls/ca.pem"
  }
  retry_join {
    leader_api_addr         = "https://vault-3.vault.internal:8200"
    leader_ca_cert_file     = "/etc/vault/tls/ca.pem"
  }
}

listener "tcp" {
  address            = "0.0.0.0:8200"
  cluster_address    = "0.0.0.0:8201"
  tls_cert_file      = "/etc/vault/tls/vault.crt"
  tls_key_file       = "/etc/vault/tls/vault.key"
  tls_min_version    = "tls12"
}

# Real AWS KMS: no endpoint. Region and key id of the dedicated unseal key.
seal "awskms" {
  region     = "<aws-region>"
  kms_key_id = "<arn:aws:kms:...:key/...>"
}

# Every request is audited; the broker's X-Request-Id header is added to the
# audited headers by `keybroker vault bootstrap`. Ship this file to the SIEM.
audit "file" "keybroker" {
  options {
    file_path = "/var/log/vault/audit.log"
    mode      = "0600"
  }
}
