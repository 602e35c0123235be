"""The streamed timeline gives merge.merge's rows (same claims, row-key order) on generated logs,
its cursor pages walk it exactly once, and its memory does not grow with the log's length."""

from __future__ import annotations

import json
import random
import tracemalloc
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench.scale import generate_timeline_log
from broker.audit import merge, timeline
from broker.audit.chain import file_name
from broker.audit.events import backend_call
from broker.audit.segments import segment_sources
from broker.requestvars import unnumbered

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=UTC)
BROKER_AUTH = {
    "display_name": "approle",
    "policies": ["keybroker-broker"],
    "token_policies": ["keybroker-broker"],
    "entity_id": "e-1",
}
ROOT_AUTH = {"display_name": "root", "policies": ["root"], "token_policies": ["root"]}
SLACK = merge.JOIN_SLACK.total_seconds()
HORIZON = timeline.CLAIM_HORIZON.total_seconds()


def stamp(seconds: float, *, nanos: bool = False) -> str:
    moment = T0 + timedelta(seconds=seconds)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return f"{text}{moment.microsecond % 7}11Z" if nanos else f"{text}Z"


@dataclass
class Log:
    """A generated broker log (per chain: (write time, record)) and Vault log ((write time, line))."""

    rng: random.Random
    chains: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=dict)
    vault: list[tuple[float, bytes]] = field(default_factory=list)
    ids: int = 0

    def vid(self) -> str:
        self.ids += 1
        return f"{self.ids:08x}-0000-4000-8000-{self.ids:012x}"

    def call(
        self, at: float, path: str, *, sent: str | None, auth: dict[str, Any], duration: float = 0.01
    ) -> str:
        """A Vault request/response pair: the request logged at ``at``, the response ``duration`` later."""
        vid = self.vid()
        request: dict[str, Any] = {"id": vid, "operation": "update", "path": path}
        if sent is not None:
            request["headers"] = {"x-request-id": [sent]}
        login = path.startswith("auth/approle/login")
        first = {"time": stamp(at, nanos=True), "type": "request", "auth": {} if login else auth}
        second: dict[str, Any] = {"time": stamp(at + duration, nanos=True), "type": "response", "auth": auth}
        if self.rng.random() < 0.1:
            second["error"] = "permission denied"
        self.vault.append((at, json.dumps({**first, "request": request}).encode()))
        self.vault.append((at + duration, json.dumps({**second, "request": request}).encode()))
        return vid


