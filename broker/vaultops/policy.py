"""The Vault ACL policy the broker runs under: its own mounts and nothing else.

``vault/policies/keybroker-broker.hcl`` is this function's output for the default
mount names, kept in the repository for admins to review; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mounts:
    transit: str = "kb-transit"
    kv: str = "kb-kv"
    pki_root: str = "kb-pki-root"
    pki: str = "kb-pki"
    approle: str = "approle"


POLICY_NAME = "keybroker-broker"
SERVER_ROLE = "broker-server"
CLIENT_ROLE = "broker-client"


def render_broker_policy(m: Mounts) -> str:
    return f"""\
# Vault ACL policy for the keybroker daemon (AppRole "{POLICY_NAME}").
# Least privilege: exactly the transit and KV v2 calls the broker makes, and its own
# token. No PKI (the broker mints no identities: certificates come from the operator),
# no sys/, no other mounts, no root paths.

# Transit keys the broker brokers: create, read and delete one key ("+" is one path
# segment, so a name can never reach keys/<name>/trim, /import or deeper).
path "{m.transit}/keys/+" {{
  capabilities = ["create", "read", "update", "delete"]
}}
# Rotate, and config (min_decryption_version; deletion_allowed just before a destroy).
path "{m.transit}/keys/+/rotate" {{
  capabilities = ["update"]
}}
path "{m.transit}/keys/+/config" {{
  capabilities = ["update"]
}}
# Cryptographic operations on those keys.
path "{m.transit}/encrypt/+" {{
  capabilities = ["update"]
}}
path "{m.transit}/decrypt/+" {{
  capabilities = ["update"]
}}
path "{m.transit}/rewrap/+" {{
  capabilities = ["update"]
}}
path "{m.transit}/datakey/plaintext/+" {{
  capabilities = ["update"]
}}
path "{m.transit}/sign/+" {{
  capabilities = ["update"]
}}
path "{m.transit}/verify/+" {{
  capabilities = ["update"]
}}

# The broker's durable state (key registry, policies, bindings, grants, audit anchors), KV v2.
# Written with check-and-set, never soft-deleted, destroyed or undeleted: a stolen broker
# identity cannot erase an audit anchor's or the policy document's version history.
path "{m.kv}/data/*" {{
  capabilities = ["create", "read", "update"]
}}
path "{m.kv}/metadata/*" {{
  capabilities = ["read", "list"]
}}
# The two erasures the broker makes: a registry entry whose key creation failed, and an
# Idempotency-Key record past its expiry (its name a SHA-256, one segment: nothing deeper).
path "{m.kv}/metadata/keys/+" {{
  capabilities = ["read", "list", "delete"]
}}
path "{m.kv}/metadata/idempotency/+" {{
  capabilities = ["read", "list", "delete"]
}}

# Its own token: look up, renew, revoke (the policy is attached without "default").
path "auth/token/lookup-self" {{
  capabilities = ["read"]
}}
path "auth/token/renew-self" {{
  capabilities = ["update"]
}}
path "auth/token/revoke-self" {{
  capabilities = ["update"]
}}
"""
