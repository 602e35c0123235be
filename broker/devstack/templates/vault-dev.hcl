# OpenBao/Vault server for `keybroker dev` and the integration tests.
# Rendered by broker/devstack/stack.py: each dollar placeholder is filled in per run.
# Production differs in three ways (see vault/production.hcl): a TLS listener,
# the awskms seal without `endpoint` (real AWS), and a 3- or 5-node raft cluster
# (`keybroker dev --ha` renders three of these, each with retry_join stanzas naming the others).

ui            = false
disable_mlock = true
api_addr      = "http://127.0.0.1:$api_port"
cluster_addr  = "https://127.0.0.1:$cluster_port"
log_level     = "info"
# Standbys forward reads to the active node too. By default an OpenBao standby answers reads from
# its own copy of the raft log, which may lag: a grant revoked, a key suspended or a policy
# changed through one node could still read as before through another (no read-after-write).
disable_standby_reads = true

storage "raft" {
  path    = "$raft_dir"
  node_id = "$node_id"
  # A single local node: raft's default timing (multiplier 5) waits ~10 s for the
  # first election on a fresh node; 1 is the tight timing raft recommends for
  # dedicated hardware, and a loopback node qualifies.
  performance_multiplier = 1
$retry_join}

# Loopback only. The dev stack has no CA until Vault's PKI exists, as with `vault server -dev`.
listener "tcp" {
  address         = "127.0.0.1:$api_port"
  cluster_address = "127.0.0.1:$cluster_port"
  tls_disable     = true
}

# Auto-unseal through KMS: the local KMS stand-in here, real AWS KMS in production.
# Credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
seal "awskms" {
  region     = "$kms_region"
  kms_key_id = "$kms_key_id"
  endpoint   = "$kms_endpoint"
}

# OpenBao refuses to enable audit devices over the API, so it is declared here.
# The broker's X-Request-Id header is audited (set by `keybroker vault bootstrap`).
audit "file" "keybroker" {
  options {
    file_path = "$audit_log"
    mode      = "0600"
  }
}
