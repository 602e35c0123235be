"""The caller's identity as the policy engine sees it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from broker.errors import Unauthenticated

SPIFFE_SCHEME = "spiffe://"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``kind`` and ``name`` from a SPIFFE ID, or kind ``cn``."""

    kind: str
    name: str
    id: str

    def __str__(self) -> str:
        return self.id


def principal_from_peercert(cert: Mapping[str, Any] | None, trust_domain: str) -> Principal:
    """Read the principal from a verified peer certificate (``SSLObject.getpeercert()``).

    A SPIFFE URI SAN ``spiffe://<trust_domain>/<kind>/<name>`` wins; without any
    SPIFFE URI the subject CN is used. A SPIFFE URI for another trust domain or of
    another shape is refused rather than ignored: falling back to the CN would let
    a certificate meant for one identity scheme act under another.
    """
    if not cert:
        raise Unauthenticated("no verified client certificate")
    spiffe = [
        value
        for kind, value in _pairs(cert.get("subjectAltName", ()))
        if kind == "URI" and value.lower().startswith(SPIFFE_SCHEME)
    ]
    if spiffe:
        if len(spiffe) > 1:
            raise Unauthenticated("client certificate carries more than one SPIFFE ID")
        return _from_spiffe(spiffe[0], trust_domain)
    for rdn in cert.get("subject", ()):
        for attr, value in _pairs(rdn):
            if attr == "commonName" and value:
                return Principal(kind="cn", name=value, id=f"cn:{value}")
    raise Unauthenticated("client certificate names no principal (no SPIFFE URI SAN, no CN)")


def _from_spiffe(uri: str, trust_domain: str) -> Principal:
    rest = uri[len(SPIFFE_SCHEME) :]
    domain, _, path = rest.partition("/")
    if domain.lower() != trust_domain.lower():
        raise Unauthenticated("client certificate's SPIFFE ID is for another trust domain")
    parts = path.split("/")
    if len(parts) != 2 or not all(_valid_segment(p) for p in parts):
        raise Unauthenticated("client certificate's SPIFFE ID is not spiffe://<domain>/<kind>/<name>")
    kind, name = parts
    return Principal(kind=kind, name=name, id=f"{SPIFFE_SCHEME}{domain.lower()}/{kind}/{name}")


def _valid_segment(segment: str) -> bool:
    return bool(segment) and all(c.isalnum() or c in "-._" for c in segment) and segment not in (".", "..")


def _pairs(items: Sequence[Any]) -> list[tuple[str, str]]:
    return [(str(item[0]), str(item[1])) for item in items if len(item) == 2]
