"""The auditor's views from the CLI: time windows, Vault paths, full reasons, setup rows, cryptoperiods."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.audit.merge import time_of
from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.conftest import https
from tests.integration.keyops import create_key, encrypt


def _csv(stack: DevStack, *args: str) -> list[dict[str, str]]:
    out = keybroker(stack, "audit", "query", *args, "--format", "csv")
    assert out.returncode == 0, out.stderr
    return list(csv.DictReader(io.StringIO(out.stdout.decode())))


def _trail_start(stack: DevStack) -> datetime:
    first = stack.layout.audit_dir / "audit-000000000001.jsonl"
    events = [json.loads(line) for line in first.read_bytes().splitlines()]
    # The broker's records: requests and the background records of its own Vault upkeep.
    return min(time_of(r) for r in events if r.get("type") in ("event", "background"))


def _section(html: str, title: str) -> str:
    return html.split(f"<h2>{title}")[1].split("<h2>")[0]


def test_bypass_rows_show_their_vault_path_and_hide_setup_keeps_later_root_use(stack: DevStack) -> None:
    """Table and CSV name the Vault path; --hide-setup drops only rows from before the broker's trail."""
    name = create_key(stack, "vault")
    direct = stack.vault_client().secrets.transit.read_key(name=name, mount_point="kb-transit")
    start = _trail_start(stack)

    everything = _csv(stack, "--source", "bypass")
    hidden = keybroker(stack, "audit", "query", "--source", "bypass", "--hide-setup", "--format", "csv")
    kept = list(csv.DictReader(io.StringIO(hidden.stdout.decode())))
    table = keybroker(stack, "audit", "query", "--source", "bypass", "--key", name)

    mine = [r for r in everything if r["vault_request_ids"] == direct["request_id"]]
    assert [(r["principal"], r["vault_path"]) for r in mine] == [("vault:root", f"kb-transit/keys/{name}")]
    setup = [r for r in everything if time_of(r) < start]
    assert setup, "the stack's bootstrap made root-token calls before the broker started"
    assert all(r["vault_path"] for r in setup), [r for r in setup if not r["vault_path"]][:3]
    assert hidden.returncode == 0, hidden.stderr
    assert direct["request_id"] in {r["vault_request_ids"] for r in kept}
    assert all(time_of(r) >= start for r in kept)

    # Rows keep arriving between the two queries (other replicas' upkeep shows as unexplained in
    # this node's timeline), so compare rows, not counts: every later row stays, no setup row does.
    def row_key(r: dict[str, str]) -> tuple[str, str, str]:
        return r["time"], r["vault_request_ids"], r["vault_path"]

    kept_keys = {row_key(r) for r in kept}
    assert not any(row_key(r) in kept_keys for r in setup)
    assert all(row_key(r) in kept_keys for r in everything if time_of(r) >= start)
    assert f"left out {len(setup)} Vault bypass rows from before the broker's audit trail began" in (
        hidden.stderr.decode()
    )
    assert f"success  kb-transit/keys/{name}" in table.stdout.decode()


def test_the_csv_reason_carries_the_whole_decision_reason(stack: DevStack) -> None:
    """A denial's CSV reason is the policy engine's reason, not only the short detail the caller got."""
    name = create_key(stack, "kms")
    denied = https(stack, f"/v1/keys/{name}/rotate", who="app", body={})

    rows = _csv(stack, "--key", name, "--outcome", "denied", "--since", "10m")

    assert denied.status == 403
    assert [r["reason"] for r in rows] == [
        f"forbidden: key.rotate on key {name} is denied: no rule of the roles (application) allows it"
    ]


def test_relative_times_and_dates_choose_the_window(stack: DevStack) -> None:
    """--since 10m / a date / --until a date: the right rows; a bad time is a usage error naming the flag."""
    name = create_key(stack, "vault")
    encrypt(stack, name, b"in the window")
    today = datetime.now(UTC).date()
    tomorrow, yesterday = (today + timedelta(days=1)).isoformat(), (today - timedelta(days=1)).isoformat()

    recent = _csv(stack, "--key", name, "--since", "10m")
    today_only = _csv(stack, "--key", name, "--since", today.isoformat(), "--until", today.isoformat())
    future = _csv(stack, "--key", name, "--since", tomorrow)
    past = _csv(stack, "--key", name, "--until", yesterday)
    bad = keybroker(stack, "audit", "query", "--since", "last tuesday")

    assert {r["operation"] for r in recent} >= {"key.create", "crypto.encrypt"}
    assert len(today_only) == len(recent)
    assert (future, past) == ([], [])
    assert bad.returncode == 2
    assert "--since: 'last tuesday' is not a time; give 7d, 12h, 30m (that long ago)" in bad.stderr.decode()


