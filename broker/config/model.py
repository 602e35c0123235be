"""The broker's configuration as frozen dataclasses, loaded once and passed explicitly.

Secrets are never values here: the Vault AppRole credentials and the HSM PIN are
named by the file (or environment variable) that holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# hsm.gcm_iv: who generates the AES-GCM IV (see HsmConfig).
GCM_IV_MODES = ("host", "token")


@dataclass(frozen=True)
class ServerConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path
    host: str = "127.0.0.1"
    port: int = 8443
    # SPIFFE trust domain whose URI SANs name principals; other URI SANs are ignored.
    trust_domain: str = "keybroker.dev"
    # Transport limits: every request and connection a client can open costs memory, so each
    # one is bounded (README "Limits"). A request body larger than this answers 413.
    max_body_bytes: int = 1024 * 1024
    # The request line and each header line: longer answers 400. At most max_headers header
    # lines (more answers 400), so one request's header is at most about max_headers * max_header_bytes.
    max_request_line_bytes: int = 8190
    max_header_bytes: int = 8190
    max_headers: int = 64
    # Open client connections, counted from accept (TLS handshakes in progress included): one
    # more is closed at once, unanswered. With headroom for the broker's own files and backend
    # sockets it must fit the open-file limit (checked at start).
    max_connections: int = 1000
    # TLS handshakes in progress, in all and from one peer address: past either, the oldest
    # handshake (of that peer, or of all) is dropped to make way once it is a second old (else
    # the newcomer is refused), so stalled handshakes cannot hold the listener. The per-peer
    # cap leaves room for a burst from one address (a NAT, a pool of workers behind one host).
    max_handshakes: int = 512
    max_handshakes_per_peer: int = 256
    # A connection with no request in progress (before the first one, or between keep-alive
    # requests) is closed after this long. It also bounds the time to send a complete header.
    idle_timeout_seconds: float = 30.0
    # From a request's first byte to the end of its header: past this, 408 and the connection closes.
    header_timeout_seconds: float = 10.0
    # Reading a request's body: past this, 408 and the connection closes.
    body_timeout_seconds: float = 30.0
    # A TCP connection that has not completed its TLS handshake is closed after this long.
    tls_handshake_timeout_seconds: float = 5.0
    # Client certificate revocation: the CRL of this Vault PKI mount (which issues the client
    # certificates) is read at start and every crl_refresh_seconds; a revoked certificate is
    # refused (401). With no CRL read for crl_max_age_seconds every request is refused (503).
    # Empty turns the check off (only for a client CA that is not a Vault PKI mount; see SECURITY.md).
    crl_pki_mount: str = "kb-pki"
    crl_refresh_seconds: float = 30.0
    crl_max_age_seconds: float = 300.0
    # Break-glass administrators (SPIFFE IDs or "cn:<name>"): always hold every right,
    # whatever the stored policy says, so a bad policy cannot lock every custodian out
    # and a fresh Vault can be given its first bindings. Keep it short; empty is allowed.
    administrators: tuple[str, ...] = ()


@dataclass(frozen=True)
class VaultConfig:
    # The node tried first. With a raft cluster, list every node in ``addresses`` too (this one
    # may be among them): on a sealed or lost node, a standby that cannot reach the leader, or
    # a connection error the broker moves to the next node.
    address: str
    role_id_file: Path
    secret_id_file: Path
    addresses: tuple[str, ...] = ()
    ca_file: Path | None = None
    approle_mount: str = "approle"
    transit_mount: str = "kb-transit"
    kv_mount: str = "kb-kv"
    # One attempt at one node: past this it counts as failed (a frozen node never answers).
    timeout_seconds: float = 5.0
    # One Vault call in all, fail-over attempts included: past this the caller gets 503.
    deadline_seconds: float = 8.0
    # A node that failed is tried again only after this long (unless every node has failed).
    node_retry_seconds: float = 3.0
    # Renew the token once this fraction of its TTL has passed.
    renew_fraction: float = 0.5
    # Concurrent transit encryptions (decryptions) with one key share one batch_input call.
    coalesce: bool = True
    # An http:// address sends the AppRole secret, tokens and every plaintext unencrypted:
    # refused at load unless set (the dev stack on loopback only).
    allow_insecure_http: bool = False

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node's base URL, ``address`` first, each once."""
        seen: dict[str, None] = {}
        for url in (self.address, *self.addresses):
            seen.setdefault(url.rstrip("/"), None)
        return tuple(seen)


