"""The audit log's files on disk: the directory lock, the active segment, rotation, fsync, repair.

A log is a directory of segment files, each named after its first record, that
together hold one hash chain. Only one writer may use a directory (an ``flock`` on
``.lock``). Every method here blocks; the sink calls them on its one I/O thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from broker.audit.chain import FILE_PREFIX, FILE_SUFFIX, GENESIS, file_name, line_hash
from broker.errors import ConfigError


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


class Segments:
    """The directory's segment files and the one being appended to."""

    def __init__(self, directory: Path, *, max_file_bytes: int, max_file_seconds: float) -> None:
        self.directory = directory
        self._max_bytes = max_file_bytes
        self._max_age = max_file_seconds
        self._lock_fh: IO[str] | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._opened_at = 0.0

    @property
    def locked(self) -> bool:
        return self._lock_fh is not None

    @property
    def active(self) -> Path | None:
        """The segment being appended to; None before the first write or after :meth:`abandon`."""
        return self._path

    def lock(self) -> None:
        """Create the directory and take its lock; ConfigError when another broker holds it."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fh = (self.directory / ".lock").open("a")
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

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))

    def chain_end(self) -> tuple[int, str, int]:
        """(last seq, hash of the last complete record, bytes of an unfinished record cut off)."""
        return _chain_end(self.files())

    def hash_of_record(self, seq: int) -> str | None:
        return _hash_of_record(self.files(), seq)

    def sources(self) -> list[tuple[str, Callable[[], Iterator[bytes]]]]:
        """Every segment's name and a function reading its lines afresh, oldest first: for
        verifying or reading a log of any size line by line (:func:`segment_sources`)."""
        return segment_sources(self.files())

    def check_writable(self) -> os.statvfs_result:
        """Raise OSError unless the active segment (or, before one, the directory) takes writes now.

        Returns the file system's free-space figures.
        """
        if self._path is not None:
            os.close(os.open(self._path, os.O_WRONLY | os.O_APPEND))
        else:
            probe_writable(self.directory)
        return os.statvfs(self.directory)

    def abandon(self) -> None:
        """Leave the active segment behind: the next append starts a new one continuing the chain."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self._path, self._size = None, None, 0

    def append(self, lines: list[bytes], first_seq: int) -> None:
        """Append ``lines`` to the active segment (a new one past the size or age limit) and fsync."""
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


def segment_sources(paths: list[Path]) -> list[tuple[str, Callable[[], Iterator[bytes]]]]:
    """(name, line reader) for each file: the reader opens the file when iterated and yields one
    line at a time, so only one line is in memory whatever the file's size."""

    def reader(path: Path) -> Callable[[], Iterator[bytes]]:
        def lines() -> Iterator[bytes]:
            with path.open("rb") as fh:
                yield from fh

        return lines

    return [(p.name, reader(p)) for p in sorted(paths)]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chain_end(files: list[Path]) -> tuple[int, str, int]:
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


def _hash_of_record(files: list[Path], seq: int) -> str | None:
    """The line hash of record ``seq`` (files are named by their first record), or None."""
    candidates = [p for p in files if _first_seq(p) <= seq]
    if not candidates:
        return None
    with candidates[-1].open("rb") as fh:
        for raw in fh:  # line by line: a segment may be large
            line = raw.rstrip(b"\n")
            try:
                if int(json.loads(line)["seq"]) == seq:
                    return line_hash(line)
            except (ValueError, KeyError, TypeError):
                continue
    return None


def _first_seq(path: Path) -> int:
    digits = path.name.removeprefix(FILE_PREFIX).removesuffix(FILE_SUFFIX)
    return int(digits) if digits.isdigit() else 0
