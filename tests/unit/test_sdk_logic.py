"""The SDK's pure rules: addresses, backoff with jitter and Retry-After, problem codes to
exceptions, answers read as hostile, and data keys that never show their plaintext."""

from __future__ import annotations

import base64
import email.utils

import pytest

from broker.sdk import DataKey, parse_addresses
from broker.sdk import _calls as ops
from broker.sdk._calls import Response
from broker.sdk._settings import RetryPolicy, retry_after_seconds
from broker.sdk.errors import (
    ConfigurationError,
    Conflict,
    DecryptionFailed,
    Forbidden,
    InvalidInput,
    KeyStateError,
    NotFound,
    RateLimited,
    Timeout,
    Unavailable,
    UnexpectedResponse,
    error_from_problem,
)


def test_addresses_are_a_comma_separated_https_list_without_duplicates() -> None:
    """KEYBROKER_ADDR may hold several URLs; each must be https://; order kept, repeats dropped."""
    got = parse_addresses(" https://127.0.0.1:8201/ , https://127.0.0.1:8202,https://127.0.0.1:8201")

    assert got == ("https://127.0.0.1:8201", "https://127.0.0.1:8202")
    for bad in (
        "http://127.0.0.1:8201",
        "https://a:1,ftp://b",
        "",
        " , ",
        "https://h:99999",
        "https://h/?q=1",
    ):
        with pytest.raises(ConfigurationError):
            parse_addresses(bad)


def test_backoff_is_jittered_capped_and_never_shorter_than_retry_after() -> None:
    """Full jitter below backoff*2^round (capped); Retry-After is a floor; too long a one stops."""
    policy = RetryPolicy(retries=3, backoff=0.5, max_backoff=1.5, max_retry_after=10)

    assert policy.pause(0, None, rand=lambda: 1.0) == 0.5
    assert policy.pause(1, None, rand=lambda: 1.0) == 1.0
    assert policy.pause(2, None, rand=lambda: 1.0) == 1.5  # capped, not 2.0
    assert policy.pause(2, None, rand=lambda: 0.25) == 0.375
    assert policy.pause(0, 4.0, rand=lambda: 0.1) == 4.0
    assert policy.pause(0, 11.0, rand=lambda: 0.1) is None
    assert policy.pause(3, None, rand=lambda: 0.1) is None  # every retry used
    with pytest.raises(ConfigurationError):
        RetryPolicy(retries=-1)


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    """Delta-seconds or an IMF date (relative to now); anything else is ignored."""
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds("-1") is None
    date = email.utils.formatdate(1_000_010, usegmt=True)
    assert retry_after_seconds(date, now=lambda: 1_000_000.0) == pytest.approx(10.0)
    assert retry_after_seconds(date, now=lambda: 1_000_100.0) == 0.0


@pytest.mark.parametrize(
    ("status", "code", "path", "kind"),
    [
        (400, "decryption_failed", "/v1/keys/k/decrypt", DecryptionFailed),
        (400, "invalid_key_name", "/v1/keys/K", InvalidInput),
        (403, "forbidden", "/v1/keys/k/encrypt", Forbidden),
        (404, "not_found", "/v1/keys/k", NotFound),
        (409, "conflict", "/v1/keys/k/encrypt", KeyStateError),
        (409, "conflict", "/v1/keys", Conflict),
        (409, "conflict", "/v1/policies", Conflict),
        (409, "conflict", "/v1/keys/k/grants", Conflict),
        (429, "rate_limited", "/v1/keys/k/encrypt", RateLimited),
        (503, "backend_unavailable", "/v1/keys/k/encrypt", Unavailable),
        (503, "policy_invalid", "/v1/keys", Unavailable),
        (504, "backend_timeout", "/v1/keys/k/sign", Timeout),
        (503, "something_new", "/v1/keys", Unavailable),  # unknown code: by status
    ],
)
def test_problem_codes_map_to_one_exception_each(status: int, code: str, path: str, kind: type) -> None:
    """By the problem's code first, by status for a code this SDK does not know; 409 on a key is its state."""
    error = error_from_problem(status, {"code": code, "detail": "d", "request_id": "r-1"}, path)

    assert type(error) is kind
    assert (error.status, error.code, error.detail, error.request_id) == (status, code, "d", "r-1")
    assert str(error) == f"{status} {code}: d (request r-1)"


