"""The API fuzzer's machinery: a raw HTTPS client, the audit-log tail, the spec's operations,
Hypothesis strategies for hostile requests, and the properties every answer must have.

Requests go over a raw TLS socket, byte for byte as generated, so percent-encodings,
lone surrogates, bad methods and broken framing reach the broker exactly as an
attacker would send them (urllib and http.client normalise or refuse most of them).
"""

from __future__ import annotations

import base64
import functools
import json
import socket
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

SPEC_PATH = Path(__file__).parents[2] / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
METHODS = ("get", "post", "put", "patch", "delete")
PROBLEM_SCHEMA = SPEC["components"]["schemas"]["Problem"]
PROBLEM_TYPE_BASE = "https://keybroker.dev/problems/"
PROBLEM_CODES = frozenset(PROBLEM_SCHEMA["properties"]["code"]["enum"])
# The only 5xx a healthy stack may answer: a backend that really timed out (a slow CI machine can
# make Vault, KMS or the HSM miss the broker's deadline) or that really is unavailable (checked
# against /v1/sys/health at that moment). 500 is always a bug, and 502 means a backend was handed
# something it could not make sense of: hostile input reached it.
TOLERATED_5XX = {503: "backend_unavailable", 504: "outcome_unknown"}


# -- the spec -------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: Mapping[str, Any] = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.method.upper()} {self.path}"

    @property
    def path_params(self) -> list[str]:
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{")]

    @property
    def query_params(self) -> list[str]:
        return [p["name"] for p in self.spec.get("parameters", []) if p.get("in") == "query"]

    @property
    def body_fields(self) -> list[str]:
        body = resolve(self.spec.get("requestBody"))
        if body is None:
            return []
        schema = body["content"]["application/json"]["schema"]
        return sorted(properties(schema))


def resolve(node: Any) -> Any:
    """Follow a local ``$ref`` (one level at a time, as often as needed)."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def properties(schema: Any) -> dict[str, Any]:
    """Every property a body schema names, through allOf/oneOf/anyOf and $refs."""
    schema = resolve(schema)
    out: dict[str, Any] = {}
    if not isinstance(schema, dict):
        return out
    for name, sub in schema.get("properties", {}).items():
        out[name] = resolve(sub)
    for combinator in ("allOf", "oneOf", "anyOf"):
        for part in schema.get(combinator, []):
            out.update(properties(part))
    return out


def operations() -> list[Operation]:
    return [
        Operation(method, path, item[method])
        for path, item in SPEC["paths"].items()
        for method in METHODS
        if method in item
    ]


def response_validator(op: Operation, status: int) -> tuple[str, Draft202012Validator | None] | None:
    """(content type, schema validator) documented for a success status; None if undocumented."""
    answer = op.spec.get("responses", {}).get(str(status))
    if answer is None:
        return None
    answer = resolve(answer)
    content = answer.get("content", {})
    if not content:
        return "", None
    media, body = next(iter(content.items()))
    schema = body.get("schema")
    if schema is None:
        return media, None
    # '#/components/...' refs resolve against the root: give the wrapper the spec's components.
    return media, Draft202012Validator({"allOf": [schema], "components": SPEC["components"]})


# -- raw HTTPS -------------------------------------------------------------------------


@dataclass
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def media_type(self) -> str:
        return (self.header("content-type") or "").split(";")[0].strip().lower()


def build_request(
    method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None
) -> bytes:
    lines = [method.encode("latin-1", "replace") + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    if body is not None and not any(n.lower() == b"content-length" for n, _ in headers):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def exchange(port: int, ctx: ssl.SSLContext, raw: bytes, timeout: float) -> RawReply | None:
    """Send raw bytes on a fresh mTLS connection; the parsed answer, or None if none came in time."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.sendall(raw)
            while (left := deadline - time.monotonic()) > 0:
                tls.settimeout(left)
                chunk = tls.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if _complete(b"".join(chunks)):
                    break
            else:
                return None
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError):
        if not chunks:
            raise
    return parse_reply(b"".join(chunks))


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip() or b"0")
    return False


