"""The merged timeline (``/v1/audit/events``, ``audit query``, ``audit merge``) in bounded memory.

Design, chosen over a time-sorted rebuild per page (which held every row of a 1M-record
log, and whose "last row's time" cursor could skip rows when a record's wall-clock time
stepped back):

* **Order is a k-way merge** (a heap holding one head row per source) of per-source
  streams, each read in its own file order: every broker chain (segment files in name
  order, then line order) and Vault's log (each request id at its first line). A row
  with a step-back time just comes out early; it is never dropped or repeated.
* **The cursor is the merge's whole state**: for each source, the byte position of the
  next unread entry (a chain's position is the first record number of its segment, which
  names the file among the listed ones, never a path, plus the offset of a line start).
  The rows after a cursor are a function of that vector and the bytes of append-only
  files, so a walk page by page yields exactly the rows, in exactly the order, of one
  unpaged walk: none skipped, none repeated. A cursor comes back from a client as
  hostile input: its size is bounded, it carries an HMAC under a key derived from the
  broker's audit HMAC key and bound to its node (tampered or foreign: 400), and every
  position is checked against the files before use (a known segment, a line start, not
  past what was indexed).
* **The join goes through an on-disk index** (stdlib ``sqlite3``, ``.timeline-index.sqlite``
  beside the segments, 0600): Vault entries by request id with the byte offsets of their
  lines (no Vault content beyond the id, the X-Request-Id and the path the join needs),
  the ids broker records claim, and which entry each unnumbered note took. It is built
  incrementally (bytes already indexed per file) and rebuilt whenever it is missing,
  unreadable, or a file shrank or was replaced. It is derived data: rows and evidence are
  read from the logs themselves; the index only says where and what joins.
* **Filters** are applied while streaming; a source no row of which can match (source=broker
  skips Vault, source=vault|bypass skips the chains) is not read at all.

Memory per page or per full walk: one head row per source, the page, and sqlite's page
cache; it does not grow with the log. The join rules are those of :mod:`broker.audit.merge`
with one difference in a case no sound log has: an unnumbered note is resolved when its
record is indexed, so an id claim indexed later for the same Vault entry (which a caller
copying the broker's header, path and time could arrange) shows that entry under both.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import heapq
import hmac
import os
import re
import sqlite3
import struct
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from broker.audit import merge
from broker.audit.chain import FILE_PREFIX, FILE_SUFFIX

INDEX_NAME = ".timeline-index.sqlite"
SCHEMA = "2"
MAX_CURSOR_CHARS = 512
# A chain's position: (first record number of its segment file, byte offset of a line start).
Position = tuple[int, int]
_CURSOR_VERSION = 1
_MAC_BYTES = 16
_CURSOR_TEXT = re.compile(r"[A-Za-z0-9_-]{1,512}")


class CursorError(ValueError):
    """A cursor this broker did not give out, or one that no longer fits its files."""


@dataclass(frozen=True)
class Chain:
    """One writer's hash chain: its segment files in ``directory``; ``node`` names it when the
    timeline holds several (``serve --workers``), and is empty otherwise."""

    node: str
    directory: Path

    def segments(self) -> list[Path]:
        return sorted(self.directory.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))


def _first_seq(path: Path) -> int:
    digits = path.name.removeprefix(FILE_PREFIX).removesuffix(FILE_SUFFIX)
    return int(digits) if digits.isdigit() else 0


@dataclass(frozen=True)
class Cursor:
    """Where a walk stands: per chain the position of its next unread line, and Vault's offset."""

    chains: tuple[Position, ...]
    vault: int
    vault_tag: int = 0  # which Vault log file the offset is in (its device and inode, hashed)


def cursor_key(audit_hmac_key: bytes, node: str) -> bytes:
    """The cursor MAC key: derived from the audit HMAC key and bound to this broker's node."""
    return hmac.new(
        audit_hmac_key, b"keybroker timeline cursor v1\0" + node.encode(), hashlib.sha256
    ).digest()


def encode_cursor(cursor: Cursor, key: bytes) -> str:
    payload = struct.pack(">BB", _CURSOR_VERSION, len(cursor.chains))
    payload += b"".join(struct.pack(">QQ", seq, off) for seq, off in cursor.chains)
    payload += struct.pack(">QI", cursor.vault, cursor.vault_tag)
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()


