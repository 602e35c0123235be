"""How many audit records per second the sink makes durable, against fsync-per-record, in one run.

    .venv/bin/python -m bench.audit_sink [--dir DIR] [--records N]

Every figure is measured in this run on this disk: the baseline writes and
fsyncs each record alone (what a naive fail-closed log does); the sink commits
the records of concurrent requests together (one write + one fsync per batch),
still before any of them is answered. A software P-256 key stands in for the HSM
(a checkpoint every 1,000 records costs one signature).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from broker.audit.chain import canonical, verify
from broker.audit.sink import AuditSink
from tests.unit.test_audit_chain import SoftSigner  # the same software stand-in for the HSM

RECORD = {
    "type": "event",
    "request_id": "5b9364f8-c433-4eef-a6bb-815de1f5a148",
    "principal": "spiffe://keybroker.dev/app/payments",
    "operation": "crypto.encrypt",
    "key": "payments",
    "outcome": "success",
    "status": 200,
    "context": {"tenant": "hmac-sha256:" + "ab" * 32},
    "backend_calls": [
        {"backend": "vault", "id": "0e8575a4-5de9-a6ef-f352-e86efb417d10", "operation": "encrypt"}
    ],
}


def fsync_per_record(directory: Path, records: int) -> float:
    path = directory / "baseline.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    line = canonical(RECORD) + b"\n"
    started = time.perf_counter()
    for _ in range(records):
        os.write(fd, line)
        os.fsync(fd)
    elapsed = time.perf_counter() - started
    os.close(fd)
    return records / elapsed


async def sink_rate(directory: Path, records: int, concurrency: int) -> tuple[float, float]:
    """(records/s, mean records per fsync) with ``concurrency`` requests in flight."""
    sink = AuditSink(directory, signer=SoftSigner(), checkpoint_every=1000, checkpoint_seconds=3600)
    await sink.start()
    per_worker = records // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await sink.append(dict(RECORD))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await sink.close()
    return per_worker * concurrency / elapsed, sink.records_written / sink.batches_written


def check_chain(directory: Path) -> None:
    """A benchmark that wrote a broken chain measured nothing worth having."""
    report = verify([(p.name, p.read_bytes()) for p in sorted(directory.glob("audit-*.jsonl"))], None)
    if not report.ok:
        raise SystemExit(f"the sink wrote a broken chain in {directory}: {report.first_problem}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", help="a directory on the disk to measure (default: a temporary one)")
    parser.add_argument("--records", type=int, default=4000)
    args = parser.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="kb-audit-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"audit sink on {base} ({args.records} records per row; every row fsyncs before answering)")
    baseline = fsync_per_record(base, min(args.records, 2000))
    print(f"{'mode':<34} {'records/s':>10} {'x baseline':>11} {'records/fsync':>14}")
    print(f"{'baseline: write+fsync per record':<34} {baseline:>10.0f} {1.0:>11.2f} {1.0:>14.1f}")
    for concurrency in (1, 16, 64, 256):
        directory = base / f"sink-c{concurrency}"
        rate, per_fsync = asyncio.run(sink_rate(directory, args.records, concurrency))
        check_chain(directory)
        label = f"sink, {concurrency} requests in flight"
        print(f"{label:<34} {rate:>10.0f} {rate / baseline:>11.2f} {per_fsync:>14.1f}")


if __name__ == "__main__":
    main()