def parse_reply(data: bytes) -> RawReply:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawReply(status, headers, body)


# -- the audit log ---------------------------------------------------------------------


class AuditTail:
    """New event records in a broker's audit directory since the last look (files rotate)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.offsets: dict[Path, int] = {}
        self.seen: Counter[str] = Counter()
        self.read_new()

    def read_new(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for path in sorted(self.directory.glob("audit-*.jsonl")):
            start = self.offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(start)
                data = fh.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = start + len(complete)
            for line in complete.splitlines():
                record = json.loads(line)
                if record.get("type") == "event":
                    out.append(record)
                    self.seen[str(record.get("request_id"))] += 1
        return out


class LogTail:
    """The broker's own account of its failures: new error lines of its JSON log, by request id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.by_request: dict[str, str] = {}
        self.other: list[str] = []

    def _read(self) -> None:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                self.other.append(line[:140].decode("utf-8", "replace"))
                continue
            if entry.get("level") not in ("warning", "error", "critical") or entry.get("event") == "request":
                continue
            rid = entry.get("request_id")
            if rid:
                self.by_request[str(rid)] = _cause(entry)
            else:
                self.other.append(_cause(entry))

    def cause(self, request_id: str | None) -> str | None:
        self._read()
        return self.by_request.get(str(request_id)) if request_id else None

    def errors(self) -> list[str]:
        """The last error lines logged since the last look, with or without a request id."""
        self._read()
        out = [*self.other, *self.by_request.values()]
        self.other, self.by_request = [], {}
        return out[-3:]


def _cause(entry: dict[str, Any]) -> str:
    """An exception's last line (its type and message), else the logged detail, shortened."""
    trace = str(entry.get("exception") or "")
    lines = [line for line in trace.strip().splitlines() if line and not line.startswith(" ")]
    if lines:
        return lines[-1][:140]
    return f"{entry.get('event')}: {str(entry.get('detail') or entry.get('error') or '')[:120]}"


# -- hostile values --------------------------------------------------------------------

SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
# Strings a careful attacker tries first: encodings, separators, digits that are not ASCII,
# injection markers, the glob and template characters the policy engine interprets.
NASTY = [
    "",
    " ",
    "\ud800",
    "a\udfffb",
    "\x00",
    "x\x00y",
    "..",
    "../../etc/passwd",
    "%2e%2e%2f",
    "%252e%252e%252f",
    "?version=1",
    "kb1:k:1:AAAA",
    "\u0661",
    "\uff11",
    "\u00b2",
    "*",
    "?",
    "[!a]",
    "{principal.name}",
    "${jndi:ldap://127.0.0.1/x}",
    "'; DROP TABLE keys;--",
    "<script>alert(1)</script>",
    "\u202etxt.exe",
    "\ufeff",
    "\uffff",
    "\U0001f600",
    "\r\nX-Injected: 1",
    "A" * 5000,
    "é" * 600,
    "null",
    "-1",
    "1e999",
]
HUGE_INTS = [0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**300, -(10**300)]
ODD_FLOATS = [0.5, -0.0, 1e308, float("inf"), float("-inf"), float("nan")]


@functools.cache
def hostile_text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY),
        st.text(max_size=24),
        st.lists(st.one_of(SURROGATES, st.characters()), min_size=1, max_size=6).map("".join),
    )


@functools.cache
def hostile_scalar() -> st.SearchStrategy[Any]:
    return st.one_of(
        hostile_text(),
        st.sampled_from(HUGE_INTS),
        st.sampled_from(ODD_FLOATS),
        st.booleans(),
        st.none(),
    )


@functools.cache
def hostile_json() -> st.SearchStrategy[Any]:
    return st.recursive(
        hostile_scalar(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(hostile_text(), inner, max_size=4),
        ),
        max_leaves=8,
    )


