"""Merging Vault's audit entries with broker records, filtering, exporting, and the HTML report."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.audit import merge
from broker.audit.report import key_rows, render

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def vault_line(
    kind: str, vid: str, path: str, *, rid: str | None, who: str, policies: list[str], t: int
) -> bytes:
    request: dict[str, Any] = {"id": vid, "operation": "update", "path": path, "remote_address": "127.0.0.1"}
    if rid:
        request["headers"] = {"x-request-id": [rid]}
    auth: dict[str, Any] = {"display_name": who, "policies": policies}
    if who == "approle":  # what OpenBao writes for a token from the broker's AppRole login
        auth |= {
            "metadata": {"role_name": "keybroker-broker"},
            "entity_id": "e-1",
            "token_policies": policies,
        }
    entry = {
        "time": (T0 + timedelta(seconds=t)).isoformat().replace("+00:00", "") + ".123456789Z",
        "type": kind,
        "auth": auth,
        "request": request,
    }
    return json.dumps(entry).encode()


BROKER = ["keybroker-broker"]
VAULT_LOG = [
    vault_line("request", "v1", "kb-transit/encrypt/pay", rid="r1", who="approle", policies=BROKER, t=1),
    vault_line("response", "v1", "kb-transit/encrypt/pay", rid="r1", who="approle", policies=BROKER, t=1),
    vault_line(
        "request", "v2", "kb-kv/data/policy/document", rid="kb-bg-1", who="approle", policies=BROKER, t=2
    ),
    vault_line("request", "v3", "kb-transit/keys/pay", rid=None, who="root", policies=["root"], t=3),
    # Reusing a broker request id does not join: root, and a hand-made token carrying the broker policy.
    vault_line("request", "v5", "kb-transit/decrypt/pay", rid="r1", who="root", policies=["root"], t=5),
    vault_line("request", "v6", "kb-transit/decrypt/pay", rid="r1", who="token", policies=BROKER, t=6),
    # The broker's identity, explained by no record and not its background work: a stolen AppRole.
    vault_line("request", "v7", "kb-transit/decrypt/pay", rid="r9", who="approle", policies=BROKER, t=7),
    b"not json",
    vault_line("request", "v4", "sys/health", rid=None, who="root", policies=["root"], t=4).replace(
        b"2026-", b"20x6-"
    ),
]
BROKER_FILES = [
    (
        "audit-000000000001.jsonl",
        b'{"type":"start","seq":1,"prev":"0","time":"2026-11-23T10:00:00Z"}\n'
        b'{"type":"event","seq":2,"prev":"x","time":"2026-11-23T10:00:01.5Z","request_id":"r1",'
        b'"principal":"spiffe://bank/app/pay","operation":"crypto.encrypt","key":"pay","outcome":"success",'
        b'"status":200,"backend_calls":[{"backend":"vault","id":"v1","operation":"transit encrypt"}]}\n'
        # The broker's own upkeep is claimed by the background record that lists its Vault request id.
        b'{"type":"background","seq":3,"prev":"y","time":"2026-11-23T10:00:02.5Z","since":"2026-11-23T10:00:02Z",'
        b'"backend_calls":[{"backend":"vault","id":"v2","operation":"policy read"}]}\n',
    )
]


def timeline() -> list[dict[str, Any]]:
    return merge.merge(merge.broker_records(BROKER_FILES), merge.vault_entries(VAULT_LOG))


def test_broker_records_carry_their_vault_evidence_and_root_access_is_flagged() -> None:
    """r1 joins only its own Vault entry; the broker's own refresh is claimed by its background record;
    the root read and entries reusing r1 under another identity are bypasses; the broker's identity
    unexplained is flagged."""
    rows = timeline()

    assert [(r["source"], r.get("kind")) for r in rows] == [
        ("vault", "bypass"),  # the entry whose time cannot be read sorts first, and is still shown
        ("broker", "request"),
        ("broker", "background"),
        ("vault", "bypass"),
        ("vault", "bypass"),
        ("vault", "bypass"),
        ("vault", "unexplained"),
    ]
    assert [r.get("vault_request_id") for r in rows[4:]] == ["v5", "v6", "v7"]
    assert [r["unexplained"] for r in rows[4:]] == [False, False, True]
    assert rows[1]["vault"] == [
        {
            "vault_request_id": "v1",
            "time": rows[1]["vault"][0]["time"],
            "operation": "vault.update",
            "path": "kb-transit/encrypt/pay",
            "outcome": "success",
        }
    ]
    assert (rows[3]["principal"], rows[3]["key"], rows[3]["bypass"]) == ("vault:root", "pay", True)


def test_filters_and_exports() -> None:
    """Default hides the broker's upkeep; source=bypass shows bypasses and unexplained use; CSV flattens."""
    rows = timeline()

    default = merge.query(rows, merge.Filters())
    bypass = merge.query(rows, merge.Filters(source="bypass"))
    later = merge.query(rows, merge.Filters(since=T0 + timedelta(seconds=2, microseconds=1)))
    by_principal = merge.query(rows, merge.Filters(principal="spiffe://bank/app/*", operation="crypto.*"))
    csv_text = merge.to_csv(default)

    assert [r["source"] for r in default] == ["vault", "broker", "vault", "vault", "vault", "vault"]
    assert [r["vault_request_id"] for r in bypass] == ["v4", "v3", "v5", "v6", "v7"]
    assert [r.get("vault_request_id") for r in later] == ["v3", "v5", "v6", "v7"]
    assert [r["request_id"] for r in by_principal] == ["r1"]
    assert csv_text.splitlines()[0].startswith("time,source,kind,request_id,principal")
    assert ",r1,spiffe://bank/app/pay,crypto.encrypt,pay,,,success,200,,,v1,vault:v1" in csv_text


