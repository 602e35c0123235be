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
# Least privilege: the broker's transit mount, its KV v2 state, issuing from
# its PKI roles, and its own token. No sys/, no other mounts, no root paths.

# Transit keys the broker brokers: create, configure, rotate, read, destroy.
path "{m.transit}/keys" {{
  capabilities = ["list"]
}}
path "{m.transit}/keys/*" {{
  capabilities = ["create", "read", "update", "delete"]
}}
# Cryptographic operations on those keys.
path "{m.transit}/encrypt/*" {{
  capabilities = ["update"]
}}
path "{m.transit}/decrypt/*" {{
  capabilities = ["update"]
}}
path "{m.transit}/rewrap/*" {{
  capabilities = ["update"]
}}
path "{m.transit}/datakey/*" {{
  capabilities = ["update"]
}}
path "{m.transit}/sign/*" {{
  capabilities = ["update"]
}}
path "{m.transit}/verify/*" {{
  capabilities = ["update"]
}}
path "{m.transit}/hmac/*" {{
  capabilities = ["update"]
}}

# The broker's durable state (key registry, policies, bindings, grants), KV v2.
path "{m.kv}/data/*" {{
  capabilities = ["create", "read", "update", "delete"]
}}
path "{m.kv}/metadata/*" {{
  capabilities = ["read", "list", "delete"]
}}

# Certificates for brokers and their clients, only through the two roles.
path "{m.pki}/issue/{SERVER_ROLE}" {{
  capabilities = ["update"]
}}
path "{m.pki}/issue/{CLIENT_ROLE}" {{
  capabilities = ["update"]
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
