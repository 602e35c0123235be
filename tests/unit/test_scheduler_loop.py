"""The scheduler loop survives a pass that crashes, and the work-claim rules of the key model."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from broker.errors import Conflict
from broker.keys.model import Key, State, Version, WorkClaim
from broker.keys.service import KeyService, scheduler_loop
from broker.vocab import Backend, KeyType

NOW = datetime(2026, 1, 1, tzinfo=UTC)


class CrashingOnce:
    """A service whose first pass raises something no backend error is made of."""

    def __init__(self) -> None:
        self.passes = 0

    async def run_due_work(self) -> dict[str, list[str]]:
        self.passes += 1
        if self.passes == 1:
            raise KeyError("versions")  # e.g. a registry entry written around the broker
        return {"rotated": [], "destroyed": []}


def test_a_crashed_pass_does_not_end_the_loop() -> None:
    """One pass raising an unexpected exception is logged; the next passes still run."""
    service = CrashingOnce()

    async def run() -> None:
        task = asyncio.create_task(scheduler_loop(cast(KeyService, service), 0.01))
        for _ in range(200):
            if service.passes >= 3 or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), "the scheduler loop ended"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert service.passes >= 3


def _key(**changes: Any) -> Key:
    base = Key(
        name="k",
        backend=Backend.VAULT,
        type=KeyType.AES256_GCM,
        environment="dev",
        state=State.ACTIVE,
        created_at=NOW,
        updated_at=NOW,
        versions=(Version(1, "1", NOW),),
    )
    return Key(**{**base.__dict__, **changes})


def test_work_claim_is_stored_but_never_shown() -> None:
    """The claim round-trips through the registry form and is left out of the API's view."""
    key = _key(work_claim=WorkClaim("rotate", "a", NOW + timedelta(minutes=5)))
    assert Key.from_json(key.to_json()) == key
    assert "work_claim" not in key.public()
    assert Key.from_json({k: v for k, v in key.to_json().items() if k != "work_claim"}).work_claim is None


def test_claims_of_others_hold_until_they_lapse() -> None:
    """Another owner's live claim blocks; one that lapsed, or our own, does not."""
    key = _key(work_claim=WorkClaim("rotate", "a", NOW + timedelta(minutes=5)))
    assert key.claimed_by_other(NOW, "b")
    assert not key.claimed_by_other(NOW, "a")
    assert not key.claimed_by_other(NOW + timedelta(minutes=5), "b")


def test_no_cancel_while_a_replica_is_destroying() -> None:
    """A live destroy claim refuses a cancel (the material may be gone already); a lapsed one does not."""
    pending = _key(
        state=State.PENDING_DESTRUCTION,
        state_before_destruction=State.ACTIVE,
        destroy_after=NOW,
        work_claim=WorkClaim("destroy", "a", NOW + timedelta(minutes=5)),
    )
    with pytest.raises(Conflict):
        pending.destruction_cancelled(NOW)
    assert pending.destruction_cancelled(NOW + timedelta(minutes=6)).state is State.SUSPENDED