def generate(
    seed: int,
    records: int,
    *,
    chains: tuple[str, ...] = ("n-w0",),
    spacing: float = 1.0,
    step_back: float = 0,
) -> Log:
    """Requests and upkeep on each chain with numbered and unnumbered claims, Vault clock skew within
    JOIN_SLACK, record delays up to the horizon, copies, unclaimed broker-identity calls and bypasses.
    ``step_back``: once, the chains' clocks step back by this much (their records are stamped so)."""
    rng = random.Random(seed)
    log = Log(rng, chains={c: [] for c in chains})
    clock = 0.0
    for n in range(records):
        clock += rng.uniform(0, 2 * spacing)
        node = rng.choice(chains)
        stepped = step_back if step_back and n > records // 2 else 0.0
        skew = rng.uniform(-SLACK + 0.5, SLACK - 0.5)  # the broker's clock against Vault's
        roll = rng.random()
        if roll < 0.15:  # upkeep: calls since `since`, the background record soon (or late) after
            since = clock
            sent = f"kb-bg-{n:08d}"
            calls = []
            for _ in range(rng.randint(1, 3)):
                at = since + rng.uniform(0, 20)
                path = rng.choice(["auth/token/renew-self", "kb-kv/data/policies", "auth/approle/login"])
                if rng.random() < 0.7:
                    calls.append(
                        backend_call("vault", "upkeep", log.call(at, path, sent=sent, auth=BROKER_AUTH))
                    )
                else:
                    log.call(at, path, sent=sent, auth=BROKER_AUTH)
                    calls.append(backend_call("vault", "upkeep", unnumbered(204, sent, path)))
            written = since + rng.uniform(20, HORIZON - 3 * SLACK)
            record: dict[str, Any] = {
                "type": "background",
                "node": node,
                "since": stamp(since + skew - stepped),
                "backend_calls": calls,
            }
        else:  # a request: its calls within it, its record at its end
            rid = f"req-{n:08d}"
            latency = rng.choice([0.02, 0.3, 2.0, rng.uniform(0, HORIZON - 3 * SLACK)])
            calls = []
            for _ in range(rng.choice([0, 1, 1, 2, 3])):
                at = clock + rng.uniform(0, latency)
                path = rng.choice(
                    ["kb-transit/encrypt/payments", "kb-kv/data/keys/k1", "kb-kv/data/grants/g"]
                )
                kind = rng.random()
                if kind < 0.6:
                    calls.append(backend_call("vault", "op", log.call(at, path, sent=rid, auth=BROKER_AUTH)))
                else:  # answered without an id: the record notes the sent id and the path
                    log.call(at, path, sent=rid, auth=BROKER_AUTH)
                    calls.append(backend_call("vault", "op", unnumbered(404, rid, path)))
                    if kind < 0.7:  # a copy with the same header and path: one of them stays unexplained
                        log.call(at + rng.uniform(-1, 1), path, sent=rid, auth=BROKER_AUTH)
                    if kind < 0.65:  # the same call twice in one request: each note claims one
                        log.call(at + 0.1, path, sent=rid, auth=BROKER_AUTH)
                        calls.append(backend_call("vault", "op", unnumbered(404, rid, path)))
            numbered = [c for c in calls if c.get("id")]
            if numbered and rng.random() < 0.1:  # a micro-batch: another request's record names the same id
                at = clock + latency + 0.001
                twin: dict[str, Any] = {
                    "type": "event",
                    "time": stamp(at + skew - stepped),
                    "request_id": f"req-{n:08d}-b",
                    "latency_ms": latency * 1000,
                    "backend_calls": numbered[:1],
                }
                log.chains[node].append((at, twin))
            written = clock + latency
            record = {
                "type": "event",
                "request_id": rid,
                "principal": "spiffe://bank.example/app/payments",
                "operation": "key.encrypt",
                "key": "k1",
                "outcome": "allowed",
                "latency_ms": latency * 1000,
                "backend_calls": calls,
            }
        record["time"] = stamp(written + skew - stepped)
        log.chains[node].append((written, record))
        extra = rng.random()
        if extra < 0.08:  # the broker's identity used by someone else: unexplained, whatever header
            log.call(clock, "kb-transit/decrypt/payments", sent=f"kb-bg-{n:08d}", auth=BROKER_AUTH)
        elif extra < 0.14:  # root, straight to Vault: a bypass
            log.call(clock, "kb-kv/data/keys/k1", sent=f"req-{n:08d}", auth=ROOT_AUTH)
    return log


