"""Hostile input at the edge, on the real stack (issue 11, findings 1, 2, 9, 10 and the input limits).

Key names are checked against the one name rule before any lookup and reach Vault only
percent-encoded, so no encoding trick can point a request at another Vault path; strings
that are not Unicode scalar values, over-deep JSON and non-canonical ciphertexts are a
prompt 400 with exactly one audit record; a caller with no rights on a key gets the same
403 whatever it sends, whether the key exists or not.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import pytest

from broker.api.schemas import (
    MAX_CONTEXT_FIELDS,
    MAX_CONTEXT_KEY,
    MAX_CONTEXT_VALUE,
    MAX_JSON_DEPTH,
    MAX_PLAINTEXT,
)
from broker.devstack.stack import TRUST_DOMAIN, DevStack
from broker.keys.model import NAME_RE
from tests.integration.conftest import Reply, https
from tests.integration.keyops import b64, lifecycle, unique
from tests.integration.policyops import fresh, identity

# Generous: a prompt answer takes milliseconds; the bound only has to catch a hang.
PROMPT_SECONDS = 5.0
# What Vault's own error messages look like; none may reach a caller.
VAULT_TEXT = (
    "vault",
    "permission denied",
    "unsupported path",
    "error occurred",
    "no handler",
    "invalid path",
)


def rid() -> str:
    return f"hostile-{uuid.uuid4().hex}"


def broker_ids_for(stack: DevStack, request_ids: set[str]) -> dict[str, list[str]]:
    """The broker's own request ids of the records made for each caller id in ``request_ids``.

    The broker generates its own id for every request (what Vault sees); the caller's
    ``X-Request-Id`` is recorded beside it as ``client_request_id``.
    """
    found: dict[str, list[str]] = {rid: [] for rid in request_ids}
    for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl")):
        for line in path.read_bytes().splitlines():
            record = json.loads(line)
            client = record.get("client_request_id")
            if client in found:
                found[client].append(str(record.get("request_id")))
    return found


def records_for(stack: DevStack, request_ids: set[str]) -> dict[str, int]:
    """How many broker audit records each caller id in ``request_ids`` has."""
    return {rid: len(ids) for rid, ids in broker_ids_for(stack, request_ids).items()}


def raw(stack: DevStack, path: str, data: bytes | None, *, who: str = "admin", request_id: str) -> Reply:
    """One request with an exact path and body (``https`` would JSON-encode the body)."""
    request = urllib.request.Request(
        stack.broker_url + path,
        data=data,
        headers={"X-Request-Id": request_id, "Content-Type": "application/json"},
        method="POST" if data is not None else "GET",
    )
    try:
        with urllib.request.urlopen(request, context=stack.client_ssl(who), timeout=30) as resp:
            return Reply(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        with exc:  # an error body cut short must not leave its socket to the collector
            return Reply(exc.code, exc.headers, exc.read())


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = fn(*args, **kw)
    return reply, time.monotonic() - started


def assert_problem(reply: Reply, status: int | tuple[int, ...], code: str | None = None) -> dict[str, Any]:
    statuses = (status,) if isinstance(status, int) else status
    assert reply.status in statuses, (reply.status, reply.body)
    assert reply.headers["Content-Type"].startswith("application/problem+json"), reply.headers
    body: dict[str, Any] = reply.json()
    if code is not None:
        assert body["code"] == code, body
    return body


class VaultAuditWindow:
    """The entries Vault's own file audit device writes while a block of the test runs."""

    def __init__(self, stack: DevStack) -> None:
        self.path = stack.layout.vault_audit_log
        self.start = self.path.stat().st_size
        self.entries: list[dict[str, Any]] = []

    def close(self) -> None:
        with self.path.open("rb") as fh:
            fh.seek(self.start)
            for line in fh.read().splitlines():
                entry = json.loads(line)
                if entry.get("type") == "request":
                    self.entries.append(entry)


def app_key(stack: DevStack) -> str:
    """A Vault key the dev ``app`` certificate may use (tagged app=app)."""
    name = unique("pay")
    reply = https(
        stack,
        "/v1/keys",
        body={"name": name, "backend": "vault", "environment": "dev", "tags": {"app": "app"}},
    )
    assert reply.status == 201, reply.body
    return name


