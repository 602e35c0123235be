"""The rules of grants, role deletion and audit anchors, decided without HTTP or Vault."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.errors import BadRequest, Conflict, Forbidden, NotFound
from broker.policy.document import to_document
from broker.policy.model import KeyFacts, PolicySet, principal_from_id
from broker.state.anchors import anchored, epoch_notes
from broker.state.grants import GrantAsk, build_grant
from broker.state.policies import Snapshot, default_policy, without_role

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
DEV = principal_from_id("spiffe://bank.example/user/dev")
APP = "spiffe://bank.example/app/payments"


def snapshot() -> Snapshot:
    shipped = default_policy()
    policy = PolicySet(shipped.roles, {**shipped.bindings, DEV.id: ("developer",)}, shipped.settings)
    return Snapshot(policy, policy, 1)


def issue(ask: GrantAsk, environment: str = "dev") -> object:
    return build_grant(
        ask,
        granter=DEV,
        key=KeyFacts("k1", "vault", environment),
        policy=snapshot(),
        now=NOW,
        grant_id="g-00000000000000000000",
    )


def test_grant_is_built_with_its_expiry_and_granter() -> None:
    """A grant within the granter's rules expires expires_in seconds from now and names its granter."""
    grant = build_grant(
        GrantAsk(APP, ("crypto.encrypt",), 3600),
        granter=DEV,
        key=KeyFacts("k1", "vault", "dev"),
        policy=snapshot(),
        now=NOW,
        grant_id="g-00000000000000000000",
    )

    assert (NOW + timedelta(hours=1), DEV.id, APP, ("crypto.encrypt",)) == (
        grant.expires_at,
        grant.granter,
        grant.grantee,
        grant.operations,
    )


@pytest.mark.parametrize("expires_in", [None, 0, 86401])
def test_grant_needs_an_expiry_within_the_policy_cap(expires_in: int | None) -> None:
    """No expiry, a zero one, or one beyond grant_max_expires_in (86400s shipped) is refused."""
    with pytest.raises(BadRequest, match="expires_in"):
        issue(GrantAsk(APP, ("crypto.encrypt",), expires_in))


def test_grant_cannot_exceed_the_granter() -> None:
    """A developer may encrypt in dev but not in prod, so may not grant encrypt on a prod key."""
    with pytest.raises(Forbidden, match=r"crypto\.encrypt"):
        issue(GrantAsk(APP, ("crypto.encrypt",), 3600), environment="prod")


def test_grant_takes_one_context_constraint_at_most() -> None:
    """context_equals and context_subset together are refused before anything else."""
    with pytest.raises(BadRequest, match="at most one"):
        GrantAsk(APP, ("crypto.encrypt",), 3600, context_equals={"a": "b"}, context_subset={"a": "b"})


def test_role_deletion_rules() -> None:
    """An unknown role is not found; a bound role or the last role cannot go; otherwise it goes."""
    document = to_document(default_policy())
    document["bindings"] = {APP: ["application"]}

    with pytest.raises(NotFound):
        without_role(document, "nobody")
    with pytest.raises(Conflict, match="still bound"):
        without_role(document, "application")
    assert "developer" not in without_role(document, "developer")["roles"]
    with pytest.raises(Conflict, match="last role"):
        without_role({"roles": {"only": {}}, "bindings": {}}, "only")


def test_anchor_document_reading() -> None:
    """The anchor position and one note per recorded epoch come from the anchor document."""
    document = {
        "seq": 7,
        "hash": "ab" * 32,
        "epoch": "e2",
        "epochs": [
            {
                "epoch": "e2",
                "first_seq": 1,
                "started": "2026-11-23T12:00:00Z",
                "by": DEV.id,
                "reason": "disk lost",
                "supersedes": {"epoch": "initial", "seq": 40},
            }
        ],
    }

    mark = anchored(document)
    assert mark is not None
    assert (mark.seq, mark.hash) == (7, "ab" * 32)
    assert anchored(None) is None
    [note] = epoch_notes(document)
    assert "epoch e2 began at record 1" in note
    assert "whose anchored history ended at record 40" in note
