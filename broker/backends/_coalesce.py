"""Micro-batching: concurrent single calls for the same target ride one batch call.

The first call for a quiet target leaves after one turn of the event loop (so calls
made in the same turn join it); calls that arrive while a batch is in flight queue
and leave together when it returns. One caller alone pays one loop turn; N
concurrent callers share one round trip. No timer, so no added latency to tune.

Audit: the batch is sent under its own request id (``batch-…``) and each caller's
record gets the backend call ids of the batch that carried it, so the merged
timeline joins every member to the backend's log entry.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

from broker import spans
from broker.errors import BrokerError
from broker.requestvars import backend_calls_var, request_id_var

K = TypeVar("K", bound=Hashable)
I = TypeVar("I")  # noqa: E741 - the item type, as in the batch call's signature
R = TypeVar("R")

Calls = list[tuple[str, str, str]]


class Coalescer(Generic[K, I, R]):
    def __init__(
        self, send: Callable[[K, list[I]], Awaitable[Sequence[R | BrokerError]]], *, max_items: int = 128
    ):
        self._send = send
        self._max = max_items
        self._queues: dict[K, list[tuple[I, asyncio.Future[R], Calls | None]]] = {}
        self._draining: set[K] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.items = 0

    async def submit(self, target: K, item: I) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queues.setdefault(target, []).append((item, future, backend_calls_var.get()))
        if target not in self._draining:
            self._draining.add(target)
            # A clean context: the batch is no single request's.
            task = asyncio.create_task(self._drain(target), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not spans.STATE.on:
            return await future
        called = spans.now()
        try:
            return await future
        finally:
            spans.add("backend", spans.now() - called)

    async def _drain(self, target: K) -> None:
        try:
            await asyncio.sleep(0)  # let calls made in this turn of the loop join
            while self._queues.get(target):
                queue = self._queues[target]
                batch, self._queues[target] = queue[: self._max], queue[self._max :]
                await self._one_batch(target, batch)
        finally:
            self._draining.discard(target)
            if not self._queues.get(target):
                self._queues.pop(target, None)

    async def _one_batch(self, target: K, batch: list[tuple[I, asyncio.Future[R], Calls | None]]) -> None:
        noted: Calls = []
        request_id_var.set(f"batch-{uuid.uuid4()}")
        backend_calls_var.set(noted)
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self._send(target, [item for item, _, _ in batch])
        except BaseException as exc:  # every waiter must hear, whatever went wrong
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future, calls), result in zip(batch, results, strict=True):
            if calls is not None:
                calls.extend((b, f"{op} (batch of {len(batch)})", cid) for b, op, cid in noted)
            if future.done():
                continue
            if isinstance(result, BrokerError):
                future.set_exception(result)
            else:
                future.set_result(result)
