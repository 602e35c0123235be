"""Verifying and reading an audit log streams it: memory stays flat however many records it holds."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from broker.audit import merge
from broker.audit.chain import GENESIS, SeqSet, canonical, file_name, line_hash, verify
from broker.audit.segments import segment_sources

RECORD = {"type": "event", "principal": "spiffe://bank/app", "operation": "key.encrypt", "outcome": "allowed"}


def chain_lines(count: int, start: int = 1, head: str = GENESIS) -> Iterator[bytes]:
    """``count`` chained event records, made as the sink makes them (canonical lines, hash links)."""
    for seq in range(start, start + count):
        line = canonical({"time": "2026-11-29T10:00:00.000000Z", **RECORD, "seq": seq, "prev": head})
        head = line_hash(line)
        yield line + b"\n"


def write_segments(directory: Path, per_file: int, files: int) -> None:
    head = GENESIS
    for n in range(files):
        first = 1 + n * per_file
        with (directory / file_name(first)).open("wb") as fh:
            for line in chain_lines(per_file, first, head):
                fh.write(line)
                head = line_hash(line.rstrip(b"\n"))


def test_verify_streams_in_constant_memory() -> None:
    """20,000 records given as a line source verify with a peak of a few MB (not the whole log,
    not one hash per record)."""
    tracemalloc.start()
    try:
        report = verify([(file_name(1), lambda: chain_lines(20_000))], None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (report.ok, report.records, report.last_seq) == (True, 20_000, 20_000)
    assert peak < 1_500_000, peak


def test_streamed_and_whole_files_give_the_same_report(tmp_path: Path) -> None:
    """Files read line by line from disk verify exactly as their bytes do (intact and damaged)."""
    write_segments(tmp_path, 500, 4)
    paths = sorted(tmp_path.glob("audit-*.jsonl"))
    whole = [(p.name, p.read_bytes()) for p in paths]
    assert verify(segment_sources(paths), None).to_json() == verify(whole, None).to_json()
    # Damage: drop record 700 and repeat record 1200 at the end of the last file.
    second = paths[1].read_bytes().split(b"\n")
    paths[1].write_bytes(b"\n".join(second[:199] + second[200:]))
    third = paths[2].read_bytes().split(b"\n")
    with paths[3].open("ab") as fh:
        fh.write(third[199] + b"\n")
    whole = [(p.name, p.read_bytes()) for p in paths]
    streamed = verify(segment_sources(paths), None).to_json()
    assert streamed == verify(whole, None).to_json()
    assert streamed["ok"] is False
    assert streamed["first_problem"]["kind"] == "deleted"
    assert streamed["first_problem"]["seq"] == 701


def test_timeline_reads_lines_not_files(tmp_path: Path) -> None:
    """The broker's records for the timeline come from line readers: every record, in order."""
    write_segments(tmp_path, 100, 3)
    rows = merge.broker_records(segment_sources(sorted(tmp_path.glob("audit-*.jsonl"))))
    assert [r["seq"] for r in rows] == list(range(1, 301))


def test_seq_set_keeps_ranges() -> None:
    """Record numbers are kept as ranges: a run costs one range, gaps and out-of-order joins merge."""
    seen = SeqSet()
    for n in range(1, 100_001):
        seen.add(n)
    assert seen.ranges == 1
    for n in (100_005, 100_003, 100_004, 100_001, 100_002):
        seen.add(n)
    assert seen.ranges == 1
    seen.add(7)
    seen.add(200_000)
    assert (seen.ranges, 200_000 in seen, 100_006 in seen, 0 in seen, 50 in seen) == (
        2,
        True,
        False,
        False,
        True,
    )