def test_a_hostile_problem_document_cannot_forge_a_line_or_flood() -> None:
    """Control characters are replaced and a huge detail is cut: an error stays one line."""
    error = error_from_problem(400, {"code": "bad\nrequest", "detail": "x\r\n" + "y" * 5000}, "/v1/keys")

    assert "\n" not in str(error)
    assert "\r" not in str(error)
    assert len(error.detail) <= 1000
    assert isinstance(error_from_problem(500, ["not", "a", "dict"], "/"), Exception)


def test_a_data_key_never_shows_its_plaintext() -> None:
    """repr and str show the wrapped key, never the data key's bytes (nor their base64 or hex)."""
    secret = bytes(range(32))
    dk = DataKey(secret, "kb1:k:1:abc", 1, "k")

    for shown in (repr(dk), str(dk), repr([dk]), f"{dk}"):
        assert "plaintext" not in shown
        assert secret.hex() not in shown
        assert repr(secret) not in shown
    assert dk.sealed().ciphertext == "kb1:k:1:abc"
    # Nor does the raw answer it came in, or the request an encrypt sends.
    answer = Response(200, {}, b'{"plaintext":"' + base64.b64encode(secret) + b'"}', "https://h:1")
    call = ops.encrypt("k", secret, None)
    for shown in (repr(answer), repr(call)):
        assert base64.b64encode(secret).decode() not in shown


def _answer(status: int, body: bytes) -> Response:
    return Response(status, {}, body, "https://127.0.0.1:1")


def test_answers_of_the_wrong_shape_are_unexpected_response_not_key_errors() -> None:
    """A missing field, a wrong type, bad base64 or a short data key: UnexpectedResponse."""
    datakey = ops.generate_data_key("k", None, 32)
    good = b'{"ciphertext":"kb1:k:1:x","key_version":1,"plaintext":"' + b"A" * 43 + b'="}'

    assert datakey.parse(_answer(200, good)).key_version == 1
    for body in (
        b'{"ciphertext":"kb1:k:1:x","key_version":"1","plaintext":"AAAA"}',
        b'{"ciphertext":"kb1:k:1:x","key_version":true,"plaintext":"AAAA"}',
        b'{"ciphertext":"kb1:k:1:x","key_version":1,"plaintext":"not base64!"}',
        b'{"ciphertext":"kb1:k:1:x","key_version":1,"plaintext":"AAAA"}',
        b"[]",
        b"<html>",
    ):
        with pytest.raises(UnexpectedResponse):
            datakey.parse(_answer(200, body))


def test_path_segments_are_quoted_and_dot_segments_refused() -> None:
    """A name never changes which endpoint is called: '/' and '?' are encoded, '.' and '..' refused."""
    assert ops.get_key("a/b?c").path == "/v1/keys/a%2Fb%3Fc"
    for bad in (".", "..", "", "a\udc80"):
        with pytest.raises(InvalidInput):
            ops.get_key(bad)


@pytest.mark.parametrize("key", ["", " ", "a\nb", "caf\u00e9", "x" * 256, "a\udc80"])
def test_an_idempotency_key_the_broker_would_refuse_is_refused_before_sending(key: str) -> None:
    """A newline or a non-ASCII character would fail inside the HTTP library (or split a header):
    the SDK refuses it as InvalidInput, before any connection is used."""
    with pytest.raises(InvalidInput):
        ops.lifecycle("k", "rotate", {}, key)
    assert ops.lifecycle("k", "rotate", {}, "kb-" + "x" * 252).idempotency_key is not None


def test_which_calls_are_safe_to_send_twice() -> None:
    """Reads and crypto are; create/rotate/state changes are not, unless they carry an idempotency key."""
    assert ops.encrypt("k", b"x", None).safe
    assert ops.list_keys({}, 100, None).safe
    assert ops.health().safe
    assert not ops.create_key(
        "k",
        "vault",
        "dev",
        key_type=None,
        rotation_period=None,
        deletion_protection=None,
        tags=None,
        description=None,
        idempotency_key=None,
    ).safe
    assert not ops.lifecycle("k", "rotate", {}, None).safe
    assert ops.raw("POST", "/v1/keys/k/sign", {}, (), None, None).safe
    assert not ops.raw("POST", "/v1/keys/k/rotate", {}, (), None, None).safe
    assert ops.lifecycle("k", "rotate", {}, "kb-1").request_headers()["Idempotency-Key"] == "kb-1"