def test_report_until_and_the_maximum_cryptoperiod(stack: DevStack, tmp_path: Path) -> None:
    """report --until leaves later use out; a key with no rotation period is overdue past the maximum."""
    before = datetime.now(UTC) - timedelta(seconds=1)
    unrotated = create_key(stack, "vault")
    rotating = create_key(stack, "vault", rotation_period="90d")
    encrypt(stack, unrotated, b"used after --until")
    time.sleep(2.1)
    strict, default = tmp_path / "strict.html", tmp_path / "default.html"

    made = keybroker(
        stack,
        "audit",
        "report",
        "--out",
        str(strict),
        "--until",
        before.isoformat(),
        "--max-cryptoperiod",
        "2s",
    )
    plain = keybroker(stack, "audit", "report", "--out", str(default), "--since", "1h")
    html, relaxed = strict.read_text(), default.read_text()

    assert made.returncode == 0, made.stderr
    assert plain.returncode == 0, plain.stderr
    overdue = _section(html, "Keys overdue for rotation")
    assert f"<code>{unrotated}</code>" in overdue
    assert "no rotation period; older than the maximum cryptoperiod (2 s)" in overdue
    assert f"<code>{rotating}</code>" in overdue  # 90 d is longer than the maximum: the maximum applies
    assert unrotated not in _section(html, "Operations per key and principal")
    assert f"until {before.isoformat(timespec='seconds')}" in html
    assert unrotated in _section(relaxed, "Operations per key and principal")
    assert unrotated not in _section(relaxed, "Keys overdue for rotation")
    assert "Maximum cryptoperiod: 365.0 d" in relaxed


def test_a_reader_that_stops_early_ends_the_query_quietly(stack: DevStack) -> None:
    """`keybroker audit query | true` (a reader gone before any row): no 'unexpected BrokenPipeError'."""
    tls = stack.layout.tls
    env = {
        **os.environ,
        "KEYBROKER_ADDR": stack.broker_url,
        "KEYBROKER_CACERT": str(tls / "ca.pem"),
        "KEYBROKER_CLIENT_CERT": str(tls / "admin.crt"),
        "KEYBROKER_CLIENT_KEY": str(tls / "admin.key"),
    }
    command = f"({shlex.quote(sys.executable)} -m broker audit query; echo exit $? >&2) | true"

    ran = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120, check=False
    )

    assert ran.stderr == "exit 141\n"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_hostile_cursors_and_times_at_the_ends_of_the_calendar_are_answered(stack: DevStack) -> None:
    """Garbage, oversized and non-ASCII cursors are a 400 problem+json; a well-formed cursor or a since
    at year 1 or 9999 (the streamed timeline seeks back from them) is an answer, never a 500."""
    name = create_key(stack, "vault")
    for text in (b"one", b"two", b"three"):
        assert encrypt(stack, name, text).status == 200
    hostile = ["!!!", "A" * 600, "%C3%A9t%C3%A9", "%D9%A1%D9%A2", _b64("☃".encode()), _b64(b'["x", 1]')]
    refused = [https(stack, f"/v1/audit/events?cursor={c}&limit=2") for c in hostile]
    edges = [
        f"cursor={_b64(json.dumps(['0001-01-01T00:00:00+00:00', 'b:0']).encode())}",
        f"cursor={_b64(json.dumps(['9999-12-31T23:59:59.999999+00:00', 'v:z']).encode())}",
        "since=0001-01-01T00:00:00Z&cursor=start",
        "since=0001-01-01T00:00:00Z",
        "until=9999-12-31T23:59:59Z",
    ]
    answered = [https(stack, f"/v1/audit/events?{q}&limit=2") for q in edges]

    for reply in refused:
        assert (reply.status, reply.json()["code"]) == (400, "bad_request"), reply.body[:200]
        assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert [r.status for r in answered] == [200] * len(edges), [r.body[:200] for r in answered]
    first, last, paged, since, until = (r.json() for r in answered)
    assert (first["count"], first["next"] is not None) == (2, True)  # year 1: from the beginning
    assert (last["count"], last["next"]) == (0, None)  # year 9999: nothing after it
    assert paged["events"] == first["events"]
    assert since["count"] == until["count"] == 2
