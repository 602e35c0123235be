"""Checkpoints of the audit chain: when one is due, signing it in the HSM, anchoring it in Vault.

Every ``every`` records or ``interval`` seconds a checkpoint record signed by the
HSM joins the chain, and its position is anchored in Vault (:class:`AnchorStore`),
in checkpoint order so the anchor only moves forward. ``max_failures`` checkpoints
in a row that cannot be signed or anchored set :attr:`Checkpoints.halt`: the sink
refuses requests until one succeeds. A failing signer or Vault is retried once per
interval, not on every batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from typing import Any, Protocol

from broker.audit.chain import Anchor, canonical, checkpoint_digest
from broker.errors import BrokerError, Unavailable
from broker.log import get_logger

log = get_logger(__name__)


class AnchorConflict(Exception):
    """Vault's anchor is not one this writer may move forward from (another epoch, or ahead)."""


class AnchorStore(Protocol):
    """Where checkpoint positions are kept outside the log (Vault KV, check-and-set)."""

    async def read(self) -> dict[str, Any] | None:
        """The anchor document (``seq``, ``hash``, ``epoch``, ``epochs``) or None."""
        ...

    async def advance(self, epoch: str, mark: Anchor) -> None:
        """Move the anchor forward within ``epoch``; AnchorConflict if it is elsewhere or ahead."""
        ...

    async def begin_epoch(
        self, expected: dict[str, Any] | None, entry: dict[str, Any], mark: Anchor
    ) -> dict[str, Any]:
        """Start epoch ``entry['epoch']`` at ``mark`` if the anchor is still ``expected``."""
        ...


class CheckpointSigner(Protocol):
    async def sign_digest(self, digest: bytes) -> bytes:
        """A raw r||s ECDSA P-256 signature of a SHA-256 digest, made in the HSM."""
        ...

    async def public_key_der(self) -> bytes: ...


class Checkpoints:
    """The checkpoint schedule and the anchor of one node's chain."""

    def __init__(
        self,
        node: str,
        *,
        signer: CheckpointSigner | None,
        anchors: AnchorStore | None,
        every: int,
        interval: float,
        max_failures: int,
    ) -> None:
        self.node = node
        self.signer = signer
        self.interval = interval
        self._anchors = anchors
        self._every = every
        self._max_failures = max(1, max_failures)
        self.failures = 0
        # Set after too many failed checkpoints: requests are refused until a checkpoint succeeds.
        self.halt: str | None = None
        # Records written since the last checkpoint, and when the last one was written or tried.
        self._since = 0
        self._last = time.monotonic()
        self._last_try = 0.0
        # The highest record anchored in Vault (or found there at start).
        self.anchored_seq = 0
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def due(self, pending: int) -> bool:
        """Whether the next batch (``pending`` records) should end with a checkpoint."""
        now = time.monotonic()
        if self.failures > 0:
            # A failing HSM or Vault is retried once per interval, not on every batch.
            return now - self._last_try >= self.interval
        unsigned = self._since + pending
        return unsigned >= self._every or (unsigned > 0 and now - self._last >= self.interval)

    async def line(self, seq: int, head: str, stamped: str) -> bytes:
        """The signed checkpoint record ``seq`` over the chain's ``head``; a failure is counted."""
        self._last_try = time.monotonic()
        body: dict[str, Any] = {
            "type": "checkpoint",
            "node": self.node,
            "time": stamped,
            "seq": seq,
            "prev": head,
            "head": head,
        }
        try:
            signature = await self._sign(checkpoint_digest(body))
        except BrokerError as exc:
            self.failed(f"signing a checkpoint failed: {exc.detail}")
            raise
        except Exception as exc:
            self.failed(f"signing a checkpoint failed: {type(exc).__name__}")
            raise
        return canonical({**body, "signature": base64.b64encode(signature).decode()})

    async def _sign(self, digest: bytes) -> bytes:
        if self.signer is None:
            raise Unavailable("no checkpoint signer", backend="audit")
        return await self.signer.sign_digest(digest)

    def written(self, records: int, checkpoint: Anchor | None, epoch: str) -> None:
        """Bookkeeping once a batch is on disk; a checkpoint in it is anchored in the background."""
        if checkpoint is None:
            self._since += records
            return
        self._since = 0
        self._last = time.monotonic()
        if self._anchors is None:
            self.succeeded()
            return
        task = asyncio.create_task(self._advance(checkpoint, epoch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _advance(self, mark: Anchor, epoch: str) -> None:
        if self._anchors is None:
            return
        async with self._lock:  # in checkpoint order, so the anchor only moves forward
            if mark.seq <= self.anchored_seq:
                return
            try:
                await self._anchors.advance(epoch, mark)
            except AnchorConflict as exc:
                # Someone else moves this node's anchor: another writer with the same node name, or a
                # replayed log. Stop at once rather than count.
                self.failures = self._max_failures
                self.halt = f"Vault's audit anchor for node {self.node} moved elsewhere: {exc}"
                log.error("audit_anchor_conflict", reason=str(exc))  # noqa: TRY400 - no traceback helps
                return
            except Exception as exc:  # noqa: BLE001 - any failure counts toward stopping the log
                detail = exc.detail if isinstance(exc, BrokerError) else type(exc).__name__
                self.failed(f"anchoring record {mark.seq} in Vault failed: {detail}")
                return
            self.anchored_seq = mark.seq
            self.succeeded()

    def failed(self, reason: str) -> None:
        self.failures += 1
        log.warning("audit_checkpoint_failed", error=reason, in_a_row=self.failures)
        if self.failures >= self._max_failures:
            if self.halt is None:
                log.error("audit_checkpoints_failing", reason=reason)
            self.halt = (
                f"{self.failures} checkpoints in a row could not be signed or anchored "
                f"(last: {reason}); requests are refused until one succeeds"
            )

    def succeeded(self) -> None:
        if self.halt is not None:
            log.warning("audit_checkpoints_resumed", after=self.halt)
        self.failures = 0
        self.halt = None

    async def drain(self) -> None:
        """Wait for the anchor writes still in flight (at close)."""
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