@functools.cache
def hostile_context() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.dictionaries(hostile_text(), hostile_text(), max_size=4),
        st.dictionaries(
            st.sampled_from(["tenant", "t", "class"]), st.sampled_from(["a", "acme"]), max_size=2
        ),
        st.just({f"f{i}": "v" for i in range(40)}),  # over the field limit
        st.just({"k" * 200: "v"}),
        st.just({"t": "v" * 5000}),
        st.just({"\ud800": "x"}),
        st.just({"t": "\udfff"}),
        hostile_json(),
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_VERSIONS = ["01", "\u0661", "\uff11", "\u00b2", "0", "-1", "1.0", " 1", "1 ", "9" * 30, "", "1\x00"]


def mutated_ciphertext(valid: list[str]) -> st.SearchStrategy[str]:
    """A real ciphertext (or signature) of the fuzz keys, as is or with one part spoilt."""

    def spoil(args: tuple[str, int, Any]) -> str:
        text, how, extra = args
        parts = text.split(":")
        if how == 0:
            return text
        if how == 1:
            parts[2] = str(extra)
        elif how == 2:
            parts[1] = str(extra)
        elif how == 3:
            parts[3] = parts[3][: len(parts[3]) // 2]
        elif how == 4:
            parts.append("x")
        elif how == 5:
            parts[3] = parts[3][:-2] + ("AA" if not parts[3].endswith("AA") else "BB")
        else:
            return str(extra)
        return ":".join(parts)

    return st.tuples(
        st.sampled_from(valid),
        st.integers(0, 6),
        st.one_of(st.sampled_from(BAD_VERSIONS), hostile_text()),
    ).map(spoil)


# -- names in the path -----------------------------------------------------------------


def encode_segment(text: str) -> str:
    """Percent-encode a path segment (lone surrogates as their UTF-8-style bytes)."""
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="")


def hostile_names(real: list[str]) -> list[str]:
    """Already-encoded path segments that try to reach another key, another KV path or Vault itself."""
    out: list[str] = []
    for name in real[:2]:
        out += [
            f"{name}%3Fversion%3D1",
            f"{name}%3Fversion=1",
            f"zz%2F..%2F{name}",
            f"zz%2f..%2f{name}",
            f"{name}%252Fx",
            f"{name}%253Fversion%253D1",
            f"{name}%00",
            f"{name}%2F",
            f"{name}%20",
            f"%2E%2E%2F{name}",
            name.upper(),
        ]
    out += [
        "..%2Fpolicy%2Fdocument",
        "..%2F..%2Fsys%2Fhealth",
        "..%2F..%2F..%2Fv1%2Fsys%2Fseal-status",
        "%00",
        "%2e%2e",
        "%252e%252e%252f",
        "%C0%AF",
        "%ED%A0%80",
        "%D9%A1",
        "%EF%BC%91",
        "%2A",
        "%7Bprincipal.name%7D",
        "%0D%0AX-Injected:%201",
        "a" * 64,
        "a" * 300,
        "-leading-dash",
        ".hidden",
    ]
    return out


def path_segment(real: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(real),
        st.sampled_from(hostile_names(real)),
        hostile_text().map(encode_segment).filter(bool),
    )


# -- requests --------------------------------------------------------------------------


@dataclass
class Pools:
    """What exists on the stack for the fuzzer to aim at."""

    keys: list[str]  # AES keys the app certificate may use (vault, kms, hsm)
    signing_keys: list[str]
    victims: list[str]  # keys the lifecycle operations may change
    ciphertexts: list[str]
    signatures: list[str]
    grant_ids: list[str]
    roles: list[str]
    principals: list[str]
    policy_document: dict[str, Any]


