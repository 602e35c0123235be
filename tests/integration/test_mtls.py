"""The broker's listener: mutual TLS, TLS 1.2 minimum, only certificates from its CA."""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path

import pytest
import trustme

from broker.devstack.stack import DevStack
from tests.integration.conftest import raw_tls_exchange


def base_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca_file))
    return ctx


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True if the server refused: a TLS error, or a hang-up before any HTTP answer."""
    try:
        answer = raw_tls_exchange(port, ctx)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    return not answer.startswith(b"HTTP/")


def test_control_valid_client_certificate_is_served(stack: DevStack, ca_file: Path) -> None:
    """The positive control for the refusals below: same client set-up, right certificate."""
    ctx = base_context(ca_file)
    ctx.load_cert_chain(str(stack.layout.tls / "admin.crt"), str(stack.layout.tls / "admin.key"))

    answer = raw_tls_exchange(stack.broker_port, ctx)

    assert answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_client_without_certificate_is_refused(
    stack: DevStack, ca_file: Path, version: ssl.TLSVersion
) -> None:
    """No client certificate, no service, on TLS 1.2 and 1.3 alike."""
    ctx = base_context(ca_file)
    ctx.minimum_version = ctx.maximum_version = version

    assert refused(stack.broker_port, ctx)


def test_certificate_from_another_ca_is_refused(stack: DevStack, ca_file: Path, tmp_path: Path) -> None:
    """A well-formed client certificate from a CA the broker does not trust is refused."""
    rogue_ca = trustme.CA()
    rogue = rogue_ca.issue_cert("admin.example", common_name="admin")
    cert, key = tmp_path / "rogue.crt", tmp_path / "rogue.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in rogue.cert_chain_pems))
    key.write_bytes(rogue.private_key_pem.bytes())
    ctx = base_context(ca_file)
    ctx.load_cert_chain(str(cert), str(key))

    assert refused(stack.broker_port, ctx)


def test_tls_1_1_is_refused_at_the_handshake(stack: DevStack, ca_file: Path) -> None:
    """A client offering only TLS 1.1 is refused by the server, not by its own library."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated: that is the point
        ctx = base_context(ca_file)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.load_cert_chain(str(stack.layout.tls / "admin.crt"), str(stack.layout.tls / "admin.key"))

    with pytest.raises(ssl.SSLError) as info:
        raw_tls_exchange(stack.broker_port, ctx)

    # The ClientHello went out; the refusal came from the server, not a local "no protocols".
    assert info.value.reason != "NO_PROTOCOLS_AVAILABLE"
    assert info.value.reason in {
        "UNEXPECTED_EOF_WHILE_READING",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "UNSUPPORTED_PROTOCOL",
    }
