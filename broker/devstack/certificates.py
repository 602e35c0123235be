"""Certificates of the dev stack from Vault PKI: the broker's server certificate and client identities."""

from __future__ import annotations

import json
import time
from typing import Any

from broker._files import write_private
from broker.devstack.common import CERT_RENEW_MARGIN, DEV_CLIENTS, TRUST_DOMAIN, Layout
from broker.devstack.vault import DevVault
from broker.vaultops.policy import CLIENT_ROLE, SERVER_ROLE, Mounts


class DevCertificates:
    """Issues into ``layout.tls``: ``<stem>.crt`` (with its chain) and ``<stem>.key`` (0600)."""

    def __init__(self, layout: Layout, vault: DevVault) -> None:
        self.layout = layout
        self._vault = vault

    def issue_all(self) -> None:
        """The server certificate and the dev clients' ones, re-issued when close to expiry; the CA bundle."""
        tls = self.layout.tls
        issued_path = tls / "issued.json"
        issued: dict[str, float] = json.loads(issued_path.read_text()) if issued_path.is_file() else {}
        wanted: dict[str, dict[str, Any]] = {
            "server": {
                "role": SERVER_ROLE,
                "common_name": "localhost",
                "alt_names": "localhost",
                "ip_sans": "127.0.0.1",
            },
        }
        for stem, (cn, kind) in DEV_CLIENTS.items():
            wanted[stem] = self._client_params(cn, kind)
        renewed = False
        for stem, params in wanted.items():
            expires = issued.get(stem, 0)
            if (tls / f"{stem}.crt").is_file() and expires - time.time() > CERT_RENEW_MARGIN:
                continue
            issued[stem] = self._issue(stem, params)
            renewed = True
        if renewed or not (tls / "ca.pem").is_file():
            client = self._vault.client()
            root = client.adapter.get(f"/v1/{Mounts().pki_root}/cert/ca")["data"]["certificate"]
            intermediate = client.adapter.get(f"/v1/{Mounts().pki}/cert/ca")["data"]["certificate"]
            (tls / "ca.pem").write_text(root.strip() + "\n" + intermediate.strip() + "\n")
        write_private(issued_path, json.dumps(issued))

    @staticmethod
    def _client_params(name: str, kind: str) -> dict[str, Any]:
        # The client role takes CNs under the trust domain only; the SPIFFE ID names the principal.
        return {
            "role": CLIENT_ROLE,
            "common_name": f"{name}.{kind}.{TRUST_DOMAIN}",
            "uri_sans": f"spiffe://{TRUST_DOMAIN}/{kind}/{name}",
        }

    def issue_client(self, stem: str, name: str, kind: str) -> str:
        """A client certificate for spiffe://<trust domain>/<kind>/<name> in tls/<stem>.{crt,key}; its id."""
        self._issue(stem, self._client_params(name, kind))
        return f"spiffe://{TRUST_DOMAIN}/{kind}/{name}"

    def issue_verbatim(self, stem: str, common_name: str, uri: str | None = None) -> None:
        """A client certificate exactly as asked, signed by the dev intermediate with the root token.

        For tests that need a name the client role refuses (a CN ``*``, a SPIFFE ID of another
        shape): ``sign-verbatim`` takes no role, so only an operator token may call it. The
        broker's AppRole cannot.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        )
        if uri is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
            )
        csr = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
        data = self._vault.client().adapter.post(
            f"/v1/{Mounts().pki}/sign-verbatim",
            json={
                "csr": csr,
                "ttl": "24h",
                "ext_key_usage": ["ClientAuth"],
                "key_usage": ["DigitalSignature"],
            },
        )["data"]
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        bundle = data["certificate"].strip() + "\n" + "\n".join(c.strip() for c in data["ca_chain"]) + "\n"
        write_private(self.layout.tls / f"{stem}.key", pem)
        write_private(self.layout.tls / f"{stem}.crt", bundle)

    def _issue(self, stem: str, params: dict[str, Any]) -> float:
        """Issue from Vault PKI into tls/<stem>.crt and .key (0600); return the expiry (epoch seconds)."""
        body = {k: v for k, v in params.items() if k != "role"}
        data = self._vault.client().adapter.post(
            f"/v1/{Mounts().pki}/issue/{params['role']}", json={**body, "ttl": "720h"}
        )["data"]
        bundle = data["certificate"].strip() + "\n" + "\n".join(c.strip() for c in data["ca_chain"]) + "\n"
        write_private(self.layout.tls / f"{stem}.key", data["private_key"].strip() + "\n")
        write_private(self.layout.tls / f"{stem}.crt", bundle)
        return float(data["expiration"])
