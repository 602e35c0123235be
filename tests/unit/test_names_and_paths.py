"""The one name rule, the one Vault path builder and the body parser's canonical-input rules."""

from __future__ import annotations

import json
import time

import pytest

from broker.api import schemas
from broker.backends.vault import vault_path
from broker.cli import build_parser
from broker.errors import BadRequest, DecryptionFailed, PayloadTooLarge
from broker.keys import ciphertext
from broker.keys.model import NAME_RULE, InvalidKeyName, check_name

HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "a/../b",
    "a?version=1",
    "a#b",
    "a%2Fb",
    "a\\b",
    "a\x00",
    "a\n",
    "A",
    "\u0440ay",  # CYRILLIC SMALL LETTER ER
    "\uff50ay",  # FULLWIDTH LATIN SMALL LETTER P
    "a\ud800",
    "-a",
    "a" * 64,
    "a b",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_name_rule_refuses_every_hostile_spelling(name: str) -> None:
    """Separators, dots alone, escapes, control characters, look-alikes and surrogates are not names."""
    with pytest.raises(InvalidKeyName) as caught:
        check_name(name)
    assert caught.value.status == 400
    assert caught.value.code == "invalid_key_name"
    assert caught.value.detail == f"key name must be {NAME_RULE}"  # the hostile value is not echoed


@pytest.mark.parametrize("name", ["a", "pay-2026", "a.b_c-d", "0", "a" * 63])
def test_the_name_rule_accepts_names(name: str) -> None:
    """Ordinary names pass unchanged."""
    assert check_name(name) == name


def test_vault_path_encodes_each_segment_whole() -> None:
    """A segment cannot add a query, a fragment or a percent-escape of its own."""
    assert vault_path("kv/data/keys", "pay") == "v1/kv/data/keys/pay"
    assert vault_path("kv/data/keys", "a?b") == "v1/kv/data/keys/a%3Fb"
    assert vault_path("kv/data/keys", "a#b") == "v1/kv/data/keys/a%23b"
    assert vault_path("kv/data/keys", "a%2Fb") == "v1/kv/data/keys/a%252Fb"
    assert vault_path("transit/keys", "k", "config") == "v1/transit/keys/k/config"


@pytest.mark.parametrize("segment", ["", ".", "..", "a/b", "../x", "a\\b", "a\x00", "a\n", "a\ud800"])
def test_vault_path_refuses_segments_no_encoding_makes_safe(segment: str) -> None:
    """Dot segments and separators (Vault routes on the decoded path) are refused outright."""
    with pytest.raises(BadRequest):
        vault_path("kv/data/keys", segment)


@pytest.mark.parametrize("base", ["kv/../sys", "kv/a?b", "", "kv//x"])
def test_vault_path_refuses_a_base_that_is_not_fixed(base: str) -> None:
    """The fixed part is checked too, so a bad mount in configuration cannot redirect calls."""
    with pytest.raises(ValueError, match="not a fixed Vault path"):
        vault_path(base, "x")


def test_ciphertext_has_one_spelling() -> None:
    """Only the broker's own encoding of an envelope decodes."""
    text = ciphertext.Envelope("k", 12, b"hello").encode()
    assert ciphertext.decode(text) == ciphertext.Envelope("k", 12, b"hello")
    prefix, key, _, body = text.split(":")
    variants = [f"{prefix}:{key}:{v}:{body}" for v in ("012", "\u0661\u0662", "\uff11\uff12", "1\u00b2", "")]
    variants += [text + "=", text[:-1] + "9", f"{prefix}:K:12:{body}", f"{prefix}:{key}:1234567890:{body}"]
    for variant in variants:
        with pytest.raises(DecryptionFailed):
            ciphertext.decode(variant)


def test_json_depth_is_bounded_without_recursion() -> None:
    """Deep nesting is refused quickly; brackets inside strings do not count."""
    started = time.monotonic()
    for deep in (b"[" * 1_000_000, b'{"a":' * 200_000):
        with pytest.raises(schemas.JsonTooDeep):
            schemas.parse_json(deep)
    assert time.monotonic() - started < 5
    at_limit = "[" * schemas.MAX_JSON_DEPTH + "]" * schemas.MAX_JSON_DEPTH
    assert schemas.parse_json(at_limit.encode()) is not None
    assert schemas.parse_json(json.dumps({"a": "[[[[{{{{" * 100, "b": '\\"[['}).encode())


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": "\\ud800"}',
        b'{"\\udfff": 1}',
        b'{"a": [{"b": ["x\\udc80"]}]}',
        b'{"a": 1, "a": 2}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b"\xff{}",
        b'{"a": 1' + b"1" * 5000 + b"}",
    ],
)
def test_bodies_that_are_not_one_unambiguous_json_text_are_refused(body: bytes) -> None:
    """Lone surrogates (also in member names), duplicate members, NaN, non-UTF-8, giant integers: 400."""
    with pytest.raises(BadRequest):
        schemas.parse_json(body)


def test_a_valid_surrogate_pair_is_one_character() -> None:
    """An escaped pair is a real character (U+1F600) and is accepted."""
    assert schemas.parse_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}


@pytest.mark.parametrize("good", ["aGk=", "aGk", "-_8=", "-_8", "", "AAAA"])
def test_base64_in_either_alphabet_is_accepted(good: str) -> None:
    """Standard or URL-safe, padded or not."""
    assert schemas.b64({"f": good}, "f") is not None


@pytest.mark.parametrize("bad", ["aGl=", "aGk==", " aGk=", "aGk=\n", "aG k=", "+_8=", "aGk=aGk=", "a"])
def test_base64_has_one_spelling_per_alphabet(bad: str) -> None:
    """Non-zero unused bits, extra padding, whitespace and mixed alphabets are refused."""
    with pytest.raises(BadRequest):
        schemas.b64({"f": bad}, "f")


def test_plaintext_over_the_limit_is_refused_before_decoding() -> None:
    """A huge base64 string is a 413 from its length alone."""
    with pytest.raises(PayloadTooLarge):
        schemas.plaintext({"plaintext": "A" * 10_000_000})


@pytest.mark.parametrize("value", ["\u0661\u0662h", " 90d", "90d\n", "99999999999d", "0", -1, 2**60])
def test_durations_are_ascii_and_bounded(value: object) -> None:
    """Durations take ASCII digits only and stay in range."""
    with pytest.raises(BadRequest):
        schemas.duration({"d": value}, "d")


def test_integers_are_bounded() -> None:
    """Integers beyond 2^53 are refused (every JSON reader must see the same number)."""
    with pytest.raises(BadRequest):
        schemas.integer({"n": 2**53}, "n")
    assert schemas.integer({"n": 2**53 - 1}, "n") == 2**53 - 1


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "show", "a/../b"],
        ["keys", "encrypt", "k?version=1"],
        ["keys", "rewrap", "k", "--to-key", "..%2Fpolicy"],
        ["grants", "list", "A"],
        ["grants", "revoke", "a\\b", "g-00000000000000000000"],
        ["policy", "explain", "--principal", "cn:x", "--operation", "key.read", "--key", "a b"],
    ],
)
def test_the_cli_refuses_a_bad_key_name_before_any_request(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A key name argument that breaks the name rule stops the CLI with a usage error (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    assert "not a key name" in capsys.readouterr().err
