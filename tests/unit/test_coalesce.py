"""Micro-batching: concurrent calls share batches; each caller keeps its answer and the batch's call ids."""

from __future__ import annotations

import asyncio

import pytest

from broker.backends._coalesce import Coalescer
from broker.errors import DecryptionFailed, Unavailable
from broker.requestvars import backend_calls_var, note_backend_call, request_id_var


class Backend:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self.request_ids: list[str] = []
        self.fail = fail

    async def send(self, target: str, items: list[int]) -> list[int | DecryptionFailed]:
        self.calls.append(items)
        self.request_ids.append(request_id_var.get())
        note_backend_call("vault", "transit encrypt batch", f"vault-req-{len(self.calls)}")
        await asyncio.sleep(0.01)
        if self.fail:
            raise Unavailable("vault: sealed")
        return [DecryptionFailed() if i < 0 else i * 10 for i in items]


def test_concurrent_callers_share_batches_and_keep_their_own_answers() -> None:
    """50 callers at once: one batch goes first, the rest ride the next; each answer is the caller's;
    a bad item fails alone; every caller's audit calls name the batch that carried it."""
    backend = Backend()
    coalescer: Coalescer[str, int, int] = Coalescer(backend.send)

    async def caller(i: int) -> tuple[int | str, list[tuple[str, str, str]]]:
        calls: list[tuple[str, str, str]] = []
        backend_calls_var.set(calls)
        request_id_var.set(f"req-{i}")
        try:
            return await coalescer.submit("k", i if i != 7 else -1), calls
        except DecryptionFailed:
            return "failed", calls

    async def run() -> list[tuple[int | str, list[tuple[str, str, str]]]]:
        return list(await asyncio.gather(*(caller(i) for i in range(50))))

    results = asyncio.run(run())

    assert [r for r, _ in results] == [i * 10 if i != 7 else "failed" for i in range(50)]
    assert sum(len(c) for c in backend.calls) == 50
    assert len(backend.calls) <= 2
    assert all(rid.startswith("batch-") for rid in backend.request_ids)
    assert results[3][1] == [("vault", "transit encrypt batch (batch of 50)", "vault-req-1")]


def test_one_caller_alone_is_not_delayed_by_a_timer() -> None:
    """A lone call goes out in the next loop turn: one batch of one."""
    backend = Backend()
    coalescer: Coalescer[str, int, int] = Coalescer(backend.send)

    assert asyncio.run(coalescer.submit("k", 4)) == 40
    assert backend.calls == [[4]]


def test_a_failed_batch_fails_every_caller_with_the_backend_error() -> None:
    backend = Backend(fail=True)
    coalescer: Coalescer[str, int, int] = Coalescer(backend.send)

    async def run() -> list[BaseException | int]:
        return list(
            await asyncio.gather(*(coalescer.submit("k", i) for i in range(5)), return_exceptions=True)
        )

    results = asyncio.run(run())

    assert all(isinstance(r, Unavailable) for r in results)
    with pytest.raises(Unavailable, match="sealed"):
        asyncio.run(coalescer.submit("k", 1))
