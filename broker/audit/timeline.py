"""The merged timeline, streamed: the rows :func:`broker.audit.merge.merge` gives, in bounded memory.

Each source (every broker chain's segment files, Vault's file audit log) is read line by
line in its own order and the sources are merged by time. Claims only point forward: a
record is written after the calls it claims (a request's record at its end, a background
record soon after the upkeep calls), within :data:`CLAIM_HORIZON`. So a Vault entry made
under the broker's identity waits in a window until every record that could claim it has
been read, and a row is given out only once no row still to come can sort before it. Memory
is the rows of a few horizons of log, whatever the history's length; the rows come out in
row-key order (time, then an id unique in the timeline: what the events cursor holds).

The horizon is generous against what bounds the delay: a Vault call lasts at most
``vault.deadline_seconds`` (8 s) and Vault's own request limit (90 s), a request's record
is on disk within ``audit.write_timeout_seconds`` (10 s) of its end, and background calls
wake the writer at once. A claim later than the horizon (a background record written after
the log was broken for longer, ``since`` more than a horizon back) is not seen: the calls
show as ``unexplained`` — more flags, never fewer. The same holds for a Vault response
logged more than a horizon after its request, and for a record whose clock stepped back
by more than a horizon (or whose time is unreadable): it is shown where it was read
(newest-rows answers) but a cursor walk, which only moves forward, passes it by.

Claims are made as :func:`broker.audit.merge.merge` makes them: ids first (every record
noting an id gets that entry), then unnumbered notes, one entry each, inside the record's
window, records taken in time order (merge takes them in file order: the same unless a
chain's clock stepped back or two chains noted the same sent request id and path).
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from broker.audit import merge

# How long after a Vault call the record claiming it may be written (see the module docstring).
CLAIM_HORIZON = timedelta(seconds=120)
# How far back in time a source may step from one line to the next and still be read in order
# (a clock stepped back; concurrent Vault requests logged out of order).
DISORDER = CLAIM_HORIZON
_SLACK = merge.JOIN_SLACK
# When a record's numbered claims are made (every entry up to its time + slack has been read),
# when its unnumbered ones (every record that could number an entry of its window has claimed),
# and when an entry is settled (every record that could claim it has): all after the safe front,
# the time before which every row has been read.
_NUMBERED_AFTER = _SLACK
_UNNUMBERED_AFTER = CLAIM_HORIZON + 2 * _SLACK
_SETTLED_AFTER = 2 * CLAIM_HORIZON + 2 * _SLACK
# A page after a cursor (or a since filter) starts reading this far before it: what a row there
# depends on (its claimers, the entries they compete for, lines out of order) lies within it.
SEEK_BACK = DISORDER + 3 * CLAIM_HORIZON + 4 * _SLACK
# Below this many bytes a bisection stops and the file is read line by line.
_SEEK_GRAIN = 64 * 1024

RowKey = tuple[datetime, str]
_decode = json.JSONDecoder().decode
_FIRST, _LAST = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)


def _plus(moment: datetime, delta: timedelta) -> datetime:
    """``moment + delta``, held at the calendar's ends (a cursor, a filter or a damaged record may
    name year 1 or 9999: an answer, never an OverflowError)."""
    try:
        return moment + delta
    except OverflowError:
        return _LAST if delta > timedelta(0) else _FIRST


def row_key(row: Mapping[str, Any]) -> RowKey:
    """The sort key of a timeline row: its time, then an id unique in the timeline."""
    return merge.time_of(row), _ident(row)


def _ident(row: Mapping[str, Any]) -> str:
    if row.get("source") == "vault":
        return f"v:{row.get('vault_request_id')}"
    # seq is unique in a sound log; the request id keeps a damaged one's rows apart too.
    seq = row.get("seq")
    ident = f"b:{seq:015d}" if isinstance(seq, int) and seq >= 0 else f"b:{seq}"
    ident += f":{row.get('request_id')}"
    if row.get("chain"):  # serve --workers: each worker's chain numbers its records from 1
        ident += f":{row['chain']}"
    return ident


@dataclass(frozen=True)
class Chain:
    """One broker audit chain: its segment files, and the node its rows name (``chain``) when
    several chains are read together (serve --workers), else None."""

    paths: Sequence[Path]
    node: str | None = None


# -- reading a source from a moment on ---------------------------------------------------------


def _json(line: bytes) -> Any:
    """``json.loads(line)``, without its per-call encoding sniffing for the lines every log holds:
    one starting ``{"`` is what json.loads reads as UTF-8 (surrogates passed through) too."""
    if line[:2] == b'{"':
        return _decode(line.decode("utf-8", "surrogatepass"))
    return json.loads(line)


def _line_time(line: bytes) -> datetime | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    try:
        return merge.parse_time(str(value.get("time") or ""))
    except ValueError:
        return None


def _first_time(fh: IO[bytes], end: int) -> datetime | None:
    """The time of the first readable line from the file's position up to ``end``."""
    while fh.tell() < end:
        line = fh.readline()
        if not line:
            return None
        moment = _line_time(line)
        if moment is not None:
            return moment
    return None


def _seek(fh: IO[bytes], start: datetime) -> None:
    """Position ``fh`` at a line start before the first line whose time is ``start`` or later.

    A bisection over byte offsets: each probe resynchronises on the next newline. A file out of
    order by at most :data:`DISORDER` is then read from no later than ``start + DISORDER``.
    """
    lo, hi = 0, fh.seek(0, 2)
    while hi - lo > _SEEK_GRAIN:
        mid = (lo + hi) // 2
        fh.seek(mid)
        fh.readline()
        moment = _first_time(fh, hi)
        if moment is None or moment >= start:
            hi = mid
        else:
            lo = mid
    fh.seek(lo)
    if lo:
        fh.readline()


def _lines(paths: Sequence[Path], start: datetime | None) -> Iterator[bytes]:
    """The lines of ``paths`` (in name order) from about ``start`` on: from the last file that
    begins before it, bisected within; a file that vanished meanwhile is skipped."""
    ordered = sorted(paths, key=lambda p: p.name)
    first = 0
    if start is not None:
        lo, hi = 0, len(ordered)
        while lo < hi:  # the last file whose first line is before start
            mid = (lo + hi) // 2
            try:
                with ordered[mid].open("rb") as fh:
                    moment = _first_time(fh, ordered[mid].stat().st_size)
            except OSError:
                moment = None
            if moment is not None and moment < start:
                lo = mid + 1
            else:
                hi = mid
        first = max(lo - 1, 0)
    for index in range(first, len(ordered)):
        try:
            fh = ordered[index].open("rb")
        except FileNotFoundError:
            continue
        with fh:
            if start is not None and index == first:
                _seek(fh, start)
            yield from fh


# A stream item: (time, source number, line number, row); the numbers keep ties in read order and
# keep comparisons off the row.
_Item = tuple[datetime, int, int, dict[str, Any]]


def _broker_rows(chain: Chain, source: int, start: datetime | None) -> Iterator[_Item]:
    """A chain's request and background records, as :func:`merge.broker_records` reads them."""
    n = 0
    for line in _lines(chain.paths, start):
        try:
            record = _json(line)
        except ValueError:
            continue  # verify reports damage; the timeline shows what can be read
        if not isinstance(record, dict):
            continue
        kind = record.get("type")
        if kind == "event":
            record["source"], record["kind"] = "broker", "request"
        elif kind == "background":
            record["source"], record["kind"] = "broker", "background"
        else:
            continue
        if chain.node is not None:
            record["chain"] = chain.node
        n += 1
        yield merge.time_of(record), source, n, record


def _vault_rows(path: Path, source: int, start: datetime | None, broker_policy: str) -> Iterator[_Item]:
    """Vault's request/response pairs as :func:`merge.vault_entries` makes them, one row each.

    A row is given out once its response is read (or a horizon of log later without one), in the
    order its first line came: so rows come out in the log's own order and memory holds only the
    requests in flight.
    """
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    waiting: deque[tuple[str, dict[str, Any], datetime]] = deque()
    done: set[str] = set()
    open_rows: dict[str, dict[str, Any]] = {}
    # Ids given out, kept a while so a late line for one does not become a second row.
    given: dict[str, datetime] = {}
    given_order: deque[tuple[datetime, str]] = deque()
    front = late = merge.EPOCH
    n = 0
    with fh:
        if start is not None:
            _seek(fh, start)
        for raw in fh:
            try:
                found = merge.vault_line(_json(raw))
            except ValueError:
                continue
            if found is None or found[0] in given:
                continue
            vid, entry = found
            row = open_rows.get(vid)
            if row is None:
                row = open_rows[vid] = merge.vault_row(vid, entry)
                moment = merge.time_of(row)
                waiting.append((vid, row, moment))
                if moment > front:
                    front = moment
                    late, forget = front - CLAIM_HORIZON, front - 3 * CLAIM_HORIZON
                    while given_order and given_order[0][0] < forget:
                        given.pop(given_order.popleft()[1], None)
            merge.add_vault_line(row, entry, broker_policy)
            if entry.get("type") == "response":
                done.add(vid)
            while waiting and (waiting[0][0] in done or waiting[0][2] < late):
                vid_out, row_out, moment_out = waiting.popleft()
                done.discard(vid_out)
                del open_rows[vid_out]
                given[vid_out] = moment_out
                given_order.append((moment_out, vid_out))
                n += 1
                yield moment_out, source, n, row_out
    for _, row_out, moment_out in waiting:
        n += 1
        yield moment_out, source, n, row_out


# -- the merge ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    """A Vault entry of the broker's identity, waiting for the records that may claim it."""

    row: dict[str, Any]
    time: datetime
    claimed: bool = False


@dataclass(slots=True)
class _Record:
    row: dict[str, Any]
    time: datetime
    calls: list[Mapping[str, Any]]
    unnumbered: bool
    found: dict[str, Mapping[str, Any]] = field(default_factory=dict)


_NUMBERED, _UNNUMBERED, _SETTLE = 0, 1, 2


class _Joiner:
    """The claim window: entries waiting for claims, records waiting to claim, rows waiting to go out."""

    def __init__(self) -> None:
        self.by_id: dict[str, _Entry] = {}
        self.by_sent: dict[tuple[str, str], list[_Entry]] = {}
        self.agenda: list[tuple[datetime, int, int, Any]] = []
        self.out: list[tuple[datetime, str, int, dict[str, Any]]] = []
        self.order = itertools.count()

    def emit(self, moment: datetime, row: dict[str, Any]) -> None:
        heapq.heappush(self.out, (moment, _ident(row), next(self.order), row))

    def record(self, moment: datetime, row: dict[str, Any]) -> None:
        calls = merge._vault_calls(row)
        if not calls:
            row["vault"] = []
            self.emit(moment, row)
            return
        pending = _Record(row, moment, calls, any(not c.get("id") for c in calls))
        if not pending.unnumbered and all(str(c.get("id")) in self.by_id for c in calls):
            # Every id it noted is here already (the usual case: the call came before its record):
            # the claims are what they would be later, as entries stay until long after.
            self._numbered(pending)
            return
        n = next(self.order)
        heapq.heappush(self.agenda, (_plus(moment, _NUMBERED_AFTER), _NUMBERED, n, pending))
        if pending.unnumbered:
            heapq.heappush(self.agenda, (_plus(moment, _UNNUMBERED_AFTER), _UNNUMBERED, n, pending))

    def vault(self, moment: datetime, row: dict[str, Any]) -> None:
        if not row.get("broker_identity"):
            self._unclaimed(moment, row)
            return
        entry = _Entry(row, moment)
        self.by_id[str(row["vault_request_id"])] = entry
        if row.get("request_id"):
            self.by_sent.setdefault((str(row["request_id"]), str(row.get("path"))), []).append(entry)
        heapq.heappush(self.agenda, (_plus(moment, _SETTLED_AFTER), _SETTLE, next(self.order), entry))

    def run(self, before: datetime | None) -> None:
        """Everything due before ``before`` (all of it when None), in time order."""
        agenda = self.agenda
        while agenda and (before is None or agenda[0][0] < before):
            _, step, _, item = heapq.heappop(agenda)
            if step == _NUMBERED:
                self._numbered(item)
            elif step == _UNNUMBERED:
                self._unnumbered(item)
            else:
                self._settle(item)

    def ready(self, before: datetime | None) -> Iterator[tuple[datetime, dict[str, Any]]]:
        out = self.out
        while out and (before is None or out[0][0] < before):
            moment, _, _, row = heapq.heappop(out)
            yield moment, row

    def _numbered(self, pending: _Record) -> None:
        for call in pending.calls:
            entry = self.by_id.get(str(call.get("id")))
            if entry is not None:
                pending.found[str(entry.row["vault_request_id"])] = entry.row
                entry.claimed = True
        if not pending.unnumbered:
            self._done(pending)

    def _unnumbered(self, pending: _Record) -> None:
        window = merge._window(pending.row)
        if window is not None:
            for call in pending.calls:
                if call.get("id"):
                    continue
                for entry in self.by_sent.get((str(call.get("sent_request_id")), str(call.get("path"))), []):
                    if not entry.claimed and window[0] <= entry.time <= window[1]:
                        entry.claimed = True
                        pending.found[str(entry.row["vault_request_id"])] = entry.row
                        break
        self._done(pending)

    def _done(self, pending: _Record) -> None:
        row = pending.row
        row["vault"] = [merge._evidence(v) for v in pending.found.values()]
        self.emit(pending.time, row)

    def _settle(self, entry: _Entry) -> None:
        row = entry.row
        vid = str(row["vault_request_id"])
        if self.by_id.get(vid) is entry:
            del self.by_id[vid]
        if row.get("request_id"):
            key = (str(row["request_id"]), str(row.get("path")))
            same = self.by_sent.get(key)
            if same is not None:
                same.remove(entry)
                if not same:
                    del self.by_sent[key]
        if not entry.claimed:
            self._unclaimed(entry.time, row)

    def _unclaimed(self, moment: datetime, row: dict[str, Any]) -> None:
        kind = merge._unclaimed_kind(row)
        flags = {"bypass": kind == "bypass", "unexplained": kind == "unexplained"}
        self.emit(moment, {**row, "kind": kind, **flags})


def stream(
    chains: Sequence[Chain],
    vault_log: Path | None,
    *,
    start: datetime | None = None,
    broker_policy: str = merge.BROKER_VAULT_POLICY,
) -> Iterator[tuple[datetime, dict[str, Any]]]:
    """Every timeline row with its time, in row-key order (blocking; reads the files lazily).

    ``start``: read each source from about :data:`SEEK_BACK` before this moment; rows from
    ``start`` on are exactly those of a full read (earlier ones may lack claims).
    """
    origin = None if start is None else _plus(start, -SEEK_BACK)
    sources: list[Iterator[_Item]] = [_broker_rows(c, i, origin) for i, c in enumerate(chains)]
    if vault_log is not None and vault_log.is_file():
        sources.append(_vault_rows(vault_log, len(chains), origin, broker_policy))
    joiner = _Joiner()
    agenda, out = joiner.agenda, joiner.out
    front = merge.EPOCH
    for moment, _, _, row in heapq.merge(*sources):
        if moment > front:
            front = moment
            safe = front - DISORDER  # every row before it has been read
            if agenda and agenda[0][0] < safe:
                joiner.run(safe)
            settled = safe - _SETTLED_AFTER
            while out and out[0][0] < settled:
                item = heapq.heappop(out)
                yield item[0], item[3]
        if row["source"] == "vault":
            joiner.vault(moment, row)
        else:
            joiner.record(moment, row)
    joiner.run(None)
    yield from joiner.ready(None)


def _time_free(filters: merge.Filters) -> merge.Filters:
    """The filters without since/until: those are checked on the time the stream already parsed."""
    return replace(filters, since=None, until=None)


def newest(
    chains: Sequence[Chain],
    vault_log: Path | None,
    filters: merge.Filters,
    limit: int,
    *,
    broker_policy: str = merge.BROKER_VAULT_POLICY,
) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` matching rows (oldest first) and how many rows match in all."""
    rest = _time_free(filters)
    kept: deque[dict[str, Any]] = deque(maxlen=limit)
    matched = 0
    for moment, row in stream(chains, vault_log, start=filters.since, broker_policy=broker_policy):
        if filters.since is not None and moment < filters.since:
            continue
        if filters.until is not None and moment > filters.until:
            break  # rows come in time order: none later matches
        if rest.match(row):
            matched += 1
            kept.append(row)
    return list(kept), matched


def page(
    chains: Sequence[Chain],
    vault_log: Path | None,
    filters: merge.Filters,
    after: RowKey | None,
    limit: int,
    *,
    broker_policy: str = merge.BROKER_VAULT_POLICY,
) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` matching rows after the row key ``after`` (from the start when None), in
    row-key order, and whether more follow. Reads from a little before the later of ``after``
    and ``since`` and stops once the page is full."""
    rest = _time_free(filters)
    starts = [m for m in (None if after is None else after[0], filters.since) if m is not None]
    last = after
    rows: list[dict[str, Any]] = []
    start = max(starts, default=None)
    for moment, row in stream(chains, vault_log, start=start, broker_policy=broker_policy):
        if filters.until is not None and moment > filters.until:
            break
        key = (moment, _ident(row))
        if last is not None and key <= last:
            continue  # before the cursor, or out of order (see the module docstring): never twice
        last = key
        if filters.since is not None and moment < filters.since:
            continue
        if rest.match(row):
            if len(rows) == limit:
                return rows, True
            rows.append(row)
    return rows, False
