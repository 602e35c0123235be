# Vault ACL policy for the keybroker daemon (AppRole "keybroker-broker").
# Least privilege: the broker's transit mount, its KV v2 state, issuing from
# its PKI roles, and its own token. No sys/, no other mounts, no root paths.

# Transit keys the broker brokers: create, configure, rotate, read, destroy.
path "kb-transit/keys" {
  capabilities = ["list"]
}
path "kb-transit/keys/*" {
  capabilities = ["create", "read", "update", "delete"]
}
# Cryptographic operations on those keys.
path "kb-transit/encrypt/*" {
  capabilities = ["update"]
}
path "kb-transit/decrypt/*" {
  capabilities = ["update"]
}
path "kb-transit/rewrap/*" {
  capabilities = ["update"]
}
path "kb-transit/datakey/*" {
  capabilities = ["update"]
}
path "kb-transit/sign/*" {
  capabilities = ["update"]
}
path "kb-transit/verify/*" {
  capabilities = ["update"]
}
path "kb-transit/hmac/*" {
  capabilities = ["update"]
}

# The broker's durable state (key registry, policies, bindings, grants), KV v2.
path "kb-kv/data/*" {
  capabilities = ["create", "read", "update", "delete"]
}
path "kb-kv/metadata/*" {
  capabilities = ["read", "list", "delete"]
}

# Certificates for brokers and their clients, only through the two roles.
path "kb-pki/issue/broker-server" {
  capabilities = ["update"]
}
path "kb-pki/issue/broker-client" {
  capabilities = ["update"]
}

# Its own token: look up, renew, revoke (the policy is attached without "default").
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