def tricks(name: str) -> list[str]:
    """The key ``name`` addressed through encoding tricks (each replaces ``{name}`` in a path)."""
    lookalike = name.replace("p", "%D1%80", 1)  # CYRILLIC SMALL LETTER ER looks like "p"
    fullwidth = name.replace("p", "%EF%BD%90", 1)  # FULLWIDTH LATIN SMALL LETTER P
    return [
        f"{name}%3Fversion%3D1",
        f"zz%2F..%2F{name}",
        f"%2E%2E%2F{name}",
        f"x%2F%2E%2E%2F{name}",
        "..%2Fpolicy%2Fdocument",
        "..%2F..%2Fsys%2Fhealth",
        f"{name}%00",
        f"{name}%0A",
        f"{name}%20",
        f"{name}%252Fx",
        f"%252E%252E%252F{name}",
        f"zz%5C..%5C{name}",
        f"zz\\..\\{name}",
        lookalike,
        fullwidth,
        name.upper(),
        f"{name}%23frag",
        f"{name};x",
        "a" * 64,
    ]


def test_encoding_tricks_in_key_names_answer_4xx_and_never_reach_vault(stack: DevStack) -> None:
    """A compromised key addressed through each encoding trick is a 4xx problem (never 5xx or Vault's
    words) with one audit record each, and Vault sees no request for it: no `?`, `..`, NUL or foreign
    name in any path, no caller's request id."""
    name = app_key(stack)
    assert https(stack, f"/v1/keys/{name}/rotate", body={}).status == 200
    assert lifecycle(stack, name, "revoke", {"reason": "compromised"}).status == 200
    window = VaultAuditWindow(stack)
    sent: set[str] = set()
    paths: dict[str, str] = {}
    reads_source: set[str] = set()
    for who in ("app", "admin"):
        for trick in tricks(name):
            for suffix, body in (
                ("/encrypt", {"plaintext": b64(b"x")}),
                ("/decrypt", {"ciphertext": f"kb1:{name}:1:AAAA"}),
                ("", None),
                ("/grants", None),
            ):
                request_id = rid()
                sent.add(request_id)
                path = f"/v1/keys/{trick}{suffix}"
                paths[request_id] = f"{who} {path}"
                data = None if body is None else json.dumps(body).encode()
                reply = raw(stack, path, data, who=who, request_id=request_id)
                problem = assert_problem(reply, (400, 403, 404, 405))
                text = json.dumps(problem).lower()
                assert not any(word in text for word in VAULT_TEXT), (path, problem)
                if "%" in trick or "\\" in trick or trick != trick.lower() or len(trick) > 63:
                    # Everything but a plain "not found" is refused by the name rule itself.
                    assert problem["code"] in ("invalid_key_name", "not_found"), (path, problem)
    # Body fields are held to the same rule: a name in a create body, a rewrap target.
    for bad in ("zz/../x", "k?version=1", "..", "a\x00", "\u0440ay", "a" * 64, "A"):
        request_id = rid()
        sent.add(request_id)
        reply = https(
            stack,
            "/v1/keys",
            body={"name": bad, "backend": "vault", "environment": "dev"},
            headers={"X-Request-Id": request_id},
        )
        assert_problem(reply, 400, "invalid_key_name")
        # The source key of a rewrap is valid and read; only the bad target may not be.
        request_id = rid()
        sent.add(request_id)
        reads_source.add(request_id)
        reply = https(
            stack,
            f"/v1/keys/{name}/rewrap",
            body={"ciphertext": f"kb1:{name}:1:AAAA", "to_key": bad},
            headers={"X-Request-Id": request_id},
        )
        assert_problem(reply, 400, "invalid_key_name")
        request_id = rid()
        sent.add(request_id)
        reply = https(
            stack,
            "/v1/policies/explain",
            body={"principal": f"spiffe://{TRUST_DOMAIN}/app/app", "operation": "key.read", "key": bad},
            headers={"X-Request-Id": request_id},
        )
        assert_problem(reply, 400, "invalid_key_name")
    window.close()

    ids = broker_ids_for(stack, sent)
    counts = {rid: len(found) for rid, found in ids.items()}
    # A hostile request's broker id must never reach Vault (reads of a valid source key may).
    hostile = {broker: rid for rid in sent - reads_source for broker in ids[rid]}
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
    assert window.entries, "Vault's audit log shows nothing: the window is not being read"
    for entry in window.entries:
        request = entry["request"]
        path = str(request.get("path", ""))
        segments = path.split("/")
        assert not any(c in path for c in "?#%\\\x00\n "), path
        assert ".." not in segments, path
        assert "." not in segments, path
        headers = request.get("headers") or {}
        leaked = set(headers.get("x-request-id") or []) & hostile.keys()
        assert not leaked, (path, [paths.get(hostile[r]) for r in leaked])
        # (A list of the registry, e.g. the scheduler's tick in the background, ends in "keys/".)
        if segments[1:3] in (["data", "keys"], ["metadata", "keys"]) and len(segments) > 3 and segments[3]:
            assert NAME_RE.fullmatch(segments[3]), path
            # A registry read asks for the latest version, never one the caller picked.
            assert "version" not in (request.get("data") or {}), entry


