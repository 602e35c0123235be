"""Run blocking SDK calls off the event loop, with the caller's contextvars and a deadline."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

from broker import spans
from broker.errors import BackendTimeout, OutcomeUnknown

T = TypeVar("T")


async def run_blocking(
    executor: Executor | None,
    fn: Callable[[], T],
    *,
    deadline: float,
    backend: str,
    what: str,
    repeatable: bool = True,
) -> T:
    """Call ``fn`` in ``executor`` with the current context copied in; give up after ``deadline`` seconds.

    The thread keeps running after a timeout (threads cannot be cancelled); the
    SDK-level timeouts bound how long it can linger. ``repeatable``: doing the call twice has
    the effect of doing it once; a call that is not (it creates something) and passes its
    deadline is :class:`OutcomeUnknown`, since it may still be carried out.
    """
    ctx = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    called = spans.now()
    try:
        async with asyncio.timeout(deadline):
            return await loop.run_in_executor(executor, functools.partial(ctx.run, fn))
    except TimeoutError:
        if not repeatable:
            raise OutcomeUnknown(
                f"{backend}: {what} did not finish within {deadline:g}s and may still be carried out; "
                "nothing was recorded: read the key before trying again",
                backend=backend,
            ) from None
        raise BackendTimeout(f"{backend}: {what} took longer than {deadline:g}s", backend=backend) from None
    finally:
        spans.add("backend", spans.now() - called)
