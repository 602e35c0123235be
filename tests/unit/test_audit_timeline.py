"""The streamed timeline: same rows and joins as the in-memory merge, paging that neither skips nor
repeats a row (times stepping back included), hostile cursors refused, memory flat in the log's size."""

from __future__ import annotations

import json
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.audit import merge, timeline
from broker.audit.chain import file_name
from tests.unit.test_audit_claims import T0, entry, miss, record
from tests.unit.test_audit_merge_report import BROKER_FILES, VAULT_LOG

KEY = timeline.cursor_key(b"k" * 32, "node-a")


def write_log(directory: Path, records: list[dict[str, Any]], per_file: int) -> None:
    """Records as numbered lines in segment files of ``per_file`` lines (what the timeline reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(records), per_file):
        with (directory / file_name(start + 1)).open("wb") as fh:
            for seq, body in enumerate(records[start : start + per_file], start + 1):
                fh.write(json.dumps({**body, "seq": seq}, sort_keys=True).encode() + b"\n")


def events(count: int, *, step_back_every: int = 0) -> list[dict[str, Any]]:
    """``count`` request records a second apart; every ``step_back_every``-th one's clock stepped back
    an hour (a wall clock corrected by NTP), with Vault evidence every third record."""
    out = []
    for n in range(count):
        moment = T0 + timedelta(seconds=n)
        if step_back_every and n % step_back_every == step_back_every - 1:
            moment -= timedelta(hours=1)
        calls = [{"backend": "vault", "id": f"v{n}", "operation": "transit encrypt"}] if n % 3 == 0 else []
        out.append({**record(f"r-{n:08d}", 0, 1.0, calls), "time": moment.isoformat()})
    return out


def vault_log(path: Path, count: int) -> None:
    """Vault entries for the records' calls, and every tenth record a root call (a bypass row)."""
    with path.open("wb") as fh:
        for n in range(count):
            if n % 3 == 0:
                fh.write(entry(f"v{n}", "kb-transit/encrypt/pay", sent=f"r-{n:08d}", at=n) + b"\n")
            if n % 10 == 0:
                root = {"display_name": "root", "policies": ["root"]}
                fh.write(entry(f"x{n}", "sys/mounts", sent=None, at=n + 0.5, auth=root) + b"\n")