def decode_cursor(text: str, key: bytes, chains: int) -> Cursor:
    """The cursor ``text`` names; CursorError unless this broker made it for ``chains`` chains."""
    if len(text) > MAX_CURSOR_CHARS or _CURSOR_TEXT.fullmatch(text) is None:
        raise CursorError("not a cursor")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise CursorError("not a cursor") from None
    payload, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
    expected = hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    if len(raw) <= _MAC_BYTES + 2 or not hmac.compare_digest(mac, expected):
        raise CursorError("not a cursor this broker gave out")
    version, count = struct.unpack_from(">BB", payload)
    if version != _CURSOR_VERSION or len(payload) != 2 + 16 * count + 12:
        raise CursorError("not a cursor this broker gave out")
    if count != chains:
        raise CursorError("the cursor was made when the broker had another number of audit chains")
    positions = tuple(struct.unpack_from(">QQ", payload, 2 + 16 * i) for i in range(count))
    vault, tag = struct.unpack_from(">QI", payload, 2 + 16 * count)
    return Cursor(tuple((int(s), int(o)) for s, o in positions), int(vault), int(tag))


def start_cursor(chains: int) -> Cursor:
    return Cursor(tuple((0, 0) for _ in range(chains)), 0)


# -- the index ---------------------------------------------------------------------------

_DDL = """
CREATE TABLE meta(k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE seg(chain TEXT NOT NULL, name TEXT NOT NULL, done INTEGER NOT NULL, ino INTEGER NOT NULL,
                 PRIMARY KEY(chain, name));
CREATE TABLE vault(vid TEXT PRIMARY KEY, first INTEGER NOT NULL, offs TEXT NOT NULL, time TEXT NOT NULL,
                   t REAL NOT NULL, mine INTEGER NOT NULL, sent TEXT, path TEXT);
CREATE INDEX vault_first ON vault(first);
CREATE INDEX vault_sent ON vault(sent, path);
CREATE TABLE claim(vid TEXT PRIMARY KEY);
CREATE TABLE noted(chain TEXT NOT NULL, name TEXT NOT NULL, off INTEGER NOT NULL, vid TEXT NOT NULL);
CREATE INDEX noted_record ON noted(chain, name, off);
"""
_UPSERT_VAULT = (
    "INSERT INTO vault(vid, first, offs, time, t, mine, sent, path) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) "
    "ON CONFLICT(vid) DO UPDATE SET offs = vault.offs || ',' || excluded.offs, "
    "mine = CASE WHEN ?9 THEN excluded.mine ELSE vault.mine END"
)
_BATCH = 5000
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(path), threading.Lock())


def _timestamp(text: str) -> float:
    try:
        return merge.parse_time(text).timestamp()
    except ValueError:
        return merge.EPOCH.timestamp()


def _vault_tag(path: Path | None) -> tuple[int, str]:
    if path is None or not path.is_file():
        return 0, ""
    st = path.stat()
    ident = f"{st.st_dev}:{st.st_ino}"
    return int.from_bytes(hashlib.sha256(ident.encode()).digest()[:4], "big"), ident


class _Stale(Exception):
    """The index no longer matches the files: rebuild it."""


def _fresh(condition: bool) -> None:
    if not condition:
        raise _Stale


