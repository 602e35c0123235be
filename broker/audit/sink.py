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
record, continues the same chain.
Checkpoints: every ``checkpoint_every`` records or ``checkpoint_seconds`` a
checkpoint record signed by the HSM joins the chain and its position is handed to
``on_checkpoint`` (the broker anchors it in Vault).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Protocol

from broker.audit.chain import (
    FILE_PREFIX,
    FILE_SUFFIX,
    GENESIS,
    Anchor,
    canonical,
    checkpoint_digest,
    file_name,
    line_hash,
)
from broker.errors import BrokerError, ConfigError, Unavailable
from broker.keys.model import iso, now_utc
from broker.log import get_logger

log = get_logger(__name__)


class CheckpointSigner(Protocol):
    async def sign_digest(self, digest: bytes) -> bytes:
        """A raw r||s ECDSA P-256 signature of a SHA-256 digest, made in the HSM."""
        ...

    async def public_key_der(self) -> bytes: ...


def probe_writable(directory: Path) -> None:
    """Write, fsync and remove a file in ``directory``; raise OSError if any step fails.

    ``os.access`` is not enough: a full disk or a read-only remount pass it.
    """
    fd, name = tempfile.mkstemp(prefix=".probe-", dir=directory)
    try:
        os.write(fd, b"probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


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
        on_checkpoint: Callable[[Anchor], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.directory = directory
        self.node = node
        self._max_bytes = max_file_bytes
        self._max_age = max_file_seconds
        self._opened_at = 0.0
        self._every = checkpoint_every
        self._interval = checkpoint_seconds
        self._min_free = min_free_bytes
        self._signer = signer
        self._on_checkpoint = on_checkpoint
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-io")
        self._lock_fh: IO[str] | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._seq = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._pending: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._resume_note: str | None = None
        self._last_repair = 0.0
        self._anchor_tasks: set[asyncio.Task[None]] = set()
        self.records_written = 0
        self.batches_written = 0

    # -- start and stop -----------------------------------------------------------------

    async def start(self) -> None:
        """Take the directory's lock, find the chain's end, write a ``start`` record."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._open_directory)
        self._writer = asyncio.create_task(self._write_loop(), name="audit-writer")
        try:
            await self.append({"type": "start", "node": self.node})
        except BrokerError as exc:
            log.error("audit_unwritable_at_start", error=exc.detail)  # noqa: TRY400 - the detail says it all

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        for task in list(self._anchor_tasks):
            with contextlib.suppress(Exception):
                await task
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._io, self._close_files)
        self._io.shutdown(wait=True)

    def _close_files(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def _open_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fh = (self.directory / ".lock").open("a")
        except OSError as exc:
            self._broken = f"cannot open the audit directory {self.directory}: {exc.strerror}"
            return
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            self._lock_fh = None
            raise ConfigError(
                f"another broker writes the audit log in {self.directory}; give each replica its own "
                "audit.directory (one hash chain per writer)",
                key="audit.directory",
            ) from None
        files = self.files_on_disk()
        if not files:
            return
        self._seq, self._head, discarded = _chain_end(files)
        if discarded:
            self._resume_note = f"discarded {discarded} bytes of an unfinished record at restart"

    def files_on_disk(self) -> list[Path]:
        return sorted(self.directory.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))

    # -- fail closed ------------------------------------------------------------------

    def check_ready(self) -> None:
        """Raise 503 unless a record could be written now. Cheap: a few system calls."""
        if self._broken is not None:
            if time.monotonic() - self._last_repair < 0.5:
                raise Unavailable(f"audit log unavailable: {self._broken}", backend="audit")
            self._last_repair = time.monotonic()
            self._repair()
        try:
            if self._path is not None:
                os.close(os.open(self._path, os.O_WRONLY | os.O_APPEND))
            else:
                probe_writable(self.directory)
            free = os.statvfs(self.directory)
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
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._path, self._size = None, None, 0
        try:
            probe_writable(self.directory)
        except OSError as exc:
            self._broken = f"{exc.strerror}: {self.directory}"
            return
        self._broken = None
        self._resume_note = f"resumed after: {reason}"
        log.warning("audit_log_resumed", after=reason)

    def status(self) -> dict[str, Any]:
        try:
            self.check_ready()
        except Unavailable as exc:
            return {"ok": False, "directory": str(self.directory), "error": exc.detail}
        return {
            "ok": True,
            "directory": str(self.directory),
            "seq": self._seq,
            "file": self._path.name if self._path else None,
        }

    def head(self) -> Anchor:
        return Anchor(self._seq, self._head)

    # -- writing ----------------------------------------------------------------------

    async def append(self, record: dict[str, Any]) -> int:
        """Queue one record and return its seq once it is on disk; 503 if it could not be written."""
        if self._writer is None:
            raise Unavailable("audit log unavailable: the sink is not started", backend="audit")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((record, future))
        self._wake.set()
        return await future

    async def _write_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            unsigned = self._since_checkpoint + len(batch)
            due = unsigned >= self._every or (
                unsigned > 0 and time.monotonic() - self._last_checkpoint >= self._interval
            )
            if not batch and not due:
                continue
            await self._commit(batch, checkpoint=due)

    async def _commit(
        self, batch: list[tuple[dict[str, Any], asyncio.Future[int]]], *, checkpoint: bool
    ) -> None:
        seq, head = self._seq, self._head
        lines: list[bytes] = []
        stamped = str(iso(now_utc()))

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
                lines.append(await self._checkpoint_line(seq + 1, head, stamped))
            except BrokerError as exc:
                # The records still go to disk; the next batch tries the checkpoint again.
                log.warning("audit_checkpoint_failed", error=exc.detail)
                checkpoint = False
            else:
                seq, head = seq + 1, line_hash(lines[-1])
        first = self._seq + 1
        try:
            await asyncio.get_running_loop().run_in_executor(self._io, self._write, lines, first)
        except OSError as exc:
            self._mark_broken(f"{exc.strerror}: {exc.filename or self._path}")
            error = Unavailable(f"audit log unavailable: {self._broken}", backend="audit")
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            return
        self._resume_note = None
        self._seq, self._head = seq, head
        self.records_written += len(lines)
        self.batches_written += 1
        self._since_checkpoint = 0 if checkpoint else self._since_checkpoint + len(lines)
        if checkpoint:
            self._last_checkpoint = time.monotonic()
            self._anchor(Anchor(seq, head))
        for (_, future), number in zip(batch, numbers, strict=True):
            if not future.done():
                future.set_result(number)

    async def _checkpoint_line(self, seq: int, head: str, stamped: str) -> bytes:
        if self._signer is None:
            raise Unavailable("no checkpoint signer", backend="audit")
        body: dict[str, Any] = {
            "type": "checkpoint",
            "node": self.node,
            "time": stamped,
            "seq": seq,
            "prev": head,
            "head": head,
        }
        signature = await self._signer.sign_digest(checkpoint_digest(body))
        return canonical({**body, "signature": base64.b64encode(signature).decode()})

    def _anchor(self, anchor: Anchor) -> None:
        if self._on_checkpoint is None:
            return
        task = asyncio.create_task(self._on_checkpoint(anchor))
        self._anchor_tasks.add(task)
        task.add_done_callback(self._anchor_tasks.discard)

    def _write(self, lines: list[bytes], first_seq: int) -> None:
        """Blocking: append ``lines`` to the active file (a new one past the size limit) and fsync."""
        data = b"".join(line + b"\n" for line in lines)
        too_old = time.monotonic() - self._opened_at >= self._max_age
        if self._fd is not None and (
            self._size >= self._max_bytes or too_old or os.fstat(self._fd).st_nlink == 0
        ):
            # Rotated by size or age, or the active file was removed under us: never write into an
            # unlinked inode.
            os.close(self._fd)
            self._fd = None
        if self._fd is None:
            path = self.directory / file_name(first_seq)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            self._path, self._size, self._opened_at = path, 0, time.monotonic()
            _fsync_directory(self.directory)
        try:
            written = os.write(self._fd, data)
            if written == len(data):
                os.fsync(self._fd)
        except OSError:
            self._cut_back()
            raise
        if written != len(data):
            self._cut_back()
            raise OSError(28, "short write to the audit log", str(self._path))
        self._size += len(data)

    def _cut_back(self) -> None:
        """Leave no half record behind after a failed write."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)

    # -- reading ----------------------------------------------------------------------

    def read_files(self) -> list[tuple[str, bytes]]:
        """Every log file's name and content, oldest first (blocking; call off the loop)."""
        return [(p.name, p.read_bytes()) for p in self.files_on_disk()]

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._io

    @property
    def signer(self) -> CheckpointSigner | None:
        return self._signer


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chain_end(files: list[Path]) -> tuple[int, str, int]:
    """(last seq, hash of the last complete record, bytes of an unfinished record cut off)."""
    discarded = 0
    for path in reversed(files):
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A crash mid-write: that record was never acknowledged; cut it so the file stays valid.
            discarded += len(data) - end
            with path.open("r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())
            data = data[:end]
        lines = data.split(b"\n")[:-1]
        if lines:
            last = lines[-1]
            return int(json.loads(last)["seq"]), line_hash(last), discarded
    return 0, GENESIS, discarded
