"""How broker records claim Vault entries (ids the broker noted, unnumbered calls in a window),
background records, outcomes of batches, bounded record text, and formula-safe CSV cells."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.audit import events, merge
from broker.policy.model import Decision
from broker.requestvars import (
    MAX_BACKGROUND_CALLS,
    backend_calls_var,
    note_backend_call,
    parse_unnumbered,
    restore_background_calls,
    take_background_calls,
    unnumbered,
)

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
BROKER_AUTH = {
    "display_name": "approle",
    "policies": ["keybroker-broker"],
    "token_policies": ["keybroker-broker"],
    "entity_id": "e-1",
}


def entry(vid: str, path: str, *, sent: str | None, at: float, auth: dict[str, Any] | None = None) -> bytes:
    request: dict[str, Any] = {"id": vid, "operation": "read", "path": path}
    if sent is not None:
        request["headers"] = {"x-request-id": [sent]}
    moment = (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    return json.dumps(
        {"time": moment, "type": "response", "auth": auth or BROKER_AUTH, "request": request}
    ).encode()


def record(rid: str, at: float, latency_ms: float, calls: list[dict[str, Any]]) -> dict[str, Any]:
    moment = (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")
    return {
        "type": "event",
        "source": "broker",
        "kind": "request",
        "request_id": rid,
        "time": moment,
        "latency_ms": latency_ms,
        "backend_calls": calls,
    }


def miss(sent: str, path: str) -> dict[str, Any]:
    return events.backend_call("vault", "kv read", unnumbered(404, sent, path))


def claimed_by_record(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = next(r for r in timeline if r["source"] == "broker")["vault"]
    return found


def kinds(timeline: list[dict[str, Any]]) -> dict[str, str]:
    return {str(r["vault_request_id"]): str(r["kind"]) for r in timeline if r["source"] == "vault"}


def test_an_unnumbered_call_claims_one_matching_entry_inside_its_window() -> None:
    """A call Vault answered without an id claims exactly one broker-identity entry with the header the
    broker sent and the path, inside the record's window; a copy, a late one, or another path is flagged."""
    path = "kb-kv/data/keys/missing"
    vault = merge.vault_entries(
        [
            entry("v1", path, sent="r-00000001", at=0.5),  # the broker's own 404
            entry("v2", path, sent="r-00000001", at=0.6),  # a copy with the same header and path
            entry("v3", path, sent="r-00000001", at=30),  # outside the window
            entry("v4", "kb-transit/decrypt/k", sent="r-00000001", at=0.7),  # header alone: never
        ]
    )
    timeline = merge.merge([record("r-00000001", 1.0, 800.0, [miss("r-00000001", path)])], vault)

    assert [v["vault_request_id"] for v in claimed_by_record(timeline)] == ["v1"]
    assert kinds(timeline) == {"v2": "unexplained", "v3": "unexplained", "v4": "unexplained"}


def test_ids_join_first_and_headers_never_join_alone() -> None:
    """An entry claimed by its Vault id is not taken by an unnumbered note; a broker-identity entry whose
    header equals a record's id but which the record did not note is unexplained, kb-bg- or not."""
    vault = merge.vault_entries(
        [
            entry("v1", "kb-transit/encrypt/k", sent="r-00000001", at=0.5),
            entry("v2", "kb-transit/decrypt/k", sent="r-00000001", at=0.6),
            entry("v3", "kb-transit/decrypt/k", sent="kb-bg-00000000", at=0.7),
            entry("v4", "kb-transit/decrypt/k", sent="r-00000001", at=0.8, auth={"display_name": "root"}),
        ]
    )
    calls = [events.backend_call("vault", "transit encrypt", "v1")]
    timeline = merge.merge([record("r-00000001", 1.0, 800.0, calls)], vault)

    assert [v["vault_request_id"] for v in claimed_by_record(timeline)] == ["v1"]
    assert kinds(timeline) == {"v2": "unexplained", "v3": "unexplained", "v4": "bypass"}


def test_a_background_record_claims_its_calls_and_is_hidden_by_default() -> None:
    """Upkeep calls listed in a background record (by id, or unnumbered within since..time) are its
    evidence; the default view leaves the record out, source=broker shows it."""
    vault = merge.vault_entries(
        [
            entry("v1", "auth/token/renew-self", sent="kb-bg-1", at=2),
            entry("v2", "p/x", sent="kb-bg-22", at=3),
        ]
    )
    upkeep = {
        "type": "background",
        "time": (T0 + timedelta(seconds=4)).isoformat(),
        "since": (T0 + timedelta(seconds=2)).isoformat(),
        "backend_calls": [
            events.backend_call("vault", "token renew", "v1"),
            events.backend_call("vault", "kv delete", unnumbered(204, "kb-bg-22", "p/x")),
        ],
    }
    files = [("audit-1.jsonl", json.dumps(upkeep).encode())]
    timeline = merge.merge(merge.broker_records(files), vault)

    assert [r["kind"] for r in timeline] == ["background"]
    assert [v["vault_request_id"] for v in timeline[0]["vault"]] == ["v1", "v2"]
    assert merge.query(timeline, merge.Filters()) == []
    assert len(merge.query(timeline, merge.Filters(source="broker"))) == 1