def test_vault_nanosecond_times_parse_and_sort() -> None:
    assert merge.parse_time("2026-11-23T10:00:01.123456789Z") == T0 + timedelta(
        seconds=1, microseconds=123456
    )


def test_report_flags_overdue_keys_and_escapes_everything() -> None:
    """A key past its rotation period is overdue; a hostile key name or reason is escaped, not markup."""
    keys = [
        {
            "name": "old<script>",
            "backend": "kms",
            "type": "aes256-gcm",
            "environment": "prod",
            "state": "active",
            "latest_version": 1,
            "rotation_period_seconds": 3600,
            "versions": [{"version": 1, "created_at": (T0 - timedelta(hours=3)).isoformat()}],
        },
        {
            "name": "fresh",
            "backend": "hsm",
            "type": "aes256-gcm",
            "environment": "dev",
            "state": "active",
            "latest_version": 2,
            "rotation_period_seconds": None,
            "versions": [{"version": 2, "created_at": T0.isoformat()}],
        },
    ]
    events: list[dict[str, Any]] = [
        {"source": "broker", "time": "2026-11-23T10:00:00Z", "operation": "crypto.encrypt", "key": "fresh",
         "outcome": "success", "principal": "p1"},
        {"source": "broker", "time": "2026-11-23T10:05:00Z", "operation": "key.rotate", "key": "fresh",
         "outcome": "denied", "principal": "p2", "decision": {"reason": "<b>no</b>"}},
    ]  # fmt: skip
    verification = {"ok": True, "records": 3, "checkpoints": 1, "last_seq": 3}

    rows = {r["name"]: r for r in key_rows(keys, events, T0)}
    html = render(verification=verification, keys=keys, events=events, now=T0, source="test")

    assert (rows["old<script>"]["overdue"], rows["fresh"]["overdue"]) == (True, False)
    assert rows["fresh"]["last_use"] == "2026-11-23T10:00:00Z"
    assert "<script>" not in html
    assert "old&lt;script&gt;" in html
    assert "&lt;b&gt;no&lt;/b&gt;" in html
    assert html.count('class="num overdue"') == 2  # the inventory cell and the overdue table