def walk_pages(view: timeline.Timeline, filters: merge.Filters, limit: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = timeline.start_cursor(len(view.chains))
    for _ in range(10_000):
        page = timeline.page_after(view, cursor, filters, limit)
        rows += page.rows
        if page.next is None:
            return rows
        # Through the wire form, as a client hands it back.
        cursor = timeline.decode_cursor(timeline.encode_cursor(page.next, KEY), KEY, len(view.chains))
    raise AssertionError("the walk did not end")


def ident(row: dict[str, Any]) -> str:
    return str(row.get("request_id") if row["source"] == "broker" else row["vault_request_id"])


def test_the_streamed_timeline_has_the_rows_and_joins_of_the_in_memory_merge(tmp_path: Path) -> None:
    """Same rows, same nested evidence, same flags as merge.merge over the same files."""
    (tmp_path / "audit").mkdir()
    for name, content in BROKER_FILES:
        (tmp_path / "audit" / name).write_bytes(content)
    (tmp_path / "vault.log").write_bytes(b"\n".join(VAULT_LOG) + b"\n")
    expected = merge.merge(merge.broker_records(BROKER_FILES), merge.vault_entries(VAULT_LOG))
    chains = [timeline.Chain("", tmp_path / "audit")]

    with timeline.Timeline(chains, tmp_path / "vault.log", tmp_path / "index.sqlite") as view:
        every = merge.Filters(source="broker"), merge.Filters(source="vault")
        got = [view.joined(e) for f in every for e, _ in view.walk(None, f)]

    def canon(rows: list[dict[str, Any]]) -> list[str]:
        return sorted(json.dumps(r, sort_keys=True) for r in rows)

    assert canon(got) == canon(expected)
    assert {ident(r) for r in got if r.get("bypass")} == {"v3", "v4", "v5", "v6"}


def test_an_unnumbered_call_is_joined_through_the_index(tmp_path: Path) -> None:
    """A call Vault answered without an id claims the one entry with its header and path in its window."""
    path = "kb-kv/data/keys/missing"
    rec = record("r-00000001", 1.0, 800.0, [miss("r-00000001", path)])
    write_log(tmp_path / "audit", [rec], 10)
    lines = [
        entry("v1", path, sent="r-00000001", at=0.5),
        entry("v2", path, sent="r-00000001", at=0.7),  # a copy: only one is claimed
        entry("v3", path, sent="r-00000001", at=60),  # outside the window
    ]
    (tmp_path / "vault.log").write_bytes(b"\n".join(lines) + b"\n")

    with timeline.Timeline(
        [timeline.Chain("", tmp_path / "audit")], tmp_path / "vault.log", tmp_path / "i.sqlite"
    ) as view:
        rows = [view.joined(e) for e, _ in view.walk(None, merge.Filters())]

    (broker,) = [r for r in rows if r["source"] == "broker"]
    assert [v["vault_request_id"] for v in broker["vault"]] == ["v1"]
    assert {ident(r): r["kind"] for r in rows if r["source"] == "vault"} == {
        "v2": "unexplained",
        "v3": "unexplained",
    }


@pytest.mark.parametrize("limit", [1, 7, 250])
def test_pages_hold_every_row_once_in_the_unpaged_order_when_times_step_back(
    tmp_path: Path, limit: int
) -> None:
    """Over several segments and Vault's log, with record times stepping back an hour, the pages
    joined are exactly the unpaged walk: no row skipped or repeated, same order."""
    write_log(tmp_path / "audit", events(600, step_back_every=37), per_file=128)
    vault_log(tmp_path / "vault.log", 600)
    chains = [timeline.Chain("", tmp_path / "audit")]
    with timeline.Timeline(chains, tmp_path / "vault.log", tmp_path / "i.sqlite") as view:
        whole = [view.joined(e) for e, _ in view.walk(None, merge.Filters())]
        paged = walk_pages(view, merge.Filters(), limit)
        only_denied_keys = walk_pages(view, merge.Filters(principal="vault:root"), limit)

    assert len(list((tmp_path / "audit").iterdir())) == 5
    assert [ident(r) for r in paged] == [ident(r) for r in whole]
    assert len({ident(r) for r in whole}) == len(whole) == 600 + 60  # every record, every root call
    assert sum(1 for r in whole if r["source"] == "broker" and r["vault"]) == 200  # the joins
    assert [ident(r) for r in only_denied_keys] == [f"x{n}" for n in range(0, 600, 10)]


def test_a_page_after_the_log_grew_continues_where_the_last_one_ended(tmp_path: Path) -> None:
    """Records appended between pages come after the cursor: the walk still holds every row once."""
    rows = events(300, step_back_every=11)
    write_log(tmp_path / "audit", rows[:150], per_file=1000)
    chains = [timeline.Chain("", tmp_path / "audit")]
    with timeline.Timeline(chains, None, tmp_path / "i.sqlite") as view:
        first = timeline.page_after(view, timeline.start_cursor(1), merge.Filters(), 100)
    with (tmp_path / "audit" / file_name(1)).open("ab") as fh:
        for seq, body in enumerate(rows[150:], 151):
            fh.write(json.dumps({**body, "seq": seq}).encode() + b"\n")
    assert first.next is not None
    with timeline.Timeline(chains, None, tmp_path / "i.sqlite") as view:
        rest = walk_pages_from(view, first.next)

    assert [ident(r) for r in first.rows + rest] == [f"r-{n:08d}" for n in range(300)]


def walk_pages_from(view: timeline.Timeline, cursor: timeline.Cursor) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    next_cursor: timeline.Cursor | None = cursor
    while next_cursor is not None:
        page = timeline.page_after(view, next_cursor, merge.Filters(), 64)
        out += page.rows
        next_cursor = page.next
    return out


@pytest.mark.parametrize(
    "text",
    [
        "",
        "!!!not-base64!!!",
        "A" * 600,
        "bm90LWEtY3Vyc29y",
    ],
)
def test_a_cursor_not_made_here_is_refused(text: str) -> None:
    """Garbage, oversized or unsigned cursors are refused before anything is read."""
    with pytest.raises(timeline.CursorError):
        timeline.decode_cursor(text, KEY, 1)


def test_a_tampered_or_foreign_cursor_is_refused() -> None:
    """One flipped bit, another node's key, or another number of chains: refused."""
    good = timeline.encode_cursor(timeline.Cursor(((1, 4096),), 77, 5), KEY)
    assert timeline.decode_cursor(good, KEY, 1) == timeline.Cursor(((1, 4096),), 77, 5)
    raw = bytearray(good.encode())
    raw[5] = ord("A") if raw[5] != ord("A") else ord("B")
    other = timeline.cursor_key(b"k" * 32, "node-b")
    for text, key, chains in ((raw.decode(), KEY, 1), (good, other, 1), (good, KEY, 2)):
        with pytest.raises(timeline.CursorError):
            timeline.decode_cursor(text, key, chains)


def test_a_signed_cursor_must_still_name_a_line_start_in_a_known_segment(tmp_path: Path) -> None:
    """Even a cursor with a valid MAC (the key leaked, the files changed) is checked against the files."""
    write_log(tmp_path / "audit", events(20), per_file=10)
    with timeline.Timeline([timeline.Chain("", tmp_path / "audit")], None, tmp_path / "i.sqlite") as view:
        view.check(timeline.Cursor(((11, 0),), 0))
        for bad in (((5, 0),), ((1, 3),), ((1, 10**9),)):
            with pytest.raises(timeline.CursorError):
                view.check(timeline.Cursor(bad, 0))
        with pytest.raises(timeline.CursorError):
            view.check(timeline.Cursor(((0, 0),), 10))  # past a Vault log it does not have


def peak_of_a_walk(tmp_path: Path, count: int) -> int:
    write_log(tmp_path / "audit", events(count, step_back_every=101), per_file=50_000)
    vault_log(tmp_path / "vault.log", count)
    chains = [timeline.Chain("", tmp_path / "audit")]
    timeline.Index(tmp_path / "i.sqlite").update(chains, tmp_path / "vault.log")  # built beforehand
    tracemalloc.start()
    try:
        with timeline.Timeline(chains, tmp_path / "vault.log", tmp_path / "i.sqlite") as view:
            seen = sum(1 for e, _ in view.walk(None, merge.Filters()) if view.joined(e))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count + count // 10
    return peak


def test_walking_the_timeline_takes_the_same_memory_for_10k_and_40k_records(tmp_path: Path) -> None:
    """The peak while walking (and joining) every row does not grow with the log: an O(N) structure
    (a list of rows, a dict of Vault entries) would make 40k cost about four times 10k."""
    small = peak_of_a_walk(tmp_path / "small", 10_000)
    large = peak_of_a_walk(tmp_path / "large", 40_000)
    assert large < 2_000_000, large
    assert large < small * 1.5 + 200_000, (small, large)


def test_the_index_is_rebuilt_when_a_file_shrinks(tmp_path: Path) -> None:
    """The index is derived data: a replaced segment (shorter than indexed) rebuilds it, rows stay right."""
    write_log(tmp_path / "audit", events(50), per_file=100)
    chains = [timeline.Chain("", tmp_path / "audit")]
    with timeline.Timeline(chains, None, tmp_path / "i.sqlite") as view:
        assert len(list(view.walk(None, merge.Filters()))) == 50
    write_log(tmp_path / "audit", events(20), per_file=100)
    (tmp_path / "i.sqlite").write_bytes((tmp_path / "i.sqlite").read_bytes())
    with timeline.Timeline(chains, None, tmp_path / "i.sqlite") as view:
        assert len(list(view.walk(None, merge.Filters()))) == 20


def test_a_corrupt_index_is_rebuilt(tmp_path: Path) -> None:
    """Garbage where the index was: rebuilt from the logs, never an error."""
    write_log(tmp_path / "audit", events(30), per_file=100)
    (tmp_path / "i.sqlite").write_bytes(b"not a database at all" * 100)
    chains = [timeline.Chain("", tmp_path / "audit")]
    with timeline.Timeline(chains, None, tmp_path / "i.sqlite") as view:
        assert len(list(view.walk(None, merge.Filters()))) == 30


def test_a_segment_replaced_by_another_file_of_the_same_size_rebuilds_the_index(tmp_path: Path) -> None:
    """A restored segment (another file, same name and length) must not keep the old file's claims."""
    calls = [{"backend": "vault", "id": "v1", "operation": "transit encrypt"}]
    write_log(tmp_path / "audit", [record("r-00000001", 1.0, 5.0, calls)], per_file=10)
    lines = [entry("v1", "kb-transit/encrypt/pay", sent=None, at=1), entry("v2", "p", sent=None, at=1)]
    (tmp_path / "vault.log").write_bytes(b"\n".join(lines) + b"\n")
    chains = [timeline.Chain("", tmp_path / "audit")]

    def vault_rows() -> list[str]:
        with timeline.Timeline(chains, tmp_path / "vault.log", tmp_path / "i.sqlite") as view:
            return [ident(e.row) for e, _ in view.walk(None, merge.Filters(source="vault"))]

    assert vault_rows() == ["v2"]
    segment = tmp_path / "audit" / file_name(1)
    replacement = tmp_path / "replacement"
    replacement.write_bytes(segment.read_bytes().replace(b'"v1"', b'"v2"'))
    replacement.replace(segment)
    assert vault_rows() == ["v1"]