@dataclass
class Request:
    method: str
    target: str  # path and query, exactly as sent (percent-encoded by the generator)
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    label: str  # what kind of body it was, for grouping failures
    verbatim: bytes | None = None  # sent as is instead (framing the HTTP parser must refuse)
    must_refuse: bool = False  # an invalid name or ciphertext: only a 4xx is right

    def raw(self) -> bytes:
        if self.verbatim is not None:
            return self.verbatim
        return build_request(
            self.method, self.target.encode("latin-1", "backslashreplace"), self.headers, self.body
        )

    def describe(self) -> str:
        if self.verbatim is not None:
            return f"{self.label}: {self.verbatim[:160]!r}"
        body = "" if self.body is None else self.body[:300].decode("utf-8", "backslashreplace")
        more = "" if self.body is None or len(self.body) <= 300 else f"... ({len(self.body)} bytes)"
        heads = {n.decode("latin-1"): v[:80].decode("latin-1") for n, v in self.headers}
        return f"{self.method} {self.target[:300]} headers={heads} body={body}{more}"


def _encode_json(value: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as \udXXX escapes: exactly what an attacker sends.
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


# Bodies no serializer would produce: parser-level and decoding traps.
RAW_BODIES: dict[str, bytes] = {
    "nested-100k": b"[" * 100_000,
    "nested-context": b'{"context":' + b'{"a":' * 3000 + b'"x"' + b"}" * 3000 + b"}",
    "nested-object": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "huge-int": b'{"plaintext":' + b"9" * 5000 + b',"bytes":' + b"9" * 5000 + b"}",
    "huge-float": b'{"bytes": 1e999999, "pending_days": -1e999999, "version": 1e400}',
    "nan": b'{"bytes": NaN, "version": Infinity, "min_decrypt_version": -Infinity}',
    "bad-utf8": b'{"plaintext": "\xff\xfe", "name": "\xc0\xaf"}',
    "bom": b'\xef\xbb\xbf{"plaintext": "AA=="}',
    "surrogate-key": b'{"\\ud800": "x", "context": {"\\udc00": "v"}}',
    "surrogate-pair-split": b'{"context": {"t": "\\ud83d"}, "plaintext": "AA=="}',
    "duplicate-keys": b'{"plaintext": "AA==", "plaintext": 1, "context": {}, "context": null}',
    "not-json": b"plaintext=AA%3D%3D",
    "empty": b"",
    "null": b"null",
    "array": b"[]",
    "number": b"1",
    "string": b'"x"',
    "truncated": b'{"plaintext": "AA',
    "over-limit": b'{"pad": "' + b"x" * (1024 * 1024 + 16) + b'"}',
}

CONTENT_TYPES = [
    b"application/json",
    b"application/json",
    b"application/json",
    b"text/plain",
    b"application/json; charset=utf-16",
    b"application/json; charset=x-no-such-charset",
    b"multipart/form-data; boundary=x",
    b"",
]

FIXED_REQUEST_ID = "fuzz-fixed-request-id-0001"


def _plausible(pools: Pools) -> dict[str, st.SearchStrategy[Any]]:
    """Values of the right shape for each documented field (so requests get past the first check)."""
    keys = pools.keys + pools.signing_keys
    return {
        "plaintext": st.binary(max_size=64).map(b64) | st.just(b64(b"x" * 4097)),
        "context": hostile_context(),
        "ciphertext": mutated_ciphertext(pools.ciphertexts),
        "signature": mutated_ciphertext(pools.signatures),
        "to_key": st.sampled_from(keys) | st.sampled_from(hostile_names(keys)).map(urllib.parse.unquote),
        "message": st.binary(max_size=64).map(b64),
        "digest": st.binary(min_size=31, max_size=33).map(b64),
        "algorithm": st.sampled_from(["ecdsa-sha256", "ECDSA-SHA256", "rsa", ""]),
        "bytes": st.sampled_from([16, 32, 64, 0, 1, 65, 10**9, -32]),
        "include_plaintext": st.booleans(),
        "name": st.sampled_from([f"fuzz-new-{i}" for i in range(4)])
        | st.sampled_from(hostile_names(pools.keys)).map(urllib.parse.unquote)
        | hostile_text(),
        "backend": st.sampled_from(["vault", "kms", "hsm", "VAULT", "", "pkcs11"]),
        "type": st.sampled_from(["aes256-gcm", "ecdsa-p256", "rsa-4096", ""]),
        "environment": st.sampled_from(["dev", "prod", "staging", "Dev", ""]),
        "rotation_period": st.sampled_from(
            ["90d", "1h", "0s", "-1d", "99999999999999999999d", "\u0661d", 3600]
        ),
        "deletion_protection": st.booleans(),
        "tags": st.dictionaries(hostile_text(), hostile_text(), max_size=3) | st.just({"app": "app"}),
        "description": hostile_text(),
        "min_decrypt_version": st.sampled_from([1, 2, 0, -1, 10**20]),
        "reason": st.sampled_from(["retired", "compromised", "RETIRED", ""]),
        "pending_days": st.sampled_from([7, 30, 6, 31, 0, -7, 10**12]),
        "grantee": st.sampled_from(pools.principals) | hostile_text(),
        "operations": st.lists(
            st.sampled_from(["crypto.decrypt", "crypto.*", "*", "key.read", "policy.write", "crypto.[ed]*"]),
            max_size=3,
        ),
        "context_equals": hostile_context(),
        "context_subset": hostile_context(),
        "expires_in": st.sampled_from(["1h", "25h", "0s", 60, -1, "\uff11h", 10**30]),
        "document": _document(pools),
        "version": st.sampled_from([0, 1, 10**6, -1]),
        "principal": st.sampled_from(pools.principals) | hostile_text(),
        "operation": st.sampled_from(["crypto.encrypt", "key.read", "crypto.*", "policy.write"])
        | hostile_text(),
        "key": st.sampled_from(keys) | st.sampled_from(hostile_names(keys)).map(urllib.parse.unquote),
        "bindings": st.dictionaries(
            st.sampled_from([*pools.principals, "*", "spiffe://keybroker.dev/*", "cn:*"]) | hostile_text(),
            st.lists(st.sampled_from(pools.roles) | hostile_text(), max_size=2),
            max_size=3,
        ),
        "rules": st.lists(_rule(), max_size=2),
        "value": hostile_text(),
        "batch": st.lists(st.dictionaries(hostile_text(), hostile_json(), max_size=3), max_size=3)
        | st.just([{}] * 101),
    }


@functools.cache
def _rule() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"operations": st.lists(st.sampled_from(["crypto.*", "key.read", "*"]) | hostile_text(), max_size=2)},
        optional={
            "effect": st.sampled_from(["allow", "deny", "maybe"]),
            "keys": st.fixed_dictionaries(
                {}, optional={"name": st.lists(hostile_text(), max_size=2), "tags": hostile_context()}
            ),
            "context": st.fixed_dictionaries({}, optional={"equals": hostile_context()}),
            "id": hostile_text(),
        },
    )