SURROGATES = ("\ud800", "\udfff", "a\udc80b")


def test_lone_surrogates_are_refused_promptly_with_one_record_each(stack: DevStack) -> None:
    """Zero-role and app certificates send lone surrogates in a key name (body and path), a context
    field name and a context value: each is a prompt 4xx problem with exactly one audit record, and the
    broker stays healthy afterwards."""
    name = app_key(stack)
    nobody, _ = identity(stack, fresh("nobody"), "app")
    sent: set[str] = set()
    for who in (nobody, "app", "admin"):
        for surrogate in SURROGATES:
            cases: list[tuple[str, dict[str, Any]]] = [
                ("/v1/keys", {"name": surrogate, "backend": "vault", "environment": "dev"}),
                (f"/v1/keys/{name}/encrypt", {"plaintext": b64(b"x"), "context": {surrogate: "v"}}),
                (f"/v1/keys/{name}/encrypt", {"plaintext": b64(b"x"), "context": {"tenant": surrogate}}),
                (
                    f"/v1/keys/{name}/encrypt",
                    {"batch": [{"plaintext": b64(b"x"), "context": {"t": surrogate}}]},
                ),
                (f"/v1/keys/{name}/decrypt", {"ciphertext": f"kb1:{name}:1:AAAA", surrogate: 1}),
                ("/v1/audit/hmac", {"value": surrogate}),
                ("/v1/policies/explain", {"principal": surrogate, "operation": "key.read"}),
                ("/v1/keys/%ED%A0%80/encrypt", {"plaintext": b64(b"x")}),
            ]
            for path, body in cases:
                request_id = rid()
                sent.add(request_id)
                data = json.dumps(body).encode()  # ensure_ascii writes the escape: "\ud800"
                assert any(escape in data for escape in (b"\\ud8", b"\\udf", b"\\udc")) or "%ED" in path
                reply, elapsed = timed(raw, stack, path, data, who=who, request_id=request_id)
                assert elapsed < PROMPT_SECONDS, (path, elapsed)
                problem = assert_problem(reply, (400, 403))
                if who == "admin" and path != "/v1/keys/%ED%A0%80/encrypt":
                    assert problem["code"] == "invalid_text", (path, problem)
        # Query parameters: a surrogate's UTF-8 spelling never decodes to a lone surrogate.
        request_id = rid()
        sent.add(request_id)
        query = "/v1/audit/events?limit=5&key=%ED%A0%80&principal=a%ED%B2%80b"
        reply, elapsed = timed(raw, stack, query, None, who=who, request_id=request_id)
        assert elapsed < PROMPT_SECONDS, elapsed
        assert reply.status == (200 if who == "admin" else 403), reply.body
    counts = records_for(stack, sent)
    assert all(n == 1 for n in counts.values()), {k: n for k, n in counts.items() if n != 1}
    health = https(stack, "/v1/sys/health")
    assert health.status == 200, health.body


def nested_context(levels: int) -> bytes:
    """An encrypt body whose context nests ``levels`` objects deep (the body itself adds one)."""
    return b'{"plaintext": "eA==", "context": ' + b'{"a": ' * levels + b'"x"' + b"}" * levels + b"}"


