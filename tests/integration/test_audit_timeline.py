"""Paging the merged timeline on the real stack: every record once, in the unpaged order, across
several segment files and record times that step back; hostile cursors refused; Vault joins kept."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.common import free_port
from broker.devstack.stack import DevStack
from tests.integration.conftest import https
from tests.integration.keyops import b64, create_key

REPO = Path(__file__).resolve().parents[2]
# Loaded by the replica's interpreter at start (sitecustomize): the audit sink's clock becomes real
# time plus the seconds in the file named by KB_TEST_CLOCK_FILE, so the test steps record times back.
CLOCK_SHIM = """\
import os
from datetime import timedelta

import broker.audit.sink as _sink

_real = _sink.now_utc


def _now():
    try:
        with open(os.environ["KB_TEST_CLOCK_FILE"]) as fh:
            offset = float(fh.read().strip() or 0)
    except (OSError, ValueError):
        offset = 0.0
    return _real() + timedelta(seconds=offset)


_sink.now_utc = _now
"""


class Replica:
    def __init__(self, url: str, clock: Path, audit_dir: Path) -> None:
        self.url, self.clock, self.audit_dir = url, clock, audit_dir

    def step_clock(self, seconds: float) -> None:
        self.clock.write_text(str(seconds))


@pytest.fixture(scope="module")
def replica(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    """A broker of its own (own audit directory, 2 KiB segments) whose audit clock the test sets."""
    root = tmp_path_factory.mktemp("timeline")
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(CLOCK_SHIM)
    clock = root / "clock"
    clock.write_text("0")
    port = free_port()
    config = root / "broker.toml"
    config.write_text(
        stack.render_broker_config(port=port) + "max_file_bytes = 2048\ncheckpoint_every = 25\n"
    )
    child = stack.spawn_broker(
        "broker-timeline",
        config,
        PYTHONPATH=f"{root / 'shim'}:{REPO}",
        KB_TEST_CLOCK_FILE=str(clock),
    )
    url = f"https://127.0.0.1:{port}"
    try:
        stack.wait_healthy(child, url)
        yield Replica(url, clock, stack.layout.audit_dir.with_name(f"audit-{port}"))
    finally:
        child.stop()


def encrypt_on(stack: DevStack, replica: Replica, key: str, n: int) -> str:
    reply = https(
        stack,
        f"/v1/keys/{key}/encrypt",
        url=replica.url,
        body={"plaintext": b64(b"x"), "context": {}},
        headers={"X-Request-Id": f"tl-{key}-{n:04d}"},
    )
    assert reply.status == 200, reply.body
    return f"tl-{key}-{n:04d}"


def events(stack: DevStack, replica: Replica, query: str) -> dict[str, Any]:
    reply = https(stack, f"/v1/audit/events?{query}", url=replica.url)
    assert reply.status == 200, reply.body
    answer: dict[str, Any] = reply.json()
    return answer


def walk(
    stack: DevStack, replica: Replica, query: str, cursor: str = "start"
) -> tuple[list[Any], str | None]:
    """Pages from ``cursor`` to the last; the rows and the last page's own cursor (to resume later)."""
    rows: list[Any] = []
    for _ in range(500):  # bounded: a cursor that never advanced would loop forever
        answer = events(stack, replica, f"{query}&cursor={cursor}")
        rows += answer["events"]
        if answer["next"] is None:
            return rows, cursor
        cursor = answer["next"]
    raise AssertionError("the walk did not end")


def ident(row: dict[str, Any]) -> str:
    return str(row.get("client_request_id") or row.get("vault_request_id"))


