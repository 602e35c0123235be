"""Upkeep that runs every few seconds for the broker's whole life, and never dies of one bad pass.

Policy and CRL refresh, the key scheduler, the grant purge and the idempotency sweep each run
as a background task. A task that ended on an unexpected exception would end silently (its
error is only seen at shutdown), and what it kept current would then go stale on this replica
alone: the policy and the CRL fail closed after their maximum age (every request refused until
a restart), due rotations and destructions would stop. So one loop runs them all: a
:class:`~broker.errors.BrokerError` (a backend refused or is away) is a warning, anything else
is logged with its traceback, and the next pass runs on time either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from broker.errors import BrokerError
from broker.log import get_logger

log = get_logger(__name__)


async def every(
    interval: float,
    work: Callable[[], Awaitable[object]],
    *,
    what: str,
    first_wait: bool = False,
    **fields: str,
) -> None:
    """Run ``work`` every ``interval`` seconds until cancelled; no failure ends the loop.

    Failures are logged as ``<what>_failed`` (a broker error: its detail) or ``<what>_crashed``
    (anything else: with its traceback), with ``fields`` added. ``first_wait``: sleep before
    the first pass (when the caller already ran one at start).
    """
    if first_wait:
        await asyncio.sleep(interval)
    while True:
        try:
            await work()
        except BrokerError as exc:
            log.warning(f"{what}_failed", error=exc.detail, **fields)
        except Exception:
            log.exception(f"{what}_crashed", **fields)
        await asyncio.sleep(interval)