def _document(pools: Pools) -> st.SearchStrategy[Any]:
    base = pools.policy_document

    def edit(args: tuple[int, Any]) -> Any:
        how, extra = args
        doc = json.loads(json.dumps(base))
        if how == 0:
            doc["roles"]["fuzz-role"] = {"rules": [extra]}
        elif how == 1:
            doc.pop("bindings", None)
        elif how == 2:
            doc["settings"] = {"grant_max_expires_in": extra}
        elif how == 3:
            doc["roles"] = extra
        else:
            doc[str(extra)[:20]] = extra
        return doc

    return st.tuples(st.integers(0, 4), hostile_json()).map(edit) | hostile_json()


def _body_object(op: Operation, pools: Pools) -> st.SearchStrategy[Any]:
    fields = op.body_fields
    if not fields:
        return hostile_json().map(lambda v: v if isinstance(v, dict) else {"x": v})
    plausible = _plausible(pools)
    value_for = {name: st.one_of(plausible.get(name, hostile_json()), hostile_json()) for name in fields}
    item = st.fixed_dictionaries({}, optional=value_for)
    extra = st.dictionaries(hostile_text(), hostile_json(), max_size=2)
    obj = st.tuples(item, extra).map(lambda pair: {**pair[1], **pair[0]})
    if op.path.endswith(("/encrypt", "/decrypt", "/datakey", "/rewrap", "/sign", "/verify")):
        batch = st.lists(item, min_size=1, max_size=4).map(lambda items: {"batch": items})
        return st.one_of(obj, obj, batch)
    return obj


