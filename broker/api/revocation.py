"""Client certificate revocation: the PKI's CRL, read from Vault, checked on every request.

The TLS handshake only proves a certificate chains to ``server.client_ca_file``; a certificate
revoked in Vault PKI (``<mount>/revoke``) would otherwise authenticate until it expires. The
broker reads the mount's CRL (``GET /v1/<mount>/cert/crl``, unauthenticated in Vault PKI) at
start and every ``server.crl_refresh_seconds``, accepts it only with a valid signature by a CA
in ``client_ca_file`` and never an older one than it holds, and the identity middleware refuses
a revoked peer (401 ``certificate_revoked``). Fail closed: with no CRL, or none newer than
``server.crl_max_age_seconds`` since it was last read, every request is answered 503
``crl_unavailable``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from broker import periodic
from broker.backends.vault import VaultClient
from broker.config.model import ServerConfig
from broker.errors import BrokerError, Unauthenticated
from broker.log import get_logger

log = get_logger(__name__)


class CertificateRevoked(Unauthenticated):
    code = "certificate_revoked"
    title = "Client certificate revoked"


class CrlUnavailable(BrokerError):
    """No current CRL: whether a client certificate was revoked cannot be told (503)."""

    status = 503
    code = "crl_unavailable"
    title = "Certificate revocation list unavailable"


class InvalidCrl(BrokerError):
    """What Vault served is not a CRL the broker may trust (kept out of use, logged; never an answer)."""

    status = 502
    code = "backend_error"
    title = "Invalid certificate revocation list"


class Revocations:
    """The current CRL of the client PKI and the check of one peer certificate against it."""

    def __init__(
        self, vault: VaultClient, config: ServerConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._vault = vault
        self._mount = config.crl_pki_mount.strip("/")
        self._refresh_seconds = config.crl_refresh_seconds
        self._max_age = config.crl_max_age_seconds
        self._clock = clock
        self._ca_file = config.client_ca_file
        self._issuers: list[x509.Certificate] | None = None
        self._crl: x509.CertificateRevocationList | None = None
        self._revoked: frozenset[int] = frozenset()
        self._read_at: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self._mount)

    async def refresh(self) -> None:
        """Read the CRL from Vault and take it if it is valid; raises BrokerError if not."""
        answer = await self._vault.unauthenticated(
            f"v1/{self._mount}/cert/crl", what="client certificate CRL"
        )
        data = answer.get("data")
        pem = data.get("certificate") if isinstance(data, dict) else None
        if not isinstance(pem, str) or not pem.strip():
            raise InvalidCrl(f"vault mount {self._mount!r} served no CRL")
        self.accept(pem.encode())

    def accept(self, pem: bytes) -> None:
        """Take ``pem`` as the current CRL if a client CA signed it and it is not older than the last."""
        try:
            crl = x509.load_pem_x509_crl(pem)
        except ValueError:
            raise InvalidCrl("the CRL is not a PEM X.509 CRL") from None
        if self._issuers is None:
            self._issuers = _load_issuers(self._ca_file)
        if not any(_signed_by(crl, issuer) for issuer in self._issuers):
            raise InvalidCrl("the CRL is not signed by a CA in server.client_ca_file")
        if self._crl is not None and _issued(crl) < _issued(self._crl):
            # An older list would bring revoked certificates back: refuse the rollback.
            raise InvalidCrl("the CRL is older than the one already in use")
        next_update = crl.next_update_utc
        if next_update is not None and next_update < datetime.now(next_update.tzinfo):
            # Vault rebuilds its CRL on every revocation; past its nextUpdate it still lists every
            # revocation made so far. Keep it, but say so: enable auto_rebuild on the mount.
            log.warning("crl_past_next_update", mount=self._mount, next_update=next_update.isoformat())
        self._crl = crl
        self._revoked = frozenset(entry.serial_number for entry in crl)
        self._read_at = self._clock()

    def check(self, peer_der: bytes) -> None:
        """Refuse a revoked peer certificate (401) and every request while no CRL is current (503)."""
        if not self._mount:
            return
        if self._crl is None or self._read_at is None:
            raise CrlUnavailable(
                "the client certificate revocation list could not be read from Vault yet; "
                "requests are refused until it is"
            )
        age = self._clock() - self._read_at
        if age > self._max_age:
            raise CrlUnavailable(
                f"the client certificate revocation list was last read {age:.0f} s ago "
                f"(at most server.crl_max_age_seconds = {self._max_age:g}); "
                "requests are refused until it is read again"
            )
        if not self._revoked:
            return
        try:
            cert = x509.load_der_x509_certificate(peer_der)
        except ValueError:
            raise Unauthenticated("the client certificate cannot be read") from None
        if cert.serial_number in self._revoked and cert.issuer == self._crl.issuer:
            raise CertificateRevoked("this client certificate was revoked by its CA")

    async def refresh_loop(self) -> None:
        """Re-read the CRL every ``crl_refresh_seconds``; a failure keeps the last one (until its max age)."""
        await periodic.every(
            self._refresh_seconds, self.refresh, what="crl_refresh", first_wait=True, mount=self._mount
        )

    async def refresh_logged(self) -> None:
        try:
            await self.refresh()
        except BrokerError as exc:
            log.warning("crl_refresh_failed", error=exc.detail, mount=self._mount)


REVOCATIONS = web.AppKey("keybroker.revocations", Revocations)


def _load_issuers(ca_file: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca_file.read_bytes())
    except (OSError, ValueError):
        raise InvalidCrl(
            "cannot read the client CA certificates (server.client_ca_file) that sign the CRL"
        ) from None


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    if crl.issuer != issuer.subject:
        return False
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (InvalidSignature, TypeError, ValueError):
        return False


def _issued(crl: x509.CertificateRevocationList) -> datetime:
    return crl.last_update_utc