def test_a_key_with_no_rotation_period_is_overdue_past_the_maximum_cryptoperiod() -> None:
    """No period: the maximum (a year by default) applies; a longer period is capped by it."""

    def key(name: str, period: int | None, age_days: float) -> dict[str, Any]:
        created = (T0 - timedelta(days=age_days)).isoformat()
        return {"name": name, "state": "active", "rotation_period_seconds": period, "versions": [
            {"version": 1, "created_at": created}]}  # fmt: skip

    keys = [
        key("never", None, 400),
        key("young", None, 30),
        key("slow", 730 * 86400, 400),
        key("ok", 86400 * 90, 30),
    ]

    rows = {r["name"]: r for r in key_rows(keys, [], T0)}
    tight = {r["name"]: r for r in key_rows(keys, [], T0, max_cryptoperiod=7 * 86400)}

    assert {n for n, r in rows.items() if r["overdue"]} == {"never", "slow"}
    assert rows["never"]["overdue_why"] == "no rotation period; older than the maximum cryptoperiod (365.0 d)"
    assert rows["slow"]["overdue_why"].startswith("rotation period 730.0 d is longer than the maximum")
    assert {n for n, r in tight.items() if r["overdue"]} == {"never", "young", "slow", "ok"}


def test_setup_rows_are_bypass_rows_before_the_trail_began() -> None:
    """Only bypass rows older than the broker's first record are setup; later root use never is."""
    rows = timeline()
    start = merge.trail_start(rows)
    assert start is not None

    hidden = merge.query(rows, merge.Filters(source="bypass", hide_setup_before=start))

    assert [r["vault_request_id"] for r in hidden] == [
        r["vault_request_id"]
        for r in merge.query(rows, merge.Filters(source="bypass"))
        if merge.time_of(r) >= start
    ]
    assert all(not merge.is_setup(r, None) for r in rows)


def test_full_reason_keeps_the_decision_and_the_error() -> None:
    """The decision's reason in full, prefixed by the error code; a different detail is kept too."""
    denied = {
        "decision": {"reason": "key.rotate on key k is denied: no rule of the roles (app) allows it"},
        "error": {"code": "forbidden", "detail": "key.rotate on key k is denied"},
    }
    failed = {
        "decision": {"reason": "allowed by rule a/b"},
        "error": {"code": "unavailable", "detail": "down"},
    }

    assert merge.full_reason(denied) == (
        "forbidden: key.rotate on key k is denied: no rule of the roles (app) allows it"
    )
    assert merge.full_reason(failed) == "unavailable: down; decision: allowed by rule a/b"
    assert merge.full_reason({"error": "permission denied"}) == "permission denied"
    assert merge.flat({"source": "vault", "path": "kb-kv/data/x"})["vault_path"] == "kb-kv/data/x"


def test_since_and_until_take_relative_times_dates_and_iso() -> None:
    """7d counts back from now; a date is its first instant for --since and its last for --until;
    anything else (a duration reaching before the year 1 included) is a clear error."""
    import pytest

    from broker.cli.audit import parse_moment, parse_period
    from broker.errors import ConfigError

    assert parse_moment("7d", "--since", T0) == T0 - timedelta(days=7)
    assert parse_moment("2026-11-01", "--since", T0) == datetime(2026, 11, 1, tzinfo=UTC)
    assert parse_moment("2026-11-01", "--until", T0, end_of_day=True) == datetime(
        2026, 11, 1, 23, 59, 59, 999999, tzinfo=UTC
    )
    assert parse_moment("2026-11-01T09:00:00Z", "--since", T0) == datetime(2026, 11, 1, 9, tzinfo=UTC)
    assert parse_period("365d", "--max-cryptoperiod") == 365 * 86400
    # The last two: an Arabic-Indic seven, and a time before the year 1 (was an OverflowError).
    for bad in ("7x", "2026-02-30", "", "\u0667d", "999999999d"):
        with pytest.raises(ConfigError):
            parse_moment(bad, "--since", T0)
    with pytest.raises(ConfigError):
        parse_period("0d", "--max-cryptoperiod")