def test_deep_json_is_a_prompt_400_not_a_recursion_error(stack: DevStack) -> None:
    """100,000 nested '[' and 3,000 levels inside 'context' answer 400 json_too_deep at once; the
    documented depth itself still parses (and then fails the context check, not the depth check)."""
    name = app_key(stack)
    sent: set[str] = set()
    bodies = [
        b"[" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        nested_context(3000),
        nested_context(MAX_JSON_DEPTH),
    ]
    for body in bodies:
        for who in ("admin", "app"):
            request_id = rid()
            sent.add(request_id)
            reply, elapsed = timed(
                raw, stack, f"/v1/keys/{name}/encrypt", body, who=who, request_id=request_id
            )
            assert elapsed < PROMPT_SECONDS, elapsed
            assert_problem(reply, 400, "json_too_deep")
    # Brackets inside strings do not count; the deepest allowed document is not refused for depth.
    request_id = rid()
    sent.add(request_id)
    reply = raw(stack, f"/v1/keys/{name}/encrypt", nested_context(MAX_JSON_DEPTH - 1), request_id=request_id)
    assert assert_problem(reply, 400)["code"] != "json_too_deep"
    request_id = rid()
    sent.add(request_id)
    ok = json.dumps({"plaintext": b64(b"x"), "context": {"t": "[" * 5000 + "{" * 5000}}).encode()
    reply = raw(stack, f"/v1/keys/{name}/encrypt", ok, who="app", request_id=request_id)
    assert_problem(reply, 400, "bad_request")  # the value is over 1024 characters, nothing else
    counts = records_for(stack, sent)
    assert all(n == 1 for n in counts.values()), counts


@pytest.mark.parametrize("version", ["01", "\u0661", "\uff11", "\u00b2", "+1", " 1", "1 ", "0x1", "1_0", "0"])
def test_a_ciphertext_has_one_spelling(stack: DevStack, version: str) -> None:
    """Versions spelled with a leading zero, non-ASCII digits (U+0661, U+FF11, U+00B2) or anything but
    ASCII digits answer the detail-free 400 decryption_failed, never decrypt and never 500."""
    name = app_key(stack)
    sealed = https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": b64(b"card")}).json()["ciphertext"]
    prefix, key, _, payload = sealed.split(":")
    assert https(stack, f"/v1/keys/{name}/decrypt", body={"ciphertext": sealed}).status == 200
    variant = ":".join((prefix, key, version, payload))
    reply = https(stack, f"/v1/keys/{name}/decrypt", body={"ciphertext": variant})
    problem = assert_problem(reply, 400, "decryption_failed")
    assert problem["detail"] == "Decryption failed"


def test_ciphertext_and_base64_payloads_have_one_spelling(stack: DevStack) -> None:
    """Padding, non-zero unused bits, whitespace or a mixed alphabet are refused in the ciphertext
    payload (decryption_failed) and in base64 request fields (bad_request)."""
    name = app_key(stack)
    sealed = https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": b64(b"card")}).json()["ciphertext"]
    prefix, key, number, payload = sealed.split(":")
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bumped = payload[:-1] + last[last.index(payload[-1]) ^ 1]
    for variant in (f"{sealed}=", f"{sealed} ", f"{prefix}:{key}:{number}: {payload}", bumped):
        reply = https(stack, f"/v1/keys/{name}/decrypt", body={"ciphertext": variant})
        assert_problem(reply, 400, "decryption_failed")
    for good in ("aGk=", "aGk", "-_8=", "-_8"):
        assert https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": good}).status == 200, good
    for bad in ("aGl=", "aGk==", " aGk=", "aGk=\n", "aG k=", "+_8=", "aGk=aGk="):
        reply = https(stack, f"/v1/keys/{name}/encrypt", body={"plaintext": bad})
        assert_problem(reply, 400, "bad_request")


def test_a_caller_without_rights_gets_one_403_whatever_it_sends(stack: DevStack) -> None:
    """Crypto handlers authorise before they read the body: a zero-role certificate gets the same
    403 problem for an existing key and for a missing one, with a good, malformed, too deep or
    over-limit body alike (no 400-versus-403 existence oracle)."""
    existing = app_key(stack)
    missing = unique("pay")
    nobody, _ = identity(stack, fresh("nobody"), "app")
    bodies = [
        json.dumps({"plaintext": b64(b"x")}).encode(),
        b"{",
        b"[]",
        b"[" * 10_000,
        json.dumps({"plaintext": "!!"}).encode(),
        json.dumps({"context": 5}).encode(),
        json.dumps({"context": {"a": "\ud800"}}).encode(),
        json.dumps({"batch": "x"}).encode(),
        json.dumps({"batch": [{"plaintext": "eA=="}] * 10_000}).encode(),
        json.dumps({"ciphertext": "kb1:x:\u00b2:AA"}).encode(),
    ]
    for op in ("encrypt", "decrypt", "datakey", "rewrap", "sign", "verify"):
        for body in bodies:
            answers = set()
            for name in (existing, missing):
                reply = raw(stack, f"/v1/keys/{name}/{op}", body, who=nobody, request_id=rid())
                problem = assert_problem(reply, 403, "forbidden")
                answers.add(problem["detail"].replace(name, "NAME"))
            assert len(answers) == 1, (op, body[:40], answers)