def test_a_vault_header_outside_the_request_id_syntax_is_not_shown_as_one() -> None:
    """Vault logs whatever X-Request-Id its caller sent: a formula or a control character is dropped."""
    rows = merge.vault_entries(
        [
            entry("v1", "p", sent='=HYPERLINK("http://x")', at=1),
            entry("v2", "p", sent="ok-request-1", at=1),
            entry("v3", "p", sent="a\x1b[2Jbcdefgh", at=1),
        ]
    )

    assert [r["request_id"] for r in rows] == [None, "ok-request-1", None]


def test_csv_cells_that_a_spreadsheet_would_evaluate_are_neutralised() -> None:
    """Every cell starting with = + - @ TAB CR gets a leading quote; other cells are unchanged."""
    assert [
        merge.safe_cell(v) for v in ("=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "kb-transit/x", "")
    ] == [
        "'=1+2",
        "'+1",
        "'-1",
        "'@SUM(A1)",
        "'\tx",
        "'\rx",
        "kb-transit/x",
        "",
    ]
    row = {
        "source": "vault",
        "kind": "bypass",
        "path": "=2+5",
        "principal": "@evil",
        "vault_request_id": "-1",
    }
    assert merge.to_csv([row]).splitlines()[1].split(",")[4] == "'@evil"


def _event(status: int, decisions: list[Decision], facts: events.RequestFacts) -> dict[str, Any]:
    facts.decisions = decisions
    return events.build_event(
        request_id="r",
        principal="p",
        method="POST",
        route="/v1/keys/{name}/decrypt",
        status=status,
        latency_ms=1.0,
        facts=facts,
        calls=[],
        hmac_key=b"k" * 32,
    )


def test_a_batch_outcome_comes_from_its_items_decisions() -> None:
    """All items denied → denied, some → partial, none → success, each with the denied count."""
    yes, no = Decision(True, "crypto.decrypt", "ok"), Decision(False, "crypto.decrypt", "no")

    all_denied = _event(200, [no, no], events.RequestFacts(items=2))
    some = _event(200, [yes, no], events.RequestFacts(items=2))
    none = _event(200, [yes, yes], events.RequestFacts(items=2))
    single = _event(200, [yes], events.RequestFacts())

    assert (all_denied["outcome"], all_denied["items_denied"]) == ("denied", 2)
    assert (some["outcome"], some["items_denied"]) == ("partial", 1)
    assert (none["outcome"], none["items_denied"]) == ("success", 0)
    assert single["outcome"] == "success"


def test_record_text_and_contexts_are_bounded_and_every_key_is_named() -> None:
    """A huge error detail or reason is cut; many large contexts are kept within a budget and counted;
    a rewrap's target is named in keys."""
    no = Decision(False, "crypto.decrypt", "r" * 100_000)
    facts = events.RequestFacts(key="a", other_keys=["b"], error=("bad_request", "x" * 900_000))
    facts.contexts = [{f"{i:03d}{f:02d}".ljust(128, "n"): "v" for f in range(32)} for i in range(100)]
    event = _event(400, [no], facts)

    assert len(json.dumps(event)) < 32 * 1024
    assert event["error"]["detail"].startswith("x" * events.MAX_TEXT)
    assert "cut" in event["error"]["detail"]
    assert len(event["decision"]["reason"]) < events.MAX_TEXT + 64
    assert event["contexts_omitted"] == 100 - len(event["contexts"]) > 0
    assert event["keys"] == ["a", "b"]
    assert merge.Filters(key="b").match({**event, "source": "broker", "time": T0.isoformat()})


def test_calls_outside_requests_are_kept_for_the_background_record_bounded() -> None:
    """A call noted outside a request goes to the background buffer (bounded, the rest counted); one
    inside a request to the request's list; restored calls come back after a failed write."""
    take_background_calls()
    token = backend_calls_var.set([])
    note_backend_call("vault", "transit encrypt", "in-request")
    inside = backend_calls_var.get()
    backend_calls_var.reset(token)
    for i in range(MAX_BACKGROUND_CALLS + 3):
        note_backend_call("vault", "token renew", f"bg-{i}")
    calls, since, dropped = take_background_calls()
    restore_background_calls(calls[:2], since, dropped)
    again = take_background_calls()

    assert inside == [("vault", "transit encrypt", "in-request")]
    assert (len(calls), dropped, since is not None) == (MAX_BACKGROUND_CALLS, 3, True)
    assert (again[0], again[2]) == (calls[:2], 3)
    assert parse_unnumbered(unnumbered(204, "kb-bg-1", "kb-kv/metadata/x y")) == (
        204,
        "kb-bg-1",
        "kb-kv/metadata/x y",
    )
    assert parse_unnumbered("8c1d-uuid") is None


def test_the_table_escapes_terminal_control_sequences_from_vault() -> None:
    """A Vault path (and so the key column) or display name carrying ESC sequences is shown escaped."""
    row = {
        "source": "vault",
        "kind": "bypass",
        "bypass": True,
        "principal": "vault:\x1b]0;owned\x07",
        "operation": "vault.update",
        "key": "k\x1b[2J",
        "path": "kb-transit/encrypt/k\x1b[2J\x9b",
        "time": T0.isoformat(),
    }
    table = merge.to_table([row])

    assert "\x1b" not in table
    assert "\x07" not in table
    assert "\x9b" not in table  # the one-byte CSI as well (the path was printed as it came)
    assert "k\\x1b[2J" in table
