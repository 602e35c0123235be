"""Onboarding a principal with `keybroker certs issue` through Vault PKI, then acting as it."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.keyops import create_key
from tests.integration.policyops import fresh


def run(
    stack: DevStack, *args: str, cert: Path | None = None, key: Path | None = None, stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """The CLI as an operator with VAULT_ADDR/VAULT_TOKEN, acting as admin or as the given certificate."""
    vault = {"VAULT_ADDR": stack.vault_addr, "VAULT_TOKEN": stack.root_token()}
    return keybroker(stack, *args, cert=cert, key=key, stdin=stdin, env=vault)


def _public(cert_pem: bytes) -> bytes:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_an_issued_certificate_lets_the_grantee_use_and_retire_its_grant(
    stack: DevStack, tmp_path: Path
) -> None:
    """certs issue (key made here, 0600) → grant to that principal → it decrypts, then retires the grant."""
    name = fresh("batch")
    principal = f"spiffe://keybroker.dev/app/{name}"
    crt, pem = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    key = create_key(stack, "vault")

    issued = run(
        stack, "certs", "issue", principal, "--ttl", "1h", "--cert-out", str(crt), "--key-out", str(pem)
    )
    sealed = run(stack, "keys", "encrypt", key, "--context", "tenant=acme", stdin=b"card 4111")
    grant = run(
        stack, "grants", "create", key, "--grantee", principal, "--operation", "crypto.decrypt",
        "--context-equals", "tenant=acme", "--expires-in", "1h", "--json",
    )  # fmt: skip
    token = json.loads(grant.stdout)["grant_token"]
    used = run(stack, "keys", "decrypt", "--context", "tenant=acme", cert=crt, key=pem, stdin=sealed.stdout)
    retired = run(stack, "grants", "retire", "--token", token, cert=crt, key=pem)
    after = run(stack, "keys", "decrypt", "--context", "tenant=acme", cert=crt, key=pem, stdin=sealed.stdout)

    assert issued.returncode == 0, issued.stderr
    assert f"issued {principal} (CN {name}.app.keybroker.dev)" in issued.stdout.decode()
    for path in (crt, pem):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    ) == [principal]
    private = serialization.load_pem_private_key(pem.read_bytes(), password=None)
    assert _public(crt.read_bytes()) == private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert 3000 < (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() <= 3700
    assert grant.returncode == 0, grant.stderr
    assert (used.returncode, used.stdout) == (0, b"card 4111"), used.stderr
    assert retired.returncode == 0, retired.stderr
    assert retired.stdout.decode().startswith("retired g-")
    assert after.returncode == 1
    assert "403" in after.stderr.decode()


def test_a_given_csr_is_signed_and_one_for_another_identity_refused(stack: DevStack, tmp_path: Path) -> None:
    """--csr: the certificate carries the CSR's key and no key file is written; a mismatched CSR: exit 2."""
    name = fresh("dana")
    principal = f"spiffe://keybroker.dev/user/{name}"
    own = ec.generate_private_key(ec.SECP256R1())

    def csr(common_name: str, uri: str) -> Path:
        request = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .sign(own, hashes.SHA256())
        )
        path = tmp_path / f"{common_name}.csr"
        path.write_bytes(request.public_bytes(serialization.Encoding.PEM))
        return path

    good, crt = csr(f"{name}.user.keybroker.dev", principal), tmp_path / "dana.crt"
    other = csr("admin.user.keybroker.dev", "spiffe://keybroker.dev/user/admin")

    signed = run(stack, "certs", "issue", principal, "--csr", str(good), "--cert-out", str(crt), "--json")
    again = run(stack, "certs", "issue", principal, "--csr", str(good), "--cert-out", str(crt))
    refused = run(
        stack, "certs", "issue", principal, "--csr", str(other), "--cert-out", str(tmp_path / "x.crt")
    )

    assert signed.returncode == 0, signed.stderr
    out = json.loads(signed.stdout)
    assert (out["principal"], out["certificate"], out["private_key"]) == (principal, str(crt), None)
    assert _public(crt.read_bytes()) == own.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["admin.user.keybroker.dev.csr", good.name, "dana.crt"]
    )
    assert again.returncode == 2
    assert "already exists; refusing to overwrite it" in again.stderr.decode()
    assert refused.returncode == 2
    assert f"it must carry exactly CN '{name}.user.keybroker.dev'" in refused.stderr.decode()
    assert not (tmp_path / "x.crt").exists()


def test_a_name_the_client_role_cannot_take_is_refused_before_vault(stack: DevStack, tmp_path: Path) -> None:
    """A name that is no DNS label, or a cn: id: a usage error saying why, nothing written."""
    bad = run(
        stack, "certs", "issue", "spiffe://keybroker.dev/user/dana_smith", "--cert-out", str(tmp_path / "a")
    )
    cn = run(stack, "certs", "issue", "cn:dana", "--cert-out", str(tmp_path / "b"))

    assert bad.returncode == 2
    assert "the name 'dana_smith' cannot be a DNS label" in bad.stderr.decode()
    assert cn.returncode == 2
    assert "certs issue takes a SPIFFE id" in cn.stderr.decode()
    assert list(tmp_path.iterdir()) == []


def test_a_new_principal_is_issued_bound_and_works(stack: DevStack, tmp_path: Path) -> None:
    """certs issue for a new user: refused (no role) until `bindings set`, then its role's work succeeds."""
    name = fresh("erin")
    principal = f"spiffe://keybroker.dev/user/{name}"
    crt, pem = tmp_path / "erin.crt", tmp_path / "erin.key"

    issued = run(stack, "certs", "issue", principal, "--cert-out", str(crt), "--key-out", str(pem))
    unbound = run(stack, "keys", "list", "--json", cert=crt, key=pem)
    bound = run(stack, "bindings", "set", principal, "developer")
    listed = run(stack, "keys", "list", "--json", cert=crt, key=pem)

    assert issued.returncode == 0, issued.stderr
    assert unbound.returncode == 1
    assert json.loads(unbound.stderr)["error"]["status"] == 403
    assert bound.returncode == 0, bound.stderr
    assert listed.returncode == 0, listed.stderr
    assert isinstance(json.loads(listed.stdout), list)