def _complete_lines(fh: IO[bytes], start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each whole line from ``start`` up to ``end``; a line still being written
    (no newline yet) is left for a later read."""
    fh.seek(start)
    offset = start
    while offset < end:
        line = fh.readline(end - offset)
        if not line.endswith(b"\n"):
            return
        yield offset, line
        offset += len(line)


@dataclass
class _Snapshot:
    """What one query reads: per chain its segments and the bytes of each indexed; Vault's too."""

    segments: list[list[tuple[int, str, Path, int]]] = field(default_factory=list)
    vault_done: int = 0
    vault_tag: int = 0


class Index:
    """The join index of a timeline (see the module docstring); every method blocks."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def connect(self) -> sqlite3.Connection:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)  # created 0600, never wider
        os.close(fd)
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")  # readers (pages being served) never block an update
        db.execute("PRAGMA synchronous=OFF")  # derived data: a torn index is rebuilt, not trusted
        return db

    def _remove(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}{suffix}")

    def update(self, chains: Sequence[Chain], vault_log: Path | None) -> _Snapshot:
        """Index what was appended since the last update (rebuilding when needed); what to read."""
        with _lock_for(self.path):
            for attempt in range(2):
                try:
                    db = self.connect()
                    try:
                        return self._update(db, chains, vault_log)
                    finally:
                        db.close()
                except (_Stale, sqlite3.DatabaseError):
                    if attempt:
                        raise
                    self._remove()
        raise AssertionError("unreachable")

    def _update(self, db: sqlite3.Connection, chains: Sequence[Chain], vault_log: Path | None) -> _Snapshot:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            db.executescript(_DDL)
            db.execute("INSERT INTO meta VALUES('schema', ?)", (SCHEMA,))
        meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
        if meta.get("schema") != SCHEMA:
            raise _Stale
        # Broker files first: each record read below was written after Vault logged the calls it
        # notes (Vault logs before it answers), so the Vault read that follows holds them.
        snapshot = _Snapshot()
        for chain in chains:
            listed = [(_first_seq(p), p.name, p, p.stat().st_size) for p in chain.segments()]
            snapshot.segments.append(listed)
        tag, ident = _vault_tag(vault_log)
        snapshot.vault_tag = tag
        db.execute("BEGIN IMMEDIATE")
        try:
            if vault_log is not None and ident:
                _fresh(meta.get("vault", ident) == ident)  # else rotated: offsets mean other entries
                snapshot.vault_done = self._index_vault(db, vault_log, int(meta.get("vault_done", "0")))
                db.execute("INSERT OR REPLACE INTO meta VALUES('vault', ?)", (ident,))
                db.execute("INSERT OR REPLACE INTO meta VALUES('vault_done', ?)", (str(snapshot.vault_done),))
            for chain, listed in zip(chains, snapshot.segments, strict=True):
                query = "SELECT name, done, ino FROM seg WHERE chain = ?"
                done = {name: (int(d), int(ino)) for name, d, ino in db.execute(query, (chain.node,))}
                # A segment gone, shorter or another file: restored from a backup, wiped, replaced.
                _fresh(not set(done) - {name for _, name, _, _ in listed})
                for i, (first, name, path, size) in enumerate(listed):
                    inode = path.stat().st_ino
                    start, known = done.get(name, (0, inode))
                    _fresh(start <= size and known == inode)
                    end = self._index_segment(db, chain.node, name, path, start, size)
                    row = (chain.node, name, end, inode)
                    db.execute("INSERT OR REPLACE INTO seg VALUES(?, ?, ?, ?)", row)
                    listed[i] = (first, name, path, end)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return snapshot

    def _index_vault(self, db: sqlite3.Connection, path: Path, start: int) -> int:
        size = path.stat().st_size
        _fresh(start <= size)
        batch: list[tuple[Any, ...]] = []
        end = start
        with path.open("rb") as fh:
            for offset, line in _complete_lines(fh, start, size):
                end = offset + len(line)
                found = merge.vault_line(line)
                if found is None:
                    continue
                vid, entry = found
                row = merge.fold_vault_entry(None, vid, entry)
                auth = entry.get("auth")
                sent = row["request_id"]
                batch.append(
                    (vid, offset, str(offset), row["time"], _timestamp(row["time"]),
                     int(bool(row["broker_identity"])), sent, row["path"], int(bool(auth)))
                )  # fmt: skip
                if len(batch) >= _BATCH:
                    db.executemany(_UPSERT_VAULT, batch)
                    batch.clear()
        db.executemany(_UPSERT_VAULT, batch)
        return end

    def _index_segment(
        self, db: sqlite3.Connection, node: str, name: str, path: Path, start: int, size: int
    ) -> int:
        claims: list[tuple[str]] = []
        notes: list[tuple[int, str, str, float, float]] = []
        end = start
        with path.open("rb") as fh:
            for offset, line in _complete_lines(fh, start, size):
                end = offset + len(line)
                row = merge.broker_row(line)
                if row is None:
                    continue
                window = merge.window_of(row)
                for call in merge.vault_calls(row):
                    if call.get("id"):
                        claims.append((str(call["id"]),))
                    elif window is not None:
                        sent, where = str(call.get("sent_request_id")), str(call.get("path"))
                        notes.append((offset, sent, where, window[0].timestamp(), window[1].timestamp()))
                if len(claims) >= _BATCH:
                    db.executemany("INSERT OR IGNORE INTO claim VALUES(?)", claims)
                    claims.clear()
        db.executemany("INSERT OR IGNORE INTO claim VALUES(?)", claims)
        # Unnumbered notes after the id claims, so they only take entries no id claimed.
        for offset, sent, where, lo, hi in notes:
            found = db.execute(
                "SELECT vid FROM vault WHERE sent = ? AND path = ? AND mine = 1 AND t BETWEEN ? AND ? "
                "AND vid NOT IN claim ORDER BY first LIMIT 1",
                (sent, where, lo, hi),
            ).fetchone()
            if found is not None:
                db.execute("INSERT INTO claim VALUES(?)", (found[0],))
                db.execute("INSERT INTO noted VALUES(?, ?, ?, ?)", (node, name, offset, found[0]))
        return end


# -- the walk ----------------------------------------------------------------------------


@dataclass
class Entry:
    """One timeline row before its join, with where it came from (for the join and the cursor)."""

    row: dict[str, Any]
    chain: str | None = None  # a broker row: its chain's node, segment name and line offset
    name: str = ""
    offset: int = 0


_Item = tuple[Any, Entry | None]  # (position of this entry, or of the source's end; the entry)


class Timeline:
    """One read of the merged timeline: the index brought up to date, then streams over the files."""

    def __init__(self, chains: Sequence[Chain], vault_log: Path | None, index_path: Path) -> None:
        self.chains = list(chains)
        self.vault_log = vault_log if vault_log is not None and vault_log.is_file() else None
        self.index = Index(index_path)
        self.snapshot = self.index.update(self.chains, self.vault_log)
        self._db = self.index.connect()
        self._vault_fh: IO[bytes] | None = self.vault_log.open("rb") if self.vault_log else None
        self._label = len(self.chains) > 1  # several chains: each broker row names its own

    def close(self) -> None:
        self._db.close()
        if self._vault_fh is not None:
            self._vault_fh.close()

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, cursor: Cursor) -> None:
        """CursorError unless every position of ``cursor`` is one these files can have."""
        if cursor.vault and cursor.vault_tag != self.snapshot.vault_tag:
            raise CursorError("Vault's audit log was replaced since the cursor was made; start again")
        if cursor.vault > self.snapshot.vault_done:
            raise CursorError("the cursor points past Vault's audit log")
        for (first, offset), listed in zip(cursor.chains, self.snapshot.segments, strict=True):
            if (first, offset) == (0, 0):
                continue
            segment = next((s for s in listed if s[0] == first), None)
            if segment is None or offset > segment[3]:
                raise CursorError("the cursor names no place in this broker's audit log")
            if offset:
                with segment[2].open("rb") as fh:
                    fh.seek(offset - 1)
                    if fh.read(1) != b"\n":
                        raise CursorError("the cursor names no place in this broker's audit log")

    def _chain_source(self, index: int, start: Position) -> Iterator[_Item]:
        chain, listed = self.chains[index], self.snapshot.segments[index]
        position: Position = start
        for first, name, path, done in listed:
            if start != (0, 0) and first < start[0]:
                continue  # before the cursor's segment (check() made sure it is one of these)
            begin = start[1] if first == start[0] else 0
            with path.open("rb") as fh:
                for offset, line in _complete_lines(fh, begin, done):
                    row = merge.broker_row(line)
                    if row is None:
                        continue
                    if self._label:
                        row["chain"] = chain.node
                    yield (first, offset), Entry(row, chain.node, name, offset)
            position = (first, done)
        yield position, None

    def _vault_source(self, start: int) -> Iterator[_Item]:
        rows = self._db.execute(
            "SELECT vid, first, offs, mine FROM vault WHERE first >= ? AND first < ? "
            "AND NOT (mine = 1 AND vid IN claim) ORDER BY first",
            (start, self.snapshot.vault_done),
        )
        for vid, first, offs, mine in rows:
            row = self._vault_row(vid, offs)
            if row is None:
                continue
            kind = "unexplained" if mine else "bypass"
            yield (
                first,
                Entry(
                    {**row, "kind": kind, "bypass": kind == "bypass", "unexplained": kind == "unexplained"}
                ),
            )
        yield self.snapshot.vault_done, None

    def _vault_row(self, vid: str, offs: str) -> dict[str, Any] | None:
        fh = self._vault_fh
        if fh is None:
            return None
        row: dict[str, Any] | None = None
        for text in offs.split(","):
            fh.seek(int(text))
            found = merge.vault_line(fh.readline())
            if found is not None and found[0] == vid:
                row = merge.fold_vault_entry(row, vid, found[1])
        return row

    def joined(self, entry: Entry) -> dict[str, Any]:
        """The row with its Vault evidence nested (a broker row), as :func:`merge.merge` gives it."""
        if entry.chain is None:
            return entry.row
        found: dict[str, dict[str, Any]] = {}
        for call in merge.vault_calls(entry.row):
            if not call.get("id"):
                continue
            hit = self._db.execute(
                "SELECT vid, offs FROM vault WHERE vid = ? AND mine = 1", (str(call["id"]),)
            ).fetchone()
            if hit is not None and (row := self._vault_row(hit[0], hit[1])) is not None:
                found[hit[0]] = row
        if any(not c.get("id") for c in merge.vault_calls(entry.row)):
            for (vid,) in self._db.execute(
                "SELECT vid FROM noted WHERE chain = ? AND name = ? AND off = ?",
                (entry.chain, entry.name, entry.offset),
            ).fetchall():
                hit = self._db.execute("SELECT offs FROM vault WHERE vid = ?", (vid,)).fetchone()
                if hit is not None and (row := self._vault_row(vid, hit[0])) is not None:
                    found[vid] = row
        return {**entry.row, "vault": [merge.evidence_of(v) for v in found.values()]}

    def walk(self, cursor: Cursor | None, filters: merge.Filters) -> Iterator[tuple[Entry, Cursor]]:
        """Every row matching ``filters`` after ``cursor`` (None: from the start) in merge order, each
        with the cursor that resumes right after it."""
        cursor = cursor or start_cursor(len(self.chains))
        self.check(cursor)
        broker_rows = filters.source not in ("vault", "bypass")
        vault_rows = filters.source != "broker" and self.vault_log is not None
        sources: list[Iterator[_Item]] = []
        for i, position in enumerate(cursor.chains):
            sources.append(self._chain_source(i, position) if broker_rows else iter([(position, None)]))
        sources.append(self._vault_source(cursor.vault) if vault_rows else iter([(cursor.vault, None)]))
        positions: list[Any] = [None] * len(sources)
        heap: list[tuple[datetime, int, Entry]] = []
        for i, source in enumerate(sources):
            positions[i], entry = next(source)
            if entry is not None:
                heap.append((merge.time_of(entry.row), i, entry))
        heapq.heapify(heap)
        tag = self.snapshot.vault_tag
        while heap:
            moment, i, entry = heap[0]
            positions[i], following = next(sources[i])
            if following is None:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, (merge.time_of(following.row), i, following))
            if filters.match(entry.row, moment):
                yield entry, Cursor(tuple(positions[:-1]), positions[-1], tag)


@dataclass
class Page:
    rows: list[dict[str, Any]]
    matched: int
    more: bool
    next: Cursor | None


def page_after(timeline: Timeline, cursor: Cursor, filters: merge.Filters, limit: int) -> Page:
    """``limit`` rows after ``cursor``, and the cursor of the next page if any row follows them."""
    rows: list[dict[str, Any]] = []
    last: Cursor | None = None
    for entry, after in timeline.walk(cursor, filters):
        if len(rows) == limit:
            return Page(rows, len(rows), True, last)
        rows.append(timeline.joined(entry))
        last = after
    return Page(rows, len(rows), False, None)


def newest(timeline: Timeline, filters: merge.Filters, limit: int) -> Page:
    """The last ``limit`` matching rows of the whole walk and how many matched (memory: ``limit``)."""
    kept: deque[Entry] = deque(maxlen=limit)
    matched = 0
    for entry, _ in timeline.walk(None, filters):
        kept.append(entry)
        matched += 1
    return Page([timeline.joined(e) for e in kept], matched, matched > len(kept), None)


def trail_start(chains: Sequence[Chain]) -> datetime | None:
    """When the broker's trail begins: its earliest record's time, read line by line."""
    earliest: datetime | None = None
    for chain in chains:
        for path in chain.segments():
            with path.open("rb") as fh:
                for line in fh:
                    row = merge.broker_row(line)
                    if row is not None:
                        moment = merge.time_of(row)
                        earliest = moment if earliest is None or moment < earliest else earliest
    return earliest
