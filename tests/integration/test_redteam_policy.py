"""Red-team findings on policy and authorisation (1, 6, 11, 12, 13), on the real stack.

The first test of each group is the red team's (adapted to the current layout); the others are
siblings found while fixing: other ways the same hole opened.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

from broker.devstack.stack import DevStack
from tests.integration.conftest import Reply, extra_broker, https
from tests.integration.keyops import b64, create_key, unique
from tests.integration.policyops import bind, identity, put_role


def _wait_for_binding(stack: DevStack, stem: str, path: str, body: object | None = None) -> Reply:
    """Poll until the new binding has reached the policy cache (bounded: refresh_seconds and then some)."""
    deadline = time.monotonic() + 10
    while True:
        reply = https(stack, path, who=stem, body=body)
        if reply.status != 403 or time.monotonic() > deadline:
            return reply
        time.sleep(0.3)


def _record(stack: DevStack, reply: Reply) -> list[dict[str, object]]:
    request_id = reply.headers["X-Broker-Request-Id"].encode()
    return [
        json.loads(line)
        for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
        if request_id in line
    ]


# -- 1. a tag rewrite must not change which of the updater's own rules apply ------------------


def _team_role(stack: DevStack, team: str) -> tuple[str, str]:
    """A member who may update, read and use team=T keys, and is denied decrypt on class=secret."""
    role = unique("team-role")
    put_role(
        stack,
        role,
        [
            {"operations": ["key.update", "key.read", "crypto.*"], "keys": {"tags": {"team": team}}},
            {"effect": "deny", "operations": ["crypto.decrypt"], "keys": {"tags": {"class": "secret"}}},
        ],
    )
    stem, principal = identity(stack, unique("member"), "user")
    bind(stack, principal, role)
    return stem, principal


def test_key_update_cannot_rewrite_the_tags_that_deny_the_updater(stack: DevStack) -> None:
    """Attack (policy bypass): a role may update and use its team's keys (tags team=T) but is
    explicitly denied crypto.decrypt on keys tagged class=secret. On a key tagged {team: T, class:
    secret} the principal PATCHes tags to {team: T} and then decrypts. The PATCH must be refused
    (403, saying why) and the decrypt stay denied.
    """
    team = unique("team")
    stem, _ = _team_role(stack, team)
    key = create_key(stack, "vault", tags={"team": team, "class": "secret"})
    kb1 = https(stack, f"/v1/keys/{key}/encrypt", body={"plaintext": b64(b"payroll")}).json()["ciphertext"]
    deadline = time.monotonic() + 10  # the binding reaches the policy cache within refresh_seconds
    while True:
        before = https(stack, f"/v1/keys/{key}/decrypt", who=stem, body={"ciphertext": kb1})
        if "explicitly denied" in before.body.decode() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert before.status == 403, before.body  # the deny rule holds as long as the tag is there
    patched = https(stack, f"/v1/keys/{key}", who=stem, method="PATCH", body={"tags": {"team": team}})
    after = https(stack, f"/v1/keys/{key}/decrypt", who=stem, body={"ciphertext": kb1})
    assert after.status == 403, (
        f"after rewriting the key's tags the denied principal decrypts: {after.body!r}"
    )
    assert patched.status == 403, patched.body
    assert "would change which of your own rules apply" in patched.json()["detail"], patched.body
    shown = https(stack, f"/v1/keys/{key}").json()
    assert shown["tags"] == {"team": team, "class": "secret"}


def test_key_update_cannot_add_tags_that_widen_the_updaters_own_rules(stack: DevStack) -> None:
    """Sibling: a member may update team=T keys and decrypt only keys also tagged tier=open.
    Adding tier=open to a team key would hand it decrypt: refused, and decrypt stays denied.
    Moving a key to another team (out of its own update rule) is refused too."""
    team = unique("team")
    role = unique("open-role")
    put_role(
        stack,
        role,
        [
            {"operations": ["key.update", "key.read", "crypto.encrypt"], "keys": {"tags": {"team": team}}},
            {"operations": ["crypto.decrypt"], "keys": {"tags": {"tier": "open"}}},
        ],
    )
    stem, principal = identity(stack, unique("member"), "user")
    bind(stack, principal, role)
    key = create_key(stack, "vault", tags={"team": team})
    kb1 = https(stack, f"/v1/keys/{key}/encrypt", body={"plaintext": b64(b"x")}).json()["ciphertext"]
    assert _wait_for_binding(stack, stem, f"/v1/keys/{key}").status == 200

    widened = https(
        stack, f"/v1/keys/{key}", who=stem, method="PATCH", body={"tags": {"team": team, "tier": "open"}}
    )
    moved = https(stack, f"/v1/keys/{key}", who=stem, method="PATCH", body={"tags": {"team": "victims"}})
    decrypted = https(stack, f"/v1/keys/{key}/decrypt", who=stem, body={"ciphertext": kb1})

    assert (widened.status, moved.status, decrypted.status) == (403, 403, 403), (
        widened.body,
        moved.body,
        decrypted.body,
    )
    assert https(stack, f"/v1/keys/{key}").json()["tags"] == {"team": team}


def test_key_update_may_change_tags_no_rule_of_the_updater_depends_on(stack: DevStack) -> None:
    """What stays allowed: a member changes a tag none of its rules select on (and the description);
    a break-glass administrator retags freely, deny rules or not."""
    team = unique("team")
    stem, _ = _team_role(stack, team)
    key = create_key(stack, "vault", tags={"team": team, "owner": "alice"})
    assert _wait_for_binding(stack, stem, f"/v1/keys/{key}").status == 200

    mine = https(
        stack,
        f"/v1/keys/{key}",
        who=stem,
        method="PATCH",
        body={"tags": {"team": team, "owner": "bob"}, "description": "moved to bob"},
    )
    admin = https(stack, f"/v1/keys/{key}", method="PATCH", body={"tags": {"team": team, "class": "secret"}})

    assert mine.status == 200, mine.body
    assert mine.json()["tags"] == {"team": team, "owner": "bob"}
    assert admin.status == 200, admin.body
    assert admin.json()["tags"] == {"team": team, "class": "secret"}


# -- 6. what a caller with no rights costs ----------------------------------------------------


def test_a_zero_role_caller_cannot_make_megabyte_audit_records(stack: DevStack) -> None:
    """Attack (disk exhaustion): a certificate bound to no role POSTs /v1/keys with a 900 KB
    ``backend`` string. The broker must refuse before reading the body (403), and the one audit
    record stays small.
    """
    stem, _ = identity(stack, unique("nobody"), "app")
    client_id = f"redteam-big-{uuid.uuid4().hex}"
    reply = https(
        stack,
        "/v1/keys",
        who=stem,
        headers={"X-Request-Id": client_id},
        body={"name": unique("t"), "backend": "A" * 900_000, "environment": "dev"},
    )
    assert reply.status in (400, 403), reply.body
    lines = [
        line
        for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))
        for line in path.read_bytes().splitlines()
        if client_id.encode() in line
    ]
    assert len(lines) == 1, len(lines)
    assert len(lines[0]) < 16_384, f"one zero-role request wrote a {len(lines[0])}-byte audit record"


def test_a_caller_who_may_not_create_keys_is_refused_before_its_body_is_read(stack: DevStack) -> None:
    """Sibling: create_key decides "may this caller create any key at all" first: a zero-role
    caller gets the same 403 for a malformed body as for a good one."""
    stem, principal = identity(stack, unique("nobody"), "app")
    good = https(
        stack, "/v1/keys", who=stem, body={"name": unique("t"), "backend": "vault", "environment": "dev"}
    )
    bad = https(stack, "/v1/keys", who=stem, body=["not", "an", "object"])
    assert (good.status, bad.status) == (403, 403), (good.body, bad.body)
    assert (
        good.json()["detail"]
        == bad.json()["detail"]
        == f"key.create is denied: {principal} is bound to no role"
    )


def test_no_error_echoes_a_long_client_value(stack: DevStack) -> None:
    """Errors quote at most a short, escaped prefix of what the caller sent: an unknown backend,
    key type, explain operation or principal, a grant operation, a policy problem, an algorithm."""
    long = "B" * 5000 + "\x1b[2J"
    key = create_key(stack, "vault")
    replies = [
        https(stack, "/v1/keys", body={"name": unique("t"), "backend": long, "environment": "dev"}),
        https(
            stack,
            "/v1/keys",
            body={"name": unique("t"), "backend": "vault", "type": long, "environment": "dev"},
        ),
        https(stack, "/v1/policies/explain", body={"principal": "cn:x", "operation": long}),
        https(stack, "/v1/policies/explain", body={"principal": long, "operation": "key.read"}),
        https(
            stack,
            f"/v1/keys/{key}/grants",
            body={"grantee": "cn:x", "operations": [long], "expires_in": 60},
        ),
        https(
            stack,
            f"/v1/keys/{key}/sign",
            body={"message": b64(b"x"), "algorithm": long},
        ),
    ]
    for reply in replies:
        assert reply.status == 400, reply.body
        detail = reply.json()["detail"]
        assert len(detail) < 1000, detail[:200]
        assert "B" * 65 not in detail, detail[:200]
        assert "\x1b" not in detail, detail
    # A policy problem quotes what document.py quotes; the API cuts each problem to 300 characters.
    policy = https(
        stack, f"/v1/policies/{unique('r')}", method="PUT", body={"rules": [{"operations": [long]}]}
    )
    assert policy.status == 400, policy.body
    assert len(policy.json()["detail"]) < 400, policy.json()["detail"][:200]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_zero_role_caller_cannot_pin_hundreds_of_megabytes(stack: DevStack, tmp_path: Path) -> None:
    """Attack (memory DoS): a certificate bound to no role opens 80 connections, each POSTing
    /v1/keys with a 1 MB ``backend`` string, and never reads the answers. A caller with no rights
    must not cost the broker more than a small bounded amount per connection.
    """
    stem, _ = identity(stack, unique("nobody"), "app")
    with extra_broker(stack, tmp_path, "broker-redteam-rss") as broker:
        port, child = broker.port, broker.child
        before = _rss_kib(child.pid)
        body = json.dumps({"name": "x", "backend": "A" * 1_000_000, "environment": "dev"}).encode()
        head = (
            f"POST /v1/keys HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        held = []
        ctx = stack.client_ssl(stem)
        try:
            for _ in range(80):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                tls = ctx.wrap_socket(sock, server_hostname="localhost")
                held.append(tls)
                tls.sendall(head + body)
            time.sleep(5)
        finally:
            for tls in held:
                tls.close()
        time.sleep(3)
        grown_mib = (_rss_kib(child.pid) - before) / 1024
        assert grown_mib < 120, f"80 zero-role requests left the broker {grown_mib:.0f} MiB larger"


# -- 11. what a caller with no rights learns ----------------------------------------------------


def _detail(reply: Reply, name: str) -> str:
    assert reply.status == 403, reply.body
    return str(reply.json()["detail"]).replace(name, "<key>")


def test_a_zero_role_caller_cannot_tell_existing_keys_from_missing_ones(stack: DevStack) -> None:
    """Attack (existence oracle): a certificate bound to no role asks for a key's metadata
    (GET /v1/keys/{name}), retires a made-up grant on it, lists or revokes its grants. A caller that
    may not read or list keys must get the same answer whether the key exists or not.
    """
    stem, _ = identity(stack, unique("nobody"), "app")
    existing = create_key(stack, "vault")
    missing = unique("t-none")
    differ: list[str] = []
    for method, path in (
        ("GET", "/v1/keys/{}"),
        ("POST", "/v1/keys/{}/grants/g-00000000000000000000/retire"),
        ("GET", "/v1/keys/{}/grants"),
        ("DELETE", "/v1/keys/{}/grants/g-00000000000000000000"),
        ("PATCH", "/v1/keys/{}"),
        ("POST", "/v1/keys/{}/rotate"),
    ):
        body: dict[str, str] | None = {} if method in ("POST", "PATCH") else None
        seen = _detail(https(stack, path.format(existing), who=stem, method=method, body=body), existing)
        unseen = _detail(https(stack, path.format(missing), who=stem, method=method, body=body), missing)
        if seen != unseen:
            differ.append(f"{method} {path}: existing key -> {seen!r}; missing key -> {unseen!r}")
    assert not differ, differ


def test_a_zero_role_batch_answers_alike_for_existing_and_missing_keys(stack: DevStack) -> None:
    """Attack (existence oracle): a certificate bound to no role sends ``{"batch": [...]}`` to
    /v1/keys/{name}/encrypt and /decrypt. A caller with no right on the key must get the same
    answer (status and detail) for an existing and a missing key.
    """
    stem, _ = identity(stack, unique("nobody"), "app")
    existing = create_key(stack, "vault")
    missing = unique("t-none")
    for op, item in (("encrypt", {"plaintext": b64(b"x")}), ("decrypt", {"ciphertext": "kb1:x:1:AA"})):
        body = {"batch": [item, item]}
        seen = https(stack, f"/v1/keys/{existing}/{op}", who=stem, body=body)
        unseen = https(stack, f"/v1/keys/{missing}/{op}", who=stem, body=body)
        assert seen.status == unseen.status, (
            f"{op}: existing key -> {seen.status}; missing key -> {unseen.status}"
        )
        assert _detail(seen, existing) == _detail(unseen, missing)


def test_a_reader_still_hears_why_a_grant_retire_or_a_batch_item_is_denied(stack: DevStack) -> None:
    """What a caller who may read the key keeps: the reason for a refused retire, and per-item
    403s in a batch (200) with the reason."""
    role = unique("reader")
    put_role(stack, role, [{"operations": ["key.read"]}])
    stem, principal = identity(stack, unique("reader"), "user")
    bind(stack, principal, role)
    key = create_key(stack, "vault")
    assert _wait_for_binding(stack, stem, f"/v1/keys/{key}").status == 200

    retire = https(stack, f"/v1/keys/{key}/grants/g-00000000000000000000/retire", who=stem, body={})
    batch = https(stack, f"/v1/keys/{key}/encrypt", who=stem, body={"batch": [{"plaintext": b64(b"x")}]})

    assert retire.status == 403
    assert "only the grantee may retire a grant" in retire.json()["detail"]
    assert batch.status == 200, batch.body
    item = batch.json()["batch"][0]["error"]
    assert item["status"] == 403
    assert "no rule of the roles" in item["detail"], item


# -- 12. policies/explain -------------------------------------------------------------------------


def test_policy_explain_is_no_oracle_for_keys_the_caller_cannot_read(stack: DevStack) -> None:
    """Attack: a principal holding only ``policy.read`` (no key.read, no key.list) asks
    POST /v1/policies/explain about keys by name. It must get the same answer for existing and
    missing keys it may not read, and the record must name the key asked about.
    """
    role = unique("policy-reader")
    assert put_role(stack, role, [{"operations": ["policy.read"]}]).status == 200
    stem, principal = identity(stack, unique("reader"), "user")
    bind(stack, principal, role)
    existing = create_key(stack, "vault", tags={"app": "somebody-else"})
    missing = unique("t-none")
    ask = {"principal": "spiffe://keybroker.dev/app/app", "operation": "crypto.encrypt"}
    # The binding reaches the policy cache within refresh_seconds: explain without a key then answers.
    assert _wait_for_binding(stack, stem, "/v1/policies/explain", ask).status == 200
    seen = https(stack, "/v1/policies/explain", who=stem, body={**ask, "key": existing})
    unseen = https(stack, "/v1/policies/explain", who=stem, body={**ask, "key": missing})
    assert seen.status == unseen.status, (
        f"existing key -> {seen.status} {seen.body[:160]!r}; missing key -> {unseen.status}"
    )
    assert _detail(seen, existing) == _detail(unseen, missing)
    record = _record(stack, seen)
    assert len(record) == 1, record
    assert record[0].get("key") == existing, record


def test_policy_explain_about_a_key_the_caller_may_read_still_answers(stack: DevStack) -> None:
    """A caller with policy.read and key.read gets the decision for the key, and the record names it."""
    role = unique("policy-key-reader")
    put_role(stack, role, [{"operations": ["policy.read", "key.read"]}])
    stem, principal = identity(stack, unique("reader"), "user")
    bind(stack, principal, role)
    key = create_key(stack, "vault")
    ask = {"principal": "spiffe://keybroker.dev/app/app", "operation": "crypto.encrypt", "key": key}
    reply = _wait_for_binding(stack, stem, "/v1/policies/explain", ask)
    assert reply.status == 200, reply.body
    assert reply.json()["key"] == key
    assert _record(stack, reply)[0].get("key") == key


# -- 13. stored text is printable -----------------------------------------------------------------


def test_a_key_description_cannot_carry_terminal_control_sequences(stack: DevStack) -> None:
    """Attack (operator terminal injection): a description holding ESC/OSC sequences, CR, NUL or a
    C1 control is refused (400), at creation and by PATCH, with a detail naming the character."""
    bad = ("ok\x1b]52;c;cm0gLXJmIH4=\x07", "ok\x1b[2J", "ok\rSAFE", "ok\x00", "ok\x9b2J")
    for description in bad:
        reply = https(
            stack,
            "/v1/keys",
            body={
                "name": unique("t-desc"),
                "backend": "vault",
                "environment": "dev",
                "description": description,
            },
        )
        assert reply.status == 400, f"description {description!r} stored: {reply.status}"
        assert "printable" in reply.json()["detail"]
    key = create_key(stack, "vault", description="fine text, with ünïcode")
    for description in bad:
        reply = https(stack, f"/v1/keys/{key}", method="PATCH", body={"description": description})
        assert reply.status == 400, f"description {description!r} stored by PATCH: {reply.status}"


def test_a_revocation_reason_and_a_grantee_are_printable_text(stack: DevStack) -> None:
    """Sibling: the revocation reason is stored and shown like a description; a cn: grantee is
    shown in grant listings. Control characters in either are refused (400)."""
    key = create_key(stack, "vault")
    revoke = https(stack, f"/v1/keys/{key}/revoke", body={"reason": "compromised\x1b[2J"})
    grant = https(
        stack,
        f"/v1/keys/{key}/grants",
        body={"grantee": "cn:evil\x1b]52;c;eA==\x07", "operations": ["crypto.encrypt"], "expires_in": 60},
    )
    assert (revoke.status, grant.status) == (400, 400), (revoke.body, grant.body)
    assert "\x1b" not in revoke.json()["detail"] + grant.json()["detail"]
    assert https(stack, f"/v1/keys/{key}").json()["state"] == "active"
