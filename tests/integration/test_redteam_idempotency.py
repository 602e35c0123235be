"""Red-team checks of ``Idempotency-Key`` on the real stack: a replay is never a way around the
policy (a caller unbound since its first request gets 403, not the stored answer), and one
principal's record is never another's."""

from __future__ import annotations

import time
import uuid

from broker.devstack.stack import DevStack
from tests.integration.conftest import Reply, https
from tests.integration.keyops import create_key, registry_record
from tests.integration.policyops import bind, fresh, identity, put_role

HEADER = "Idempotency-Key"


def _rotate(stack: DevStack, who: str, name: str, key: str) -> Reply:
    return https(stack, f"/v1/keys/{name}/rotate", who=who, body={}, headers={HEADER: key})


def test_a_caller_unbound_after_its_rotate_cannot_replay_it(stack: DevStack) -> None:
    """Rotate with a key, lose the role, send the same key and body again: 403 (the policy is
    decided before the record is looked at), not the first answer marked replayed."""
    name = create_key(stack, "vault")
    role = fresh("rt-rotator")
    put_role(stack, role, [{"operations": ["key.rotate", "key.read"], "keys": {"name": [name]}}])
    stem, principal = identity(stack, fresh("rt-rotor"))
    bind(stack, principal, role)
    key = f"rt-{uuid.uuid4()}"

    first = _rotate(stack, stem, name, key)
    assert first.status == 200, first.body
    bind(stack, principal)  # no roles any more

    deadline = time.monotonic() + 20
    again = _rotate(stack, stem, name, key)
    while again.status != 403 and time.monotonic() < deadline:
        time.sleep(0.2)
        again = _rotate(stack, stem, name, key)
    assert again.status == 403, again.body
    assert again.headers.get("Idempotent-Replayed") is None
    assert [v["version"] for v in registry_record(stack, name)["versions"]] == [1, 2]


def test_another_principal_sending_the_same_key_gets_no_replay(stack: DevStack) -> None:
    """Someone else who learns the Idempotency-Key value and sends it with the same body: its own
    request (a new version), never the first caller's stored answer."""
    name = create_key(stack, "vault")
    role = fresh("rt-rotator")
    put_role(stack, role, [{"operations": ["key.rotate", "key.read"], "keys": {"name": [name]}}])
    one, p1 = identity(stack, fresh("rt-one"))
    two, p2 = identity(stack, fresh("rt-two"))
    bind(stack, p1, role)
    bind(stack, p2, role)
    key = f"rt-{uuid.uuid4()}"

    first = _rotate(stack, one, name, key)
    deadline = time.monotonic() + 20
    other = _rotate(stack, two, name, key)
    while other.status == 403 and time.monotonic() < deadline:  # the binding reaching the policy cache
        time.sleep(0.2)
        other = _rotate(stack, two, name, key)

    assert first.status == 200, first.body
    assert other.status == 200, other.body
    assert other.headers.get("Idempotent-Replayed") is None
    assert other.json()["latest_version"] == 3