@dataclass(frozen=True)
class KmsConfig:
    region: str = "us-east-1"
    # Empty means the real AWS endpoint for the region; set only for a KMS stand-in.
    endpoint: str = ""
    # One attempt (connect, then read): botocore's own timeouts.
    timeout_seconds: float = 5.0
    # Attempts in all, the first included; a call that creates a key is sent once only.
    max_attempts: int = 3
    # One KMS call in all, the SDK's retries included: past this the caller gets 503 with
    # Retry-After (a frozen KMS holds no request longer), like vault.deadline_seconds.
    deadline_seconds: float = 8.0
    # An http:// endpoint carries data keys and plaintexts unencrypted: refused at load
    # unless set (the dev stack's KMS stand-in on loopback only).
    allow_insecure_http: bool = False


@dataclass(frozen=True)
class HsmConfig:
    library: Path
    token_label: str
    # Exactly one of these names where the user PIN is; the PIN itself is never config.
    pin_file: Path | None = None
    pin_env: str = ""
    sessions: int = 2
    timeout_seconds: float = 5.0
    # Who makes the AES-GCM IV: "host" (the broker draws 96 random bits per message and the
    # token must use them) or "token" (the token generates it and writes it back into the
    # CK_GCM_PARAMS IV buffer, as AWS CloudHSM does). Either way it is stored with the ciphertext.
    gcm_iv: str = "host"


@dataclass(frozen=True)
class AuditConfig:
    # This replica's own log directory: one hash chain per writer (a second broker on it is refused).
    directory: Path
    # Secret (0600) holding the key that HMACs context values in records: 64 hex characters.
    hmac_key_file: Path | None = None
    # Names this replica in its records and in the checkpoint anchor kept in Vault.
    node: str = "broker"
    # Start a new file past this size or age (the chain continues across files).
    max_file_bytes: int = 64 * 1024 * 1024
    max_file_seconds: float = 86400.0
    # A checkpoint signed by the HSM every this many records or this many seconds.
    checkpoint_every: int = 1000
    checkpoint_seconds: float = 10.0
    # This many checkpoints in a row that cannot be signed or anchored in Vault make the log
    # unavailable (503) until one succeeds: an unsigned, unanchored tail is not tamper-evident.
    checkpoint_max_failures: int = 3
    # A request waits at most this long for its record to be on disk, then gets 503.
    write_timeout_seconds: float = 10.0
    # Refuse requests (503) before the disk is this close to full, rather than lose records.
    min_free_bytes: int = 16 * 1024 * 1024
    # Vault's file audit device log, when this host can read it: merged into GET /v1/audit/events.
    vault_audit_log: Path | None = None


@dataclass(frozen=True)
class KeysConfig:
    # How often each replica looks for scheduled rotations and ended destruction windows.
    scheduler_interval_seconds: float = 60.0
    # A replica doing scheduled work on a key (a rotation, a destruction) holds a claim on it in
    # Vault for at most this long: if it dies mid-work, another replica takes over after this.
    # Far longer than any backend call may take, or two replicas could both do the work.
    scheduler_claim_seconds: float = 300.0
    # The answer to a management request sent with an Idempotency-Key is replayed to its retries
    # for this long (README "Retries: Idempotency-Key"); after it, the same key starts afresh.
    idempotency_ttl_seconds: float = 86400.0
    # Most items one batch request may carry.
    max_batch_items: int = 100
    # Crypto requests read key metadata through a cache this young at most: one Vault read saved
    # per request. A suspend or revoke through another replica holds here within this time
    # (through this replica: at once). 0 reads Vault on every request.
    cache_seconds: float = 1.0


@dataclass(frozen=True)
class PolicyConfig:
    # How often each replica re-reads the stored policy document (one Vault read).
    refresh_seconds: float = 2.0
    # Refuse every request (503) once the cached policy is older than this because Vault
    # could not be read: a revoked right must not live on in a partitioned replica.
    max_stale_seconds: float = 30.0


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    vault: VaultConfig
    hsm: HsmConfig
    audit: AuditConfig
    kms: KmsConfig = field(default_factory=KmsConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Where this configuration came from, for messages.
    source: str = "<defaults>"
