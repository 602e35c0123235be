"""The audit sink: hash-chained JSON lines, group-committed and fsynced before any response.

Durability: a request's record is written and ``fsync``-ed before its response
leaves the broker. Records of concurrent requests are committed together (group
commit): one writer task takes everything queued, writes it in one ``write`` and
one ``fsync`` off the event loop, then releases all those requests at once. So the
cost of an fsync is shared, not paid per request (bench/ measures it).

Fail closed: :meth:`AuditSink.check_ready` runs before a request is handled, so
when the log cannot be written (file made immutable or unwritable, removed, disk
below ``min_free_bytes``, or the last write failed) the request is refused with
503 before any backend is touched. If a write fails after the operation ran, the
caller gets 503 instead of its answer. Service resumes by itself once the
directory is writable again, continuing the chain in a new file.

Rotation: a file is closed once it passes ``max_file_bytes`` or is older than
``max_file_seconds``, at a batch boundary; the next file, named after its first
record, continues the same chain. The files themselves (lock, rotation, fsync,
repair, finding the chain's end) are :mod:`broker.audit.segments`; this module is
the commit protocol and the fail-closed checks; :mod:`broker.audit.checkpoints` decides,
signs and anchors checkpoints.
Checkpoints: every ``checkpoint_every`` records or ``checkpoint_seconds`` a
checkpoint record signed by the HSM joins the chain and its position is anchored in
Vault (:class:`AnchorStore`). ``checkpoint_max_failures`` checkpoints in a row that
cannot be signed or anchored make the log unavailable until one succeeds.

Background records: the backend calls the broker makes outside any request (its
upkeep) are listed, by the backend's own call ids, in ``background`` records the writer
adds to the next batch (woken by the call), so the merged
timeline can tell the broker's upkeep from someone else using its Vault identity.

The writer never dies: any error while building, signing or writing a batch fails
that batch's requests with 503, marks the log unavailable (health says why) and the
next request after a short pause starts a new file continuing the chain. No request
waits longer than ``write_timeout_seconds`` for its record.

History cannot be restarted silently: at start the local chain must contain the
record Vault's anchor names. A wiped, truncated or replaced directory keeps the log
unavailable (nothing is written, so no second chain begins) until an administrator
starts a new, named epoch (:meth:`AuditSink.begin_epoch`), whose first record says
who, why and which anchor it supersedes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker import spans
from broker.audit.chain import (
    GENESIS,
    Anchor,
    canonical,
    line_hash,
)
from broker.audit.checkpoints import AnchorConflict, AnchorStore, Checkpoints, CheckpointSigner
from broker.audit.events import backend_call
from broker.audit.segments import Segments, probe_writable
from broker.errors import BrokerError, Conflict, Unavailable
from broker.log import get_logger
from broker.requestvars import on_background_call, restore_background_calls, take_background_calls
from broker.timeutil import iso, now_utc

log = get_logger(__name__)


INITIAL_EPOCH = "initial"
BACKGROUND_CALLS_PER_RECORD = 256
NEW_EPOCH_HINT = "keybroker audit new-epoch --name NAME --reason TEXT"


class AuditSink:
    def __init__(
        self,
        directory: Path,
        *,
        node: str = "broker",
        max_file_bytes: int = 64 * 1024 * 1024,
        max_file_seconds: float = 86400.0,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 10.0,
        min_free_bytes: int = 16 * 1024 * 1024,
        signer: CheckpointSigner | None = None,
        anchors: AnchorStore | None = None,
        checkpoint_max_failures: int = 3,
        write_timeout_seconds: float = 10.0,
    ) -> None:
        self.directory = directory
        self.node = node
        self._files = Segments(directory, max_file_bytes=max_file_bytes, max_file_seconds=max_file_seconds)
        self._checkpoints = Checkpoints(
            node,
            signer=signer,
            anchors=anchors,
            every=checkpoint_every,
            interval=checkpoint_seconds,
            max_failures=checkpoint_max_failures,
        )
        self._min_free = min_free_bytes
        self._anchors = anchors
        self._write_timeout = write_timeout_seconds
        # Set when the log cannot be written without forking history (Vault's anchor is not in the
        # local chain, or could not be read): nothing is written until it clears.
        self._fork_guard: str | None = None
        self._conflict: dict[str, Any] | None = None
        self._anchor_checked = anchors is None
        self._batch_started: float | None = None
        self.epoch = INITIAL_EPOCH
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-io")
        self._seq = 0
        self._head = GENESIS
        self._pending: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._resume_note: str | None = None
        self._last_repair = 0.0
        self.records_written = 0
        self.batches_written = 0
        self._stop_listening: Callable[[], None] = lambda: None
        self._anchor_lock = asyncio.Lock()

    # -- start and stop -----------------------------------------------------------------

    async def start(self) -> None:
        """Take the directory's lock, find the chain's end, write a ``start`` record."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._open_directory)
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")

        # A background call is written down at once rather than at the next interval.
        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to write
                loop.call_soon_threadsafe(self._wake.set)

        self._stop_listening = on_background_call(wake)
        await self._check_anchor()
        if self._fork_guard is not None:
            return
        try:
            await self.append({"type": "start", "node": self.node})
        except BrokerError as exc:
            log.error("audit_unwritable_at_start", error=exc.detail)  # noqa: TRY400 - the detail says it all

    async def close(self) -> None:
        self._stop_listening()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._checkpoints.drain()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._files.close)
        self._io.shutdown(wait=True)

    def _open_directory(self) -> None:
        try:
            self._files.lock()
        except OSError as exc:
            self._broken = f"cannot open the audit directory {self.directory}: {exc.strerror}"
            return
        self._seq, self._head, discarded = self._files.chain_end()
        if discarded:
            cut = f"discarded {discarded} bytes of an unfinished record at restart"
            self._resume_note = f"{self._resume_note}; {cut}" if self._resume_note else cut

    def note_restart(self, why: str) -> None:
        """Before :meth:`start`: the chain's next records begin with a ``resume`` record saying why
        this writer starts again (its supervisor restarted it after it was killed, say)."""
        self._resume_note = why

    def _reopen_directory(self) -> None:
        self._open_directory()
        if self._files.locked:
            self._broken = None

    def files_on_disk(self) -> list[Path]:
        return self._files.files()

    # -- fail closed ------------------------------------------------------------------

    def check_ready(self) -> None:
        """Raise 503 unless a record could be written now. Cheap: a few system calls."""
        for reason in (self._fork_guard, self._checkpoints.halt):
            if reason is not None:
                raise Unavailable(f"audit log unavailable: {reason}", backend="audit")
        if self._batch_started is not None and time.monotonic() - self._batch_started > self._write_timeout:
            raise Unavailable(
                f"audit log unavailable: the writer has been stuck on one batch for more than "
                f"{self._write_timeout:g} s (checkpoint signing or the disk does not answer)",
                backend="audit",
            )
        if self._broken is not None:
            if time.monotonic() - self._last_repair < 0.5:
                raise Unavailable(f"audit log unavailable: {self._broken}", backend="audit")
            self._last_repair = time.monotonic()
            self._repair()
        try:
            free = self._files.check_writable()
        except OSError as exc:
            self._mark_broken(f"{exc.strerror}: {exc.filename or self.directory}")
            raise Unavailable(f"audit log unavailable: {self._broken}", backend="audit") from None
        if free.f_bavail * free.f_frsize < self._min_free:
            raise Unavailable(
                f"audit log unavailable: less than {self._min_free} bytes free in {self.directory}",
                backend="audit",
            )

    def _mark_broken(self, reason: str) -> None:
        if self._broken is None:
            log.error("audit_log_broken", reason=reason)
        self._broken = reason
        self._last_repair = time.monotonic()

    def _repair(self) -> None:
        """Leave the old file behind; the next write starts a new one that continues the chain."""
        reason = self._broken
        self._files.abandon()
        try:
            probe_writable(self.directory)
        except OSError as exc:
            self._broken = f"{exc.strerror}: {self.directory}"
            return
        self._broken = None
        self._resume_note = f"resumed after: {reason}"
        log.warning("audit_log_resumed", after=reason)

    def status(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "directory": str(self.directory),
            "epoch": self.epoch,
            "checkpoint_failures": self._checkpoints.failures,
        }
        try:
            self.check_ready()
        except Unavailable as exc:
            return {"ok": False, **facts, "error": exc.detail}
        return {
            "ok": True,
            **facts,
            "seq": self._seq,
            "file": active.name if (active := self._files.active) else None,
        }

    @property
    def awaiting_epoch(self) -> bool:
        """The local chain does not contain Vault's anchor: only a new epoch lets the log resume."""
        return self._conflict is not None

    def head(self) -> Anchor:
        return Anchor(self._seq, self._head)

    # -- writing ----------------------------------------------------------------------

    async def append(self, record: dict[str, Any]) -> int:
        """Queue one record and return its seq once it is on disk; 503 if it could not be written."""
        if self._writer is None:
            raise Unavailable("audit log unavailable: the sink is not started", backend="audit")
        if self._fork_guard is not None:
            raise Unavailable(f"audit log unavailable: {self._fork_guard}", backend="audit")
        return await self._enqueue(record)

    async def _enqueue(self, record: dict[str, Any]) -> int:
        if self._writer is None or self._writer.done():
            # Never expected (the loop catches everything), but a dead writer must not hang requests.
            log.error("audit_writer_restarted")
            self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        entry = (record, future)
        self._pending.append(entry)
        self._wake.set()
        # One timer per record, not wait_for(shield(...)) (three futures and a task wrapper each):
        # on expiry the record leaves the queue if the writer has not taken it yet, and the
        # caller hears 503; a batch already being written still sets nothing on a done future.
        timer = loop.call_later(self._write_timeout, self._expire, entry)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, entry: tuple[dict[str, Any], asyncio.Future[int]]) -> None:
        self._pending = [e for e in self._pending if e is not entry]
        if not entry[1].done():
            entry[1].set_exception(
                Unavailable(
                    f"audit log unavailable: the record was not on disk within {self._write_timeout:g} s",
                    backend="audit",
                )
            )

    async def _write_loop(self) -> None:
        while True:
            try:
                await self._write_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the writer must outlive any single failure
                log.exception("audit_writer_error")
                await asyncio.sleep(0.1)

    async def _write_once(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._checkpoints.interval):
                await self._wake.wait()
        self._wake.clear()
        if self._anchor_lock.locked():
            # The chain is being checked against Vault's anchor (whose read wakes this loop): write
            # nothing until it is known not to fork history; the check wakes the loop when done.
            return
        if not self._anchor_checked:
            if not self._files.locked:
                # The directory could not be opened at start: its chain end is still unknown.
                await asyncio.get_running_loop().run_in_executor(self._io, self._reopen_directory)
            await self._check_anchor()
            if self._fork_guard is None:
                self._pending.insert(0, ({"type": "start", "node": self.node}, self._orphan_future()))
        batch, self._pending = self._pending, []
        due = self._fork_guard is None and self._checkpoints.due(len(batch))
        taken = take_background_calls() if self._fork_guard is None else ([], None, 0)
        upkeep = [(record, self._orphan_future()) for record in self._background_records(*taken)]
        batch += upkeep
        if not batch and not due:
            return
        self._batch_started = time.monotonic()
        try:
            await self._commit(batch, checkpoint=due)
        except Exception as exc:
            log.exception("audit_batch_failed")
            self._mark_broken(f"the audit writer could not write a batch ({type(exc).__name__}: {exc})")
            error = Unavailable(f"audit log unavailable: {self._broken}", backend="audit")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
        finally:
            self._batch_started = None
        if upkeep and not all(f.done() and not f.cancelled() and f.exception() is None for _, f in upkeep):
            # Not on disk: the next background record lists these calls (else they would look unexplained).
            restore_background_calls(*taken)

    def _background_records(
        self, calls: list[tuple[str, str, str]], since: str | None, dropped: int
    ) -> list[dict[str, Any]]:
        """``background`` records claiming the backend calls the broker made outside any request.

        Policy refresh, token renewal, the key scheduler, grant purges and audit anchors call
        Vault on their own; these records list Vault's request ids for those calls, so the
        merged timeline explains them without trusting any request id header. At most
        :data:`BACKGROUND_CALLS_PER_RECORD` calls each, so a record stays small.
        """
        if not calls and not dropped:
            return []
        step = BACKGROUND_CALLS_PER_RECORD
        chunks = [calls[i : i + step] for i in range(0, len(calls), step)] or [[]]
        records: list[dict[str, Any]] = [
            {
                "type": "background",
                "node": self.node,
                "since": since,
                "backend_calls": [backend_call(*call) for call in chunk],
            }
            for chunk in chunks
        ]
        if dropped:
            records[-1]["dropped"] = dropped
        return records

    @staticmethod
    def _orphan_future() -> asyncio.Future[int]:
        """A future nobody awaits (a record the sink writes on its own); its error is only logged."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _commit(
        self, batch: list[tuple[dict[str, Any], asyncio.Future[int]]], *, checkpoint: bool
    ) -> None:
        seq, head = self._seq, self._head
        lines: list[bytes] = []
        stamped = iso(now_utc())

        def add(record: dict[str, Any]) -> None:
            nonlocal seq, head
            seq += 1
            line = canonical({"time": stamped, **record, "seq": seq, "prev": head})
            lines.append(line)
            head = line_hash(line)

        if self._resume_note is not None:
            add({"type": "resume", "node": self.node, "note": self._resume_note})
        numbers = []
        for record, _ in batch:
            add(record)
            numbers.append(seq)
        if checkpoint:
            try:
                lines.append(await self._checkpoints.line(seq + 1, head, stamped))
            except BrokerError:
                # Counted as a failure; the records still go to disk and the next interval tries again.
                checkpoint = False
            else:
                seq, head = seq + 1, line_hash(lines[-1])
        first = self._seq + 1
        writing = spans.now()
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self._files.append, lines, first)
        except OSError as exc:
            self._mark_broken(f"{exc.strerror}: {exc.filename or self._files.active}")
            error = Unavailable(f"audit log unavailable: {self._broken}", backend="audit")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        # From here on the lines are on disk: only bookkeeping that cannot fail.
        spans.STATE.last_write_ns = spans.now() - writing
        self._resume_note = None
        self._seq, self._head = seq, head
        self.records_written += len(lines)
        self.batches_written += 1
        # Background records alone do not make a checkpoint due: signing and anchoring one calls the
        # HSM and Vault, whose record would make the next one due, forever, on an idle broker.
        upkeep = sum(1 for record, _ in batch if record.get("type") == "background")
        self._checkpoints.written(len(lines) - upkeep, Anchor(seq, head) if checkpoint else None, self.epoch)
        for (_, future), number in zip(batch, numbers, strict=True):
            if not future.done():
                future.set_result(number)

    async def _check_anchor(self) -> None:
        """Refuse to write (and so to fork history) unless the local chain holds Vault's anchor."""
        async with self._anchor_lock:
            await self._check_anchor_now()
        self._wake.set()  # what arrived meanwhile (a background call) is written now

    async def _check_anchor_now(self) -> None:
        if self._anchors is None:
            return
        if not self._files.locked:
            self._fork_guard = (
                f"cannot open the audit directory to check it against Vault's anchor ({self._broken}); "
                "retrying"
            )
            return
        try:
            doc = await self._anchors.read()
        except Exception as exc:  # noqa: BLE001 - unread means unchecked: keep the log closed
            detail = exc.detail if isinstance(exc, BrokerError) else type(exc).__name__
            self._fork_guard = f"cannot read this node's audit anchor from Vault ({detail}); retrying"
            return
        self._anchor_checked = True
        self._fork_guard, self._conflict = None, None
        if doc is None:
            return
        self.epoch = str(doc.get("epoch") or INITIAL_EPOCH)
        mark = Anchor(int(doc["seq"]), str(doc["hash"]))
        self._checkpoints.anchored_seq = mark.seq
        loop = asyncio.get_running_loop()
        try:
            problem = await loop.run_in_executor(self._io, self._find_anchor, mark)
        except OSError as exc:
            self._anchor_checked = False
            self._fork_guard = f"cannot read the audit files to check Vault's anchor ({exc.strerror}); retry"
            return
        if problem is None:
            return
        self._conflict = doc
        self._fork_guard = (
            f"{problem}, but Vault's anchor for node {self.node} names record {mark.seq} of epoch "
            f"{self.epoch}: the audit log was wiped, truncated or replaced (or another broker uses node "
            f"name {self.node}: give each replica its own audit.node). Restore the files, or have an "
            f"administrator start a new epoch: {NEW_EPOCH_HINT}"
        )
        log.error("audit_history_missing", reason=self._fork_guard)

    def _find_anchor(self, mark: Anchor) -> str | None:
        """Blocking: None if the local chain has record ``mark.seq`` with ``mark.hash``, else the flaw."""
        if self._seq == 0:
            return f"the audit directory {self.directory} holds no records"
        if self._seq < mark.seq:
            return f"the audit log in {self.directory} ends at record {self._seq}"
        found = self._files.hash_of_record(mark.seq)
        if found != mark.hash:
            return f"record {mark.seq} in {self.directory} is not the one anchored"
        return None

    async def begin_epoch(self, name: str, *, by: str, reason: str) -> dict[str, Any]:
        """Start a named epoch after lost history: its record says who, why and what it supersedes."""
        if self._anchors is None or self._conflict is None:
            raise Conflict("the audit log agrees with Vault's anchor; there is no lost history to supersede")
        previous = self._conflict
        known = {str(e.get("epoch")) for e in previous.get("epochs") or []} | {self.epoch}
        if name in known:
            raise Conflict(f"epoch {name!r} was used before on node {self.node}; choose a new name")
        supersedes = {"epoch": self.epoch, "seq": int(previous["seq"]), "hash": str(previous["hash"])}
        record = {
            "type": "epoch",
            "node": self.node,
            "epoch": name,
            "by": by,
            "reason": reason,
            "supersedes": supersedes,
            "found": self._fork_guard,
        }
        await self._enqueue(record)
        entry = {
            "epoch": name,
            "started": iso(now_utc()),
            "by": by,
            "reason": reason,
            "first_seq": self._seq,
            "supersedes": supersedes,
        }
        try:
            written = await self._anchors.begin_epoch(previous, entry, Anchor(self._seq, self._head))
        except AnchorConflict as exc:
            raise Conflict(f"Vault's audit anchor changed meanwhile ({exc}); check it and retry") from None
        self.epoch, self._checkpoints.anchored_seq = name, self._seq
        self._conflict, self._fork_guard = None, None
        self._checkpoints.succeeded()
        log.warning("audit_epoch_started", epoch=name, by=by, supersedes=supersedes)
        return written

    # -- reading ----------------------------------------------------------------------

    def sources(self) -> list[tuple[str, Callable[[], Iterator[bytes]]]]:
        """Every log file's name and a line reader, oldest first: reading streams (off the loop)."""
        return self._files.sources()

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._io

    @property
    def signer(self) -> CheckpointSigner | None:
        return self._checkpoints.signer
