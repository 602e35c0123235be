# Vault ACL policy for the keybroker daemon (AppRole "keybroker-broker").
# Least privilege: exactly the transit and KV v2 calls the broker makes, and its own
# token. No PKI (the broker mints no identities: certificates come from the operator),
# no sys/, no other mounts, no root paths.

# Transit keys the broker brokers: create, read and delete one key ("+" is one path
# segment, so a name can never reach keys/<name>/trim, /import or deeper).
path "kb-transit/keys/+" {
  capabilities = ["create", "read", "update", "delete"]
}
# Rotate, and config (min_decryption_version; deletion_allowed just before a destroy).
path "kb-transit/keys/+/rotate" {
  capabilities = ["update"]
}
path "kb-transit/keys/+/config" {
  capabilities = ["update"]
}
# Cryptographic operations on those keys.
path "kb-transit/encrypt/+" {
  capabilities = ["update"]
}
path "kb-transit/decrypt/+" {
  capabilities = ["update"]
}
path "kb-transit/rewrap/+" {
  capabilities = ["update"]
}
path "kb-transit/datakey/plaintext/+" {
  capabilities = ["update"]
}
path "kb-transit/sign/+" {
  capabilities = ["update"]
}
path "kb-transit/verify/+" {
  capabilities = ["update"]
}

# The broker's durable state (key registry, policies, bindings, grants, audit anchors), KV v2.
# Written with check-and-set, never soft-deleted, destroyed or undeleted: a stolen broker
# identity cannot erase an audit anchor's or the policy document's version history.
path "kb-kv/data/*" {
  capabilities = ["create", "read", "update"]
}
path "kb-kv/metadata/*" {
  capabilities = ["read", "list"]
}
# The two erasures the broker makes: a registry entry whose key creation failed, and an
# Idempotency-Key record past its expiry (its name a SHA-256, one segment: nothing deeper).
path "kb-kv/metadata/keys/+" {
  capabilities = ["read", "list", "delete"]
}
path "kb-kv/metadata/idempotency/+" {
  capabilities = ["read", "list", "delete"]
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