def test_paging_returns_every_record_once_while_times_step_back_and_the_log_grows(
    stack: DevStack, replica: Replica
) -> None:
    """Records written after a page whose clock stepped back an hour still come in the next pages
    (a time-based cursor skipped them); the finished walk equals the unpaged answer row for row,
    spans several segment files, and keeps every record's Vault evidence."""
    key = create_key(stack, "vault")
    sent = [encrypt_on(stack, replica, key, n) for n in range(12)]
    query = f"key={key}&limit=5"
    first = events(stack, replica, f"{query}&cursor=start")
    replica.step_clock(-3600)  # NTP steps the wall clock back an hour
    try:
        sent += [encrypt_on(stack, replica, key, n) for n in range(12, 24)]
    finally:
        replica.step_clock(0)
    sent += [encrypt_on(stack, replica, key, n) for n in range(24, 30)]
    rest, _ = walk(stack, replica, query, first["next"])
    walked = first["events"] + rest
    paged, _ = walk(stack, replica, query)
    unpaged = events(stack, replica, f"key={key}&limit=10000")

    # The key's creation and upkeep went through the stack's own broker: in this replica's view its
    # Vault calls are rows of their own (unexplained), and more may come at any time.
    mine = [r for r in paged if r["source"] == "broker"]
    assert [ident(r) for r in walked if r["source"] == "broker"] == sent  # every record once, in order
    assert len({ident(r) for r in walked}) == len(walked)
    assert [ident(r) for r in mine] == [ident(r) for r in unpaged["events"] if r["source"] == "broker"]
    assert [ident(r) for r in mine] == sent
    stepped = [r for r in mine if r["time"] < mine[0]["time"]]
    assert len(stepped) == 12  # the records stamped an hour early are there
    joined = [[v["path"] for v in r["vault"]] for r in mine]
    missing = [r for r, paths in zip(mine, joined, strict=True) if f"kb-transit/encrypt/{key}" not in paths]
    assert not missing, json.dumps(missing[:2])
    assert len(list(replica.audit_dir.glob("audit-*.jsonl"))) >= 5


def cursor_of(stack: DevStack, replica: Replica) -> str:
    answer = events(stack, replica, "limit=1&cursor=start&source=broker")
    assert answer["next"], answer
    return str(answer["next"])


def tampered(cursor: str) -> str:
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[10] ^= 0x01  # one bit of a position
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


def test_a_tampered_or_foreign_cursor_is_a_400_problem(stack: DevStack, replica: Replica) -> None:
    """A cursor with one bit changed, one from another broker, or junk is refused as problem+json
    (400, bad_request) before any file is read; the genuine one works on the broker that made it."""
    mine = cursor_of(stack, replica)
    foreign = https(stack, "/v1/audit/events?limit=1&cursor=start&source=broker").json()["next"]
    answers = {
        "tampered": https(stack, f"/v1/audit/events?cursor={tampered(mine)}", url=replica.url),
        "foreign": https(stack, f"/v1/audit/events?cursor={foreign}", url=replica.url),
        "junk": https(stack, "/v1/audit/events?cursor=" + "A" * 40, url=replica.url),
        "long": https(stack, "/v1/audit/events?cursor=" + "A" * 600, url=replica.url),
    }
    for name, reply in answers.items():
        assert reply.status == 400, (name, reply.body)
        assert reply.headers["Content-Type"].startswith("application/problem+json"), name
        problem = json.loads(reply.body)
        assert problem["code"] == "bad_request", (name, problem)
        assert "'cursor' must be 'start'" in problem["detail"], (name, problem)
    assert events(stack, replica, f"limit=1&source=broker&cursor={mine}")["count"] == 1


def test_the_index_is_derived_data_rebuilt_when_missing_or_damaged(stack: DevStack, replica: Replica) -> None:
    """Deleting or corrupting the timeline index changes no answer: it is rebuilt from the logs."""
    key = create_key(stack, "vault")
    sent = [encrypt_on(stack, replica, key, n) for n in range(3)]
    before = events(stack, replica, f"key={key}&source=broker")
    index = replica.audit_dir / ".timeline-index.sqlite"
    assert index.is_file()
    assert index.stat().st_mode & 0o077 == 0
    index.write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    after = events(stack, replica, f"key={key}&source=broker")
    assert [ident(r) for r in after["events"]] == [ident(r) for r in before["events"]] == sent


def test_an_index_that_cannot_be_written_is_a_503_problem(stack: DevStack, replica: Replica) -> None:
    """An immutable index file (a read-only or full disk behaves alike) answers 503 timeline_unavailable
    as problem+json with Retry-After, never a 500 or a traceback; reading works again once it can."""
    events(stack, replica, "limit=1")  # the index exists
    index = replica.audit_dir / ".timeline-index.sqlite"
    subprocess.run(["chattr", "+i", str(index)], check=True)
    try:
        refused = https(stack, "/v1/audit/events?limit=1", url=replica.url)
    finally:
        subprocess.run(["chattr", "-i", str(index)], check=True)
    again = https(stack, "/v1/audit/events?limit=1", url=replica.url)

    assert refused.status == 503, refused.body
    assert refused.headers["Content-Type"].startswith("application/problem+json")
    assert refused.json()["code"] == "timeline_unavailable"
    assert refused.headers.get("Retry-After") == "5"
    assert b"Traceback" not in refused.body
    assert again.status == 200, again.body
