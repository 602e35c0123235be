"""Checking checkpoint signatures with the HSM key's public half (no HSM needed to verify)."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from broker.audit.chain import SignatureCheck


def load_public_key(pem_or_der: bytes) -> ec.EllipticCurvePublicKey:
    """The checkpoint key's public half (PEM or DER SubjectPublicKeyInfo); ValueError if it is not P-256."""
    if pem_or_der.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(pem_or_der)
    else:
        key = serialization.load_der_public_key(pem_or_der)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the audit checkpoint key must be an ECDSA P-256 public key")
    return key


def to_pem(der: bytes) -> str:
    return (
        load_public_key(der)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def signature_checker(public_key: ec.EllipticCurvePublicKey) -> SignatureCheck:
    """A check of raw r||s P-256 signatures over a SHA-256 digest (what the HSM's CKM_ECDSA gives)."""

    def check(digest: bytes, signature: bytes) -> bool:
        if len(signature) != 64:
            return False
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        try:
            public_key.verify(encode_dss_signature(r, s), digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            return False
        return True

    return check
