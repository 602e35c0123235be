"""Which CRLs the broker takes, and how a peer certificate is judged against the one it holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.api.revocation import CertificateRevoked, CrlUnavailable, InvalidCrl, Revocations
from broker.config.model import ServerConfig

NOW = datetime.now(UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key: Any, ca: x509.Certificate, serial: int) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def _crl(ca_key: Any, ca: x509.Certificate, serials: list[int], *, issued: datetime = NOW) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(issued)
        .next_update(issued + timedelta(hours=72))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(issued).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


Pki = tuple[Any, x509.Certificate, Revocations, "Clock"]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    key, ca = _ca("client CA")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    config = ServerConfig(cert_file=tmp_path / "s.crt", key_file=tmp_path / "s.key", client_ca_file=ca_file)
    clock = Clock()
    return key, ca, Revocations(None, config, clock=clock), clock  # type: ignore[arg-type]


def test_a_revoked_serial_is_refused_and_others_pass(
    pki: tuple[Any, x509.Certificate, Revocations, Clock],
) -> None:
    """A certificate whose serial the client CA's CRL lists is refused; another one passes."""
    key, ca, revocations, _ = pki
    revocations.accept(_crl(key, ca, [7]))
    with pytest.raises(CertificateRevoked):
        revocations.check(_leaf(key, ca, 7))
    revocations.check(_leaf(key, ca, 8))


def test_no_crl_or_a_stale_one_refuses_every_request(
    pki: tuple[Any, x509.Certificate, Revocations, Clock],
) -> None:
    """Fail closed: before any CRL was read, and once the last one is older than the max age (503)."""
    key, ca, revocations, clock = pki
    with pytest.raises(CrlUnavailable, match="could not be read"):
        revocations.check(_leaf(key, ca, 8))
    revocations.accept(_crl(key, ca, []))
    revocations.check(_leaf(key, ca, 8))
    clock.now += 301
    with pytest.raises(CrlUnavailable, match="crl_max_age_seconds"):
        revocations.check(_leaf(key, ca, 8))


def test_a_crl_not_signed_by_the_client_ca_is_refused(
    pki: tuple[Any, x509.Certificate, Revocations, Clock],
) -> None:
    """A CRL from another CA (even one naming the same issuer) is not taken: it could unrevoke anything."""
    key, ca, revocations, _ = pki
    revocations.accept(_crl(key, ca, [7]))
    other_key, _ = _ca("client CA")
    with pytest.raises(InvalidCrl, match="not signed"):
        revocations.accept(_crl(other_key, ca, []))
    with pytest.raises(CertificateRevoked):
        revocations.check(_leaf(key, ca, 7))


def test_an_older_crl_does_not_replace_a_newer_one(
    pki: tuple[Any, x509.Certificate, Revocations, Clock],
) -> None:
    """Rolling back to an earlier CRL (before a revocation) is refused."""
    key, ca, revocations, _ = pki
    revocations.accept(_crl(key, ca, [7]))
    with pytest.raises(InvalidCrl, match="older"):
        revocations.accept(_crl(key, ca, [], issued=NOW - timedelta(hours=1)))
    with pytest.raises(CertificateRevoked):
        revocations.check(_leaf(key, ca, 7))
