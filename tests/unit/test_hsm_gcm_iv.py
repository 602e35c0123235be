"""AES-GCM IV handling of the HSM backend against a fake token that writes its IV back.

The fake reads the raw CK_GCM_PARAMS block exactly as a PKCS#11 module would and
writes into the ``pIv`` buffer it points at, so these tests check the real struct
wiring, not a stand-in for it. The real-token side is tests/integration/test_hsm_gcm_iv.py.
"""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path
from typing import Any, cast

import pytest

from broker.backends.base import KeyRef
from broker.backends.hsm import GcmParams, HsmClient, HsmKeys, _CkGcmParams
from broker.config.load import load_config
from broker.config.model import HsmConfig
from broker.errors import BadGateway, ConfigError
from broker.vocab import KeyType

KEY = KeyRef(name="k", type=KeyType.AES256_GCM)


class FakeSecret:
    """A token's AES key: records each IV it saw and writes ``write(n)`` into pIv, if given."""

    def __init__(self, write: Any = None) -> None:
        self.write = write
        self.calls = 0
        self.seen: list[bytes] = []

    def encrypt(self, plaintext: bytes, *, mechanism: Any, mechanism_param: bytes) -> bytes:
        block = _CkGcmParams.from_buffer_copy(mechanism_param)
        assert len(mechanism_param) == ctypes.sizeof(_CkGcmParams)
        assert (block.ulIvLen, block.ulIvBits, block.ulTagBits) == (12, 96, 128)
        assert block.pIv is not None
        self.seen.append(ctypes.string_at(block.pIv, block.ulIvLen))
        if self.write is not None:
            new = self.write(self.calls)
            ctypes.memmove(block.pIv, new, len(new))
        self.calls += 1
        return b"ciphertext+tag"


class FakeSession:
    def __init__(self, secret: FakeSecret) -> None:
        self.secret = secret

    def get_key(self, **_: Any) -> FakeSecret:
        return self.secret


class FakeClient:
    def __init__(self, mode: str) -> None:
        self.config = HsmConfig(library=Path("/nonexistent.so"), token_label="t", pin_env="P", gcm_iv=mode)


def seal(keys: HsmKeys, secret: FakeSecret, aad: bytes = b'{"a":"b"}') -> bytes:
    return keys._seal(FakeSession(secret), KEY, "00ff", b"plaintext", aad)


def keys(mode: str) -> HsmKeys:
    return HsmKeys(cast(HsmClient, FakeClient(mode)))


def test_the_parameter_block_carries_iv_and_aad_by_pointer() -> None:
    """The raw CK_GCM_PARAMS points at the IV and the AAD, with their lengths."""
    iv, aad = os.urandom(12), b'{"tenant":"t1"}'
    params = GcmParams(iv, aad)
    block = _CkGcmParams.from_buffer_copy(params.raw)
    assert ctypes.string_at(block.pIv, block.ulIvLen) == iv
    assert ctypes.string_at(block.pAAD, block.ulAADLen) == aad
    assert block.ulTagBits == 128
    assert _CkGcmParams.from_buffer_copy(GcmParams(iv, b"").raw).pAAD is None


def test_token_mode_stores_the_iv_the_token_wrote() -> None:
    """The token is handed zeros; what it writes back is what goes in front of the ciphertext."""
    written = [os.urandom(12) for _ in range(3)]
    secret = FakeSecret(write=lambda n: written[n])
    hsm = keys("token")
    payloads = [seal(hsm, secret) for _ in range(3)]
    assert secret.seen == [bytes(12)] * 3
    assert payloads == [iv + b"ciphertext+tag" for iv in written]


def test_token_mode_fails_closed_when_the_token_keeps_the_buffer() -> None:
    """A token that does not write (SoftHSM) leaves the zero IV: refused, naming the switch."""
    with pytest.raises(BadGateway, match=re.escape('set hsm.gcm_iv = "host"')):
        seal(keys("token"), FakeSecret())


def test_token_mode_refuses_an_all_zero_token_iv_and_a_repeated_one() -> None:
    """Zeros written back, or an IV already returned, mean the generator cannot be trusted."""
    with pytest.raises(BadGateway):
        seal(keys("token"), FakeSecret(write=lambda n: bytes(12)))
    hsm = keys("token")
    secret = FakeSecret(write=lambda n: b"\x01" * 12)
    assert seal(hsm, secret)[:12] == b"\x01" * 12
    with pytest.raises(BadGateway, match="returned before"):
        seal(hsm, secret)


def test_token_mode_refuses_an_iv_longer_than_twelve_bytes() -> None:
    """Bytes written past the 12-byte IV are caught by the canary after it."""
    with pytest.raises(BadGateway, match="longer than 12 bytes"):
        seal(keys("token"), FakeSecret(write=lambda n: os.urandom(16)))


def test_host_mode_uses_a_fresh_random_iv_and_refuses_a_token_that_replaces_it() -> None:
    """Host mode: a new non-zero IV each message, handed to the token and stored unchanged."""
    secret = FakeSecret()
    hsm = keys("host")
    payloads = [seal(hsm, secret) for _ in range(100)]
    ivs = [p[:12] for p in payloads]
    assert ivs == secret.seen
    assert len(set(ivs)) == 100
    assert bytes(12) not in ivs
    with pytest.raises(BadGateway, match=re.escape('set hsm.gcm_iv = "token"')):
        seal(hsm, FakeSecret(write=lambda n: os.urandom(12)))


def test_config_accepts_host_and_token_only(tmp_path: Path) -> None:
    """hsm.gcm_iv defaults to host; anything but host or token is a config error."""
    base = (
        '[server]\ncert_file = "c"\nkey_file = "k"\nclient_ca_file = "ca"\n'
        '[vault]\naddress = "https://v:8200"\nrole_id_file = "r"\nsecret_id_file = "s"\n'
        '[hsm]\nlibrary = "/l.so"\ntoken_label = "t"\npin_env = "P"\n{extra}'
        '[audit]\ndirectory = "a"\n'
    )
    path = tmp_path / "broker.toml"
    path.write_text(base.format(extra=""))
    assert load_config(path, environ={}).hsm.gcm_iv == "host"
    path.write_text(base.format(extra='gcm_iv = "token"\n'))
    assert load_config(path, environ={}).hsm.gcm_iv == "token"
    path.write_text(base.format(extra='gcm_iv = "device"\n'))
    with pytest.raises(ConfigError, match=r"hsm\.gcm_iv"):
        load_config(path, environ={})