def request_for(op: Operation, pools: Pools) -> st.SearchStrategy[Request]:
    """Hostile requests to ``op``: its path filled with real and hostile names, a hostile body.

    Build it once per operation: making strategies costs far more than drawing from them.
    """
    names = pools.victims if _lifecycle(op) else pools.keys + pools.signing_keys
    params = {
        "{name}": path_segment(names),
        "{grant_id}": path_segment(pools.grant_ids),
        "{role}": path_segment(pools.roles),
    }
    query_pair = st.tuples(st.sampled_from([*op.query_params, "x", "limit"]), hostile_text())
    odd_query = st.sampled_from(["version=1", "%00=1", "a=%ED%A0%80", "x=" + "y" * 3000])
    request_ids = st.sampled_from(
        ["", "", "", FIXED_REQUEST_ID, "bad id", "x" * 200, "caller-\u00e9\u00e9\u00e9"]
    )
    obj = _body_object(op, pools)
    raw_names = st.sampled_from(sorted(RAW_BODIES))
    content_types = st.sampled_from(CONTENT_TYPES)

    @st.composite
    def build(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Request:
        target = "/".join(draw(params[part]) if part in params else part for part in op.path.split("/"))
        if op.query_params:
            query = draw(st.lists(query_pair, max_size=3))
            if query:
                target += "?" + "&".join(f"{encode_segment(k)}={encode_segment(v)}" for k, v in query)
        elif draw(st.integers(0, 9)) == 0:
            target += "?" + draw(odd_query)
        headers: list[tuple[bytes, bytes]] = []
        rid = draw(request_ids)
        if rid:
            headers.append((b"X-Request-Id", rid.encode("utf-8")))
        body: bytes | None = None
        label = "none"
        if op.method in ("post", "put", "patch") or draw(st.integers(0, 9)) == 0:
            kind = draw(st.integers(0, 9))
            if kind < 7:
                body, label = _encode_json(draw(obj)), "json-object"
            elif kind < 9:
                label = draw(raw_names)
                body = RAW_BODIES[label]
            else:
                body, label = _encode_json(draw(hostile_json())), "json-any"
            ctype = draw(content_types)
            if ctype:
                headers.append((b"Content-Type", ctype))
        return Request(op.method.upper(), target, headers, body, label)

    return build()


def _lifecycle(op: Operation) -> bool:
    return (
        op.path.startswith("/v1/keys/{name}/")
        and op.path.rsplit("/", 1)[-1]
        in {
            "rotate",
            "suspend",
            "resume",
            "revoke",
            "schedule-destruction",
            "cancel-destruction",
        }
    ) or (op.path == "/v1/keys/{name}" and op.method == "patch")


# -- properties ------------------------------------------------------------------------


@dataclass
class Violation:
    kind: str  # the property that failed, e.g. "5xx", "hang", "not problem+json", "audit"
    op: str
    who: str
    request: str
    answer: str

    def group(self) -> tuple[str, str]:
        return (self.kind, self.op)


def check_answer(
    op: Operation | None,
    request: Request,
    reply: RawReply,
    new_records: list[dict[str, Any]],
    seen: Counter[str],
    backend_down: Callable[[], bool],
) -> list[tuple[str, str]]:
    """Every property one answer must have; (kind, detail) for each that does not hold."""
    problems: list[tuple[str, str]] = []
    status = reply.status
    # The broker's own id names the record and the problem document; X-Request-Id echoes the caller's.
    rid = reply.header("x-broker-request-id")
    text = reply.body[:400].decode("utf-8", "backslashreplace")
    summary = f"{status} {reply.media_type} {text}"
    if status >= 500:
        code = _code(reply)
        tolerated = status in TOLERATED_5XX and code == TOLERATED_5XX[status]
        if not tolerated or (status == 503 and not backend_down()):
            problems.append((f"5xx {status} {code}", summary))
    if request.must_refuse and not refused(reply):
        problems.append((f"accepted: {request.label}", summary))
    if status >= 400 and not _documented_report(op, status):
        problems += [(kind, summary) for kind in _problem_issues(reply, rid, request.method)]
    elif op is not None and request.method != "HEAD":
        problems += [(kind, summary) for kind in _success_issues(op, reply)]
    if not rid:
        problems.append(("no X-Broker-Request-Id on the answer", summary))
    if not reply.header("x-request-id"):
        problems.append(("no X-Request-Id on the answer", summary))
    mine = [r for r in new_records if rid is not None and r.get("request_id") == rid]
    if len(new_records) != 1 or len(mine) != 1:
        ids = [r.get("request_id") for r in new_records]
        problems.append(("audit: not exactly one record for the request", f"{summary} -- new records {ids}"))
    elif seen[str(rid)] != 1:
        problems.append(
            (
                "audit: answer's request id names more than one record",
                f"{summary} -- {seen[str(rid)]} records",
            )
        )
    return problems


def refused(reply: RawReply) -> bool:
    """A 4xx/5xx, a signature found invalid, or a batch whose every item failed or was invalid."""
    if reply.status >= 400:
        return True
    try:
        body = json.loads(reply.body)
    except ValueError:
        return False
    items = body.get("batch", [body]) if isinstance(body, dict) else []
    return bool(items) and all(
        isinstance(item, dict) and ("error" in item or item.get("valid") is False) for item in items
    )


def _documented_report(op: Operation | None, status: int) -> bool:
    """Whether ``op`` documents this error status with a body of its own (health's 503 report)."""
    documented = None if op is None else response_validator(op, status)
    return documented is not None and documented[0] != "application/problem+json"


def _code(reply: RawReply) -> str | None:
    try:
        body = json.loads(reply.body)
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def _problem_issues(reply: RawReply, rid: str | None, method: str) -> list[str]:
    if reply.media_type != "application/problem+json":
        return [f"error is {reply.media_type or 'untyped'}, not application/problem+json"]
    if method == "HEAD":
        return []
    try:
        body = json.loads(reply.body)
    except ValueError:
        return ["problem+json body is not JSON"]
    documented = set(PROBLEM_SCHEMA["properties"])
    if not isinstance(body, dict) or not set(PROBLEM_SCHEMA["required"]) <= set(body) <= documented:
        return [f"problem fields are {sorted(body) if isinstance(body, dict) else type(body).__name__}"]
    issues = []
    if body["status"] != reply.status:
        issues.append("problem status differs from the HTTP status")
    if body["code"] not in PROBLEM_CODES:
        issues.append(f"undocumented problem code {body['code']!r}")
    if body["type"] != PROBLEM_TYPE_BASE + str(body["code"]):
        issues.append("problem type is not the code's URI")
    if body["request_id"] != rid:
        issues.append("problem request_id differs from X-Broker-Request-Id")
    return issues


def _success_issues(op: Operation, reply: RawReply) -> list[str]:
    documented = response_validator(op, reply.status)
    if documented is None:
        return [f"undocumented status {reply.status}"]
    media, validator = documented
    if media and reply.media_type != media:
        return [f"answer is {reply.media_type}, documented {media}"]
    if validator is None or media != "application/json":
        return []
    try:
        body = json.loads(reply.body)
    except ValueError:
        return ["success body is not JSON"]
    errors = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
    return [f"answer does not match the documented schema: {errors[0].message[:160]}"] if errors else []


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def render(violations: Iterable[Violation]) -> str:
    """Violations grouped by (property, operation): how many, and the first reproducer of each."""
    groups: dict[tuple[str, str], list[Violation]] = {}
    for v in violations:
        groups.setdefault(v.group(), []).append(v)
    out = []
    for (kind, op), found in sorted(groups.items()):
        first = found[0]
        out.append(
            f"[{kind}] {op} x{len(found)}\n    as {first.who}: {first.request}\n    got: {first.answer[:500]}"
        )
    return "\n".join(out)


# -- the catalogue: every known trick, once per endpoint --------------------------------

CRYPTO = ("/encrypt", "/decrypt", "/datakey", "/rewrap", "/sign", "/verify")
EVERY_CERT = "every certificate: "


def catalogue(op: Operation, pools: Pools) -> list[Request]:
    """The tricks the issue names, each sent to ``op`` at least once (random draws may miss some).

    Requests labelled EVERY_CERT go out with each certificate; the rest are spread over them.
    """
    names = pools.victims if _lifecycle(op) else pools.keys
    plain = "/".join(
        {"{name}": names[0], "{grant_id}": pools.grant_ids[0], "{role}": "fuzz-role"}.get(part, part)
        for part in op.path.split("/")
    )
    json_headers = [(b"Content-Type", b"application/json")]
    takes_body = op.method in ("post", "put", "patch")
    out: list[Request] = []
    if "{name}" in op.path:
        for trick in hostile_names(names[:1]):
            target = plain.replace(names[0], trick, 1)
            body = b"{}" if takes_body else None
            out.append(Request(op.method.upper(), target, json_headers, body, trick, must_refuse=True))
    if takes_body:
        for label, body in RAW_BODIES.items():
            out.append(Request(op.method.upper(), plain, json_headers, body, label))
    if op.path.endswith(CRYPTO):
        for label, body in _crypto_tricks(op, pools).items():
            out.append(Request("POST", plain, json_headers, body, EVERY_CERT + label, must_refuse=True))
    return out


def _crypto_tricks(op: Operation, pools: Pools) -> dict[str, bytes]:
    """Lone surrogates in a context key and value and in a key name; versions spelt differently."""
    base: dict[str, Any] = {
        "/encrypt": {"plaintext": b64(b"x")},
        "/datakey": {},
        "/sign": {"message": b64(b"m")},
        "/verify": {"message": b64(b"m"), "signature": pools.signatures[0]},
        "/decrypt": {"ciphertext": pools.ciphertexts[0]},
        "/rewrap": {"ciphertext": pools.ciphertexts[0]},
    }["/" + op.path.rsplit("/", 1)[-1]]
    tricks = {
        "surrogate in a context key": {**base, "context": {"\ud800": "a"}},
        "surrogate in a context value": {**base, "context": {"t": "\udfff"}},
        "surrogate in a batch item's context": {"batch": [{**base, "context": {"t": "a\ud800"}}]},
    }
    if op.path.endswith("/rewrap"):
        tricks["surrogate in to_key"] = {**base, "to_key": "k\ud800"}
    field = {"/decrypt": "ciphertext", "/rewrap": "ciphertext", "/verify": "signature"}.get(
        "/" + op.path.rsplit("/", 1)[-1]
    )
    if field is not None:
        for version in ("01", "\u0661", "\uff11", "\u00b2"):
            parts = str(base[field]).split(":")
            parts[2] = version
            tricks[f"ciphertext version {version!r}"] = {**base, field: ":".join(parts)}
    out = {label: _encode_json(body) for label, body in tricks.items()}
    # Deeper than any JSON encoder goes: spliced in as text.
    nested = b'{"a":' * 3000 + b'"x"' + b"}" * 3000
    out["context nested 3,000 deep"] = _encode_json({**base, "context": 0}).replace(
        b'"context": 0', b'"context": ' + nested
    )
    return out
