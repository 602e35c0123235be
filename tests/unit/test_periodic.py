"""Every upkeep loop outlives a pass that raises something unexpected (it used to end the task).

A policy refresh task that ended would leave this replica refusing every request once its
policy grew older than ``policy.max_stale_seconds``, until a restart; a CRL refresh the same
after ``crl_max_age_seconds``; a grant purge or scheduler that ended would never run again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

from broker import periodic
from broker.api.idempotency import IdempotencyStore, sweep_loop
from broker.api.revocation import Revocations
from broker.errors import Unavailable
from broker.keys.service import KeyService, scheduler_loop
from broker.state.grants import GrantStore, grant_purge_loop
from broker.state.policies import PolicyStore

INTERVAL = 0.01


class Flaky:
    """A pass that raises ``KeyError`` first (a document written around the broker), then a
    backend error, then works; counts every pass."""

    def __init__(self, result: Any = None) -> None:
        self.passes = 0
        self.result = result

    async def __call__(self, *_: Any) -> Any:
        self.passes += 1
        if self.passes == 1:
            raise KeyError("grants")
        if self.passes == 2:
            raise Unavailable("vault is away", backend="vault")
        return self.result


class Fake:
    """An object with the attributes a loop reads; ``pass_`` is what it calls each round."""

    def __init__(self, pass_: Flaky) -> None:
        self.pass_ = pass_
        self._refresh = INTERVAL
        self._refresh_seconds = INTERVAL
        self._mount = "pki"
        self.load = self.refresh = self.purge_expired = self.run_due_work = self.sweep = pass_


def _loops() -> dict[str, tuple[Callable[[Fake], Coroutine[Any, Any, None]], Any]]:
    return {
        "policy refresh": (lambda f: PolicyStore.refresh_loop(cast(PolicyStore, f)), None),
        "CRL refresh": (lambda f: Revocations.refresh_loop(cast(Revocations, f)), None),
        "grant purge": (lambda f: grant_purge_loop(cast(GrantStore, f), INTERVAL), 0),
        "key scheduler": (
            lambda f: scheduler_loop(cast(KeyService, f), INTERVAL),
            {"rotated": [], "destroyed": []},
        ),
        "idempotency sweep": (
            lambda f: sweep_loop(cast(IdempotencyStore, f), INTERVAL),
            ({"erased": 0, "contended": 0}, ""),
        ),
    }


@pytest.mark.parametrize("name", list(_loops()))
def test_an_upkeep_loop_survives_an_unexpected_exception(name: str) -> None:
    """The loop's first pass raises KeyError, its second a backend error: it keeps running."""
    start, result = _loops()[name]
    pass_ = Flaky(result)

    async def run() -> None:
        task = asyncio.create_task(start(Fake(pass_)))
        for _ in range(500):
            if pass_.passes >= 4 or task.done():
                break
            await asyncio.sleep(INTERVAL)
        assert not task.done(), f"the {name} loop ended: {task.exception() if task.done() else ''}"
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert pass_.passes >= 4


def test_cancelling_the_loop_stops_it() -> None:
    """Shutdown cancels the task: cancellation is not a failure to log and go round again."""
    passes = Flaky()

    async def run() -> bool:
        task = asyncio.create_task(periodic.every(INTERVAL, passes, what="test"))
        await asyncio.sleep(INTERVAL * 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
        return task.cancelled()

    assert asyncio.run(run())
