"""The principal comes from the verified certificate: SPIFFE URI SAN first, else CN."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import Unauthenticated
from broker.policy.model import principal_from_peercert

DOMAIN = "keybroker.dev"


def cert(cn: str | None = None, uris: tuple[str, ...] = ()) -> dict[str, Any]:
    subject = ((("commonName", cn),),) if cn else ()
    return {"subject": subject, "subjectAltName": tuple(("URI", u) for u in uris)}


def test_spiffe_id_wins_over_cn() -> None:
    """The SPIFFE ID names kind and name."""
    principal = principal_from_peercert(cert("ignored", ("spiffe://keybroker.dev/app/payments",)), DOMAIN)

    assert (principal.kind, principal.name, principal.id) == (
        "app",
        "payments",
        "spiffe://keybroker.dev/app/payments",
    )


def test_cn_when_no_spiffe_id() -> None:
    """Without a SPIFFE ID the CN names the principal."""
    principal = principal_from_peercert(cert("ops-admin"), DOMAIN)

    assert (principal.kind, principal.name, principal.id) == ("cn", "ops-admin", "cn:ops-admin")


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        (("spiffe://other.example/app/payments",), "another trust domain"),
        (("spiffe://keybroker.dev/app/a", "spiffe://keybroker.dev/app/b"), "more than one"),
        (("spiffe://keybroker.dev/payments",), "is not spiffe://"),
        (("spiffe://keybroker.dev/app/../admin",), "is not spiffe://"),
        (("spiffe://keybroker.dev/app/pay ments",), "is not spiffe://"),
    ],
)
def test_bad_spiffe_ids_are_refused_not_ignored(uris: tuple[str, ...], message: str) -> None:
    """A SPIFFE ID that does not fit is refused; it never falls back to the CN."""
    with pytest.raises(Unauthenticated, match=message):
        principal_from_peercert(cert("admin", uris), DOMAIN)


def test_no_certificate_or_no_name_is_refused() -> None:
    """Nothing to name a principal by means no principal."""
    with pytest.raises(Unauthenticated):
        principal_from_peercert(None, DOMAIN)
    with pytest.raises(Unauthenticated, match="names no principal"):
        principal_from_peercert(cert(None, ("https://example.com/x",)), DOMAIN)