def test_input_limits_answer_promptly(stack: DevStack) -> None:
    """The documented limits (plaintext size, batch size, context fields, field name and value
    length, tags, description) each answer 413/400 at once."""
    name = app_key(stack)
    limit = 100  # keys.max_batch_items in the dev config
    item = {"plaintext": b64(b"x")}
    cases: list[tuple[str, dict[str, Any], int]] = [
        (f"/v1/keys/{name}/encrypt", {"plaintext": b64(b"x" * (MAX_PLAINTEXT + 1))}, 413),
        (f"/v1/keys/{name}/encrypt", {"plaintext": "A" * (8 * MAX_PLAINTEXT)}, 413),
        (f"/v1/keys/{name}/encrypt", {"batch": [item] * (limit + 1)}, 413),
        (
            f"/v1/keys/{name}/encrypt",
            {**item, "context": {f"f{i}": "v" for i in range(MAX_CONTEXT_FIELDS + 1)}},
            400,
        ),
        (f"/v1/keys/{name}/encrypt", {**item, "context": {"k" * (MAX_CONTEXT_KEY + 1): "v"}}, 400),
        (f"/v1/keys/{name}/encrypt", {**item, "context": {"k": "v" * (MAX_CONTEXT_VALUE + 1)}}, 400),
        (f"/v1/keys/{name}/encrypt", {**item, "context": {"k": {"nested": "v"}}}, 400),
        (f"/v1/keys/{name}", {"description": "d" * 1025}, 400),
        (f"/v1/keys/{name}", {"tags": {f"t{i}": "v" for i in range(33)}}, 400),
        (f"/v1/keys/{name}", {"tags": {"a=b": "v"}}, 400),
        (f"/v1/keys/{name}", {"rotation_period": "\u0661\u0662h"}, 400),
        (f"/v1/keys/{name}", {"min_decrypt_version": 2**64}, 400),
    ]
    for path, body, status in cases:
        method = "PATCH" if path == f"/v1/keys/{name}" else "POST"
        reply, elapsed = timed(https, stack, path, body=body, method=method)
        assert elapsed < PROMPT_SECONDS, (path, elapsed)
        assert_problem(reply, status)
    # At the limits themselves everything is accepted.
    ok = {"batch": [{"plaintext": b64(b"x" * MAX_PLAINTEXT)}] * 2}
    assert https(stack, f"/v1/keys/{name}/encrypt", body=ok).status == 200
    full = {f"f{i}": "v" * MAX_CONTEXT_VALUE for i in range(MAX_CONTEXT_FIELDS - 1)}
    full["k" * MAX_CONTEXT_KEY] = "v"
    assert https(stack, f"/v1/keys/{name}/encrypt", body={**item, "context": full}).status == 200


def test_grant_ids_in_paths_follow_their_format(stack: DevStack) -> None:
    """A grant id that is not 'g-' and 20 hex digits is a 400 before the key is looked up."""
    name = app_key(stack)
    for bad in ("..%2F..%2Fx", "g-%00", "g-" + "0" * 19, "G-" + "0" * 20):
        reply = raw(stack, f"/v1/keys/{name}/grants/{bad}/retire", b"{}", request_id=rid())
        assert_problem(reply, 400, "bad_request")


def test_query_integers_take_ascii_digits_only(stack: DevStack) -> None:
    """`limit` on the audit timeline is ASCII digits: Arabic-Indic digits, underscores, spaces and
    signs are a 400 problem (int() would take all of them), a plain number is served."""
    for bad in ("%D9%A1%D9%A0", "1_0", "%2010", "+10", "10%20", "1e3", "9999999"):
        assert_problem(https(stack, f"/v1/audit/events?limit={bad}"), 400, "bad_request")
    assert https(stack, "/v1/audit/events?limit=10").status == 200


def test_role_names_in_paths_follow_the_role_name_rule(stack: DevStack) -> None:
    """Reading or deleting a role by a name no role can have is a 400 problem, not a lookup."""
    for bad in ("..%2Fdocument", "a%00", "A", "a%3Fx%3D1", "-a"):
        for method in ("GET", "DELETE"):
            assert_problem(https(stack, f"/v1/policies/{bad}", method=method), 400, "bad_request")
    assert https(stack, "/v1/policies/no-such-role").status == 404