def write(log: Log, directory: Path, per_file: int = 400) -> tuple[list[timeline.Chain], Path]:
    chains = []
    for node, entries in log.chains.items():
        folder = directory / node
        folder.mkdir()
        entries.sort(key=lambda e: e[0])  # a chain is written in the order its records were made
        for seq, (_, record) in enumerate(entries, start=1):
            with (folder / file_name(1 + (seq - 1) // per_file * per_file)).open("ab") as fh:
                fh.write(json.dumps({**record, "seq": seq}).encode() + b"\n")
        chains.append(
            timeline.Chain(sorted(folder.glob("audit-*.jsonl")), node if len(log.chains) > 1 else None)
        )
    vault = directory / "vault-audit.log"
    log.vault.sort(key=lambda e: e[0])
    vault.write_bytes(b"".join(line + b"\n" for _, line in log.vault))
    return chains, vault


def whole(chains: list[timeline.Chain], vault: Path) -> list[dict[str, Any]]:
    """merge.merge over everything read into memory, sorted by row key: what the stream must equal."""
    records = []
    for c in chains:
        rows = merge.broker_records(segment_sources(list(c.paths)))
        records += [{**r, "chain": c.node} for r in rows] if c.node else rows
    with vault.open("rb") as fh:
        entries = merge.vault_entries(fh)
    return sorted(merge.merge(records, entries), key=timeline.row_key)


@pytest.mark.parametrize("seed", range(6))
def test_the_stream_gives_merges_rows_in_row_key_order(seed: int, tmp_path: Path) -> None:
    """Same rows, same claims (ids first, one entry per unnumbered note, in its window), same flags,
    in row-key order: one chain and two (serve --workers), skew within JOIN_SLACK, delays to the horizon."""
    nodes = ("w0",) if seed % 2 else ("w0", "w1")
    chains, vault = write(generate(seed, 1500, chains=nodes), tmp_path)
    expected = whole(chains, vault)

    got = [row for _, row in timeline.stream(chains, vault)]

    assert [timeline.row_key(r) for r in got] == [timeline.row_key(r) for r in expected]
    assert got == expected
    kinds = {r["kind"] for r in got}
    assert {"request", "background", "bypass", "unexplained"} <= kinds  # the generator covers them
    assert any(r.get("vault") for r in got if r["kind"] == "background")
    assert sum(len(r.get("vault") or []) for r in got) > 500


@pytest.mark.parametrize("seed", range(2))
def test_cursor_pages_walk_the_stream_exactly_once(seed: int, tmp_path: Path) -> None:
    """Following every page's last row key as the cursor (pages of 1 to 12 rows) yields the unpaged
    rows exactly once, in order, also when a chain's clock stepped back by less than the horizon;
    the pages after a cursor read from a seek, not from the start."""
    chains, vault = write(generate(seed, 600, spacing=2.0, step_back=HORIZON * 0.75), tmp_path, per_file=150)
    filters = merge.Filters()
    unpaged = [row for _, row in timeline.stream(chains, vault) if filters.match(row)]
    keys = [timeline.row_key(r) for r in unpaged]
    assert keys == sorted(keys)

    rng = random.Random(seed)
    walked: list[dict[str, Any]] = []
    after = None
    for _ in range(len(unpaged) + 1):
        rows, more = timeline.page(chains, vault, filters, after, rng.randint(1, 12))
        walked += rows
        if not more:
            break
        after = timeline.row_key(rows[-1])

    assert [timeline.row_key(r) for r in walked] == keys
    assert walked == unpaged
    newest, matched = timeline.newest(chains, vault, filters, 25)
    assert (newest, matched) == (unpaged[-25:], len(unpaged))


def test_since_and_until_give_the_rows_of_a_full_read_between_them(tmp_path: Path) -> None:
    """A since/until window (which seeks and stops early) holds exactly the full read's rows in it."""
    chains, vault = write(generate(7, 1500), tmp_path)
    since, until = T0 + timedelta(minutes=10), T0 + timedelta(minutes=16)
    full = [row for _, row in timeline.stream(chains, vault)]
    inside = [r for r in full if merge.Filters(since=since, until=until).match(r)]

    rows, matched = timeline.newest(chains, vault, merge.Filters(since=since, until=until), 10_000)
    page, more = timeline.page(chains, vault, merge.Filters(since=since, until=until), None, 10_000)

    assert len(inside) > 50
    assert (rows, matched) == (inside, len(inside))
    assert (page, more) == (inside, False)


def _peak(directory: Path, records: int) -> tuple[int, int]:
    """(peak traced bytes, rows) streaming a log of ``records`` records 200 ms apart (bench.scale's
    generator: half claim a Vault call by id, some unnumbered, root bypasses) and its Vault log."""
    vault = generate_timeline_log(directory, records, spacing_ms=200)
    chains = [timeline.Chain(sorted((directory / "chain").glob("audit-*.jsonl")))]
    tracemalloc.start()
    try:
        rows = sum(1 for _ in timeline.stream(chains, vault))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, rows


@pytest.mark.timeout(600)  # tracemalloc slows reading down a lot on a shared 2-core box
def test_memory_does_not_grow_with_the_log(tmp_path: Path) -> None:
    """Streaming an 80k-line log (records and Vault lines) takes no more memory than a 20k-line one:
    only a few horizons of rows are held (the timeline built whole, as before, needs four times as
    much for four times the rows)."""
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small, small_rows = _peak(tmp_path / "small", 10_000)  # 20,200 log lines, 33 min of records
    large, large_rows = _peak(tmp_path / "large", 40_000)  # 80,800 log lines, over 2 hours

    assert (small_rows, large_rows) == (10_100, 40_400)  # the records and the root bypasses
    assert large < small * 1.25, (small, large)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-10T05:17:58.64+01:00", datetime(2026, 3, 10, 4, 17, 58, 640000, tzinfo=UTC)),
        ("2026-03-10T05:17:58.123456789-05:30", datetime(2026, 3, 10, 10, 47, 58, 123456, tzinfo=UTC)),
        (" 2026-03-10T05:17:58.5Z\n", datetime(2026, 3, 10, 5, 17, 58, 500000, tzinfo=UTC)),
        ("2026-03-10 05:17:58.1234567", datetime(2026, 3, 10, 5, 17, 58, 123456, tzinfo=UTC)),
    ],
)
def test_times_keep_their_offset_after_a_fraction(text: str, expected: datetime) -> None:
    """A fraction of any length is cut to microseconds and the offset after it stays the offset (its
    digits were once read as more fraction, putting +01:00 times an hour off)."""
    assert merge.parse_time(text) == expected  # the same instant