def test_the_cli_names_a_bad_address_in_its_list(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--addr takes a comma-separated list; one address that is not https:// is a usage error
    naming it and where it came from, before any connection."""
    from broker.cli import EXIT_USAGE, main

    for name in ("KEYBROKER_CACERT", "KEYBROKER_CLIENT_CERT", "KEYBROKER_CLIENT_KEY"):
        monkeypatch.setenv(name, "/nonexistent")
    code = main(["keys", "list", "--addr", "https://127.0.0.1:1,http://127.0.0.1:2"])

    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'http://127.0.0.1:2'" in err
    assert "(from --addr)" in err


def test_the_blocking_client_does_not_import_aiohttp() -> None:
    """The CLI and sync users never load aiohttp (slow to import); AsyncClient loads it on first use."""
    import subprocess
    import sys

    probe = (
        "import sys, broker.cli, broker.sdk; before = 'aiohttp' in sys.modules; "
        "from broker.sdk import AsyncClient; print(before, 'aiohttp' in sys.modules, AsyncClient.__name__)"
    )
    ran = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )

    assert ran.stdout.split() == ["False", "True", "AsyncClient"]


def test_the_cli_client_names_still_work() -> None:
    """broker.cli.client keeps the CLI's names over the SDK: BrokerClient(address, context),
    RemoteError with http_status/problem_code/problem_detail, Unreachable."""
    import ssl

    from broker.cli.client import BrokerClient, RemoteError, Unreachable
    from broker.sdk.errors import TransportError

    kb = BrokerClient("https://127.0.0.1:1,https://127.0.0.1:2", ssl.create_default_context(), timeout=1)
    error = error_from_problem(409, {"code": "conflict", "detail": "d"}, "/v1/keys/k/encrypt")

    assert kb.addresses == ("https://127.0.0.1:1", "https://127.0.0.1:2")
    assert isinstance(error, RemoteError)
    assert (error.http_status, error.problem_code, error.problem_detail) == (409, "conflict", "d")
    assert Unreachable is TransportError
    kb.close()


def test_key_listing_pages_move_forward_or_are_refused() -> None:
    """Each page names the next (an opaque cursor); a broker that sends the cursor it was given,
    a cursor it sent before, or keys out of order is an UnexpectedResponse, never an endless
    loop; the page size is checked before sending."""
    import json as _json

    def answer(doc: object) -> Response:
        return Response(200, {}, _json.dumps(doc).encode(), "https://b")

    call = ops.list_keys({"backend": "vault", "tag": None}, 2, "b")
    assert call.path == "/v1/keys?backend=vault&limit=2&after=b"
    assert call.parse(answer({"keys": [{"name": "c"}, {"name": "d"}], "next": "d"})) == (
        [{"name": "c"}, {"name": "d"}],
        "d",
    )
    assert call.parse(answer({"keys": [], "next": None})) == ([], None)
    for stuck in ("b", "", 5):
        with pytest.raises(UnexpectedResponse):
            call.parse(answer({"keys": [{"name": "c"}], "next": stuck}))
    listing = ops.KeyListing()
    assert listing.add([{"name": "c"}, {"name": "d"}], "~c1.one")
    assert listing.add([], "~c1.two")
    with pytest.raises(UnexpectedResponse, match="did not move forward"):
        listing.add([], "~c1.one")  # a cycle of empty pages
    with pytest.raises(UnexpectedResponse, match="out of order"):
        listing.add([{"name": "d"}], None)  # a key again
    assert not listing.add([{"name": "e"}], None)
    assert [k["name"] for k in listing.keys] == ["c", "d", "e"]
    for size in (0, 1001, True):
        with pytest.raises(InvalidInput):
            ops.list_keys({}, size, None)
