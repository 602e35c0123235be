"""kbe1 envelope encryption against the real stack: every backend, multi-key wrap across backends,
each tamper kind, CLI <-> library interop, header rewrap, and what a cache may do around a key
that stops serving."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli.client import BrokerClient, RemoteError
from broker.devstack.stack import DevStack
from broker.envelope import (
    ContextMismatch,
    CountingKeySource,
    DataKeyCache,
    Envelope,
    EnvelopeError,
    NoUsableKey,
    TamperedMessage,
    TruncatedMessage,
    open_with_data_key,
    read_header,
)
from broker.envelope.format import TAG_BYTES
from tests.integration.cliops import keybroker
from tests.integration.keyops import create_key, lifecycle

FRAME = 64
CONTEXT = {"tenant": "acme", "dataset": "orders"}


# The SDK keeps connections alive: each test closes the clients it opened.
_OPEN: list[BrokerClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def source(stack: DevStack, who: str = "admin") -> CountingKeySource:
    """The SDK client the CLI uses, counting the broker calls it makes."""
    client = BrokerClient(stack.broker_url, stack.client_ssl(who))
    _OPEN.append(client)
    return CountingKeySource(client)


def envelope(stack: DevStack) -> Envelope:
    return Envelope(source(stack), frame_size=FRAME)


def frames(message: bytes) -> tuple[bytes, list[bytes]]:
    stream = io.BytesIO(message)
    read_header(stream)
    at = stream.tell()
    header, found = message[:at], []
    while at < len(message):
        if message[at] == 0:
            size = 1 + FRAME + TAG_BYTES
        else:
            size = 5 + struct.unpack(">I", message[at + 1 : at + 5])[0] + TAG_BYTES
        found.append(message[at : at + size])
        at += size
    return header, found


@pytest.mark.parametrize("backend", ["vault", "kms", "hsm"])
def test_round_trip_on_every_backend(stack: DevStack, backend: str) -> None:
    """A multi-frame message sealed under a key of each backend opens to the same bytes."""
    name = create_key(stack, backend)
    env = envelope(stack)
    data = os.urandom(5 * FRAME + 7)

    sealed = env.encrypt_bytes(name, data, CONTEXT)

    assert env.decrypt_bytes(sealed, CONTEXT) == data
    header = read_header(io.BytesIO(sealed))
    assert header.keys == (name,)
    assert header.wrapped[0].startswith(f"kb1:{name}:1:")
    assert header.context_dict() == CONTEXT


def test_multi_key_wrap_across_backends_opens_through_each_key(stack: DevStack) -> None:
    """One data key wrapped under a vault, an hsm and a kms key: each wrapping alone opens the message,
    and decrypt falls through to the next key when the first one may not be used."""
    daily, escrow, archive = create_key(stack, "vault"), create_key(stack, "hsm"), create_key(stack, "kms")
    keys = source(stack)
    env = Envelope(keys, frame_size=FRAME)
    data = os.urandom(3 * FRAME)

    sealed = env.encrypt_bytes([daily, escrow, archive], data, CONTEXT)
    header = read_header(io.BytesIO(sealed))
    assert header.keys == (daily, escrow, archive)
    for name, wrapped in zip(header.keys, header.wrapped, strict=True):
        data_key = keys.decrypt(name, wrapped, CONTEXT)
        out = io.BytesIO()
        open_with_data_key(data_key, io.BytesIO(sealed), out, CONTEXT)
        assert out.getvalue() == data, name

    assert lifecycle(stack, daily, "suspend").status == 200
    calls = keys.calls
    assert env.decrypt_bytes(sealed, CONTEXT) == data  # daily refused (suspended), escrow used
    assert keys.calls - calls == 2

    assert lifecycle(stack, escrow, "suspend").status == 200
    assert lifecycle(stack, archive, "suspend").status == 200
    with pytest.raises(NoUsableKey) as caught:
        env.decrypt_bytes(sealed, CONTEXT)
    assert [key for key, _ in caught.value.reasons] == [daily, escrow, archive]
    assert all("409" in why for _, why in caught.value.reasons)


def test_every_tamper_kind_is_detected(stack: DevStack) -> None:
    """Truncation, reordering, a frame from another message, header edits and a changed context all fail."""
    name = create_key(stack, "vault")
    env = envelope(stack)
    data = os.urandom(4 * FRAME + 3)
    message = env.encrypt_bytes(name, data, CONTEXT)
    other = env.encrypt_bytes(name, data, CONTEXT)
    header, body = frames(message)
    _, other_body = frames(other)

    cases: dict[str, tuple[bytes, dict[str, str], type[EnvelopeError]]] = {
        "final frame dropped": (header + b"".join(body[:-1]), CONTEXT, TruncatedMessage),
        "cut inside a frame": (message[:-5], CONTEXT, TruncatedMessage),
        "frames reordered": (header + body[1] + body[0] + b"".join(body[2:]), CONTEXT, TamperedMessage),
        "frame from another message": (
            header + body[0] + other_body[1] + b"".join(body[2:]),
            CONTEXT,
            TamperedMessage,
        ),
        "frame size edited": (
            header[:5] + struct.pack(">I", FRAME + 1) + message[9:],
            CONTEXT,
            TamperedMessage,
        ),
        "message id edited": (message[:9] + bytes(32) + message[41:], CONTEXT, TamperedMessage),
        "context asked for differs": (message, {**CONTEXT, "tenant": "evil"}, ContextMismatch),
        # Edited in the header AND asked for: the broker refuses the wrapped key (its AAD).
        "context edited in the header": (
            message.replace(b"acme", b"evil", 1),
            {**CONTEXT, "tenant": "evil"},
            NoUsableKey,
        ),
        "body bit flipped": (message[:-1] + bytes([message[-1] ^ 1]), CONTEXT, TamperedMessage),
    }
    outcomes: dict[str, type[EnvelopeError] | None] = {}
    for case, (tampered, context, _) in cases.items():
        try:
            env.decrypt_bytes(tampered, context)
            outcomes[case] = None
        except EnvelopeError as exc:
            outcomes[case] = type(exc)
    assert outcomes == {case: expected for case, (_, _, expected) in cases.items()}
    assert env.decrypt_bytes(message, CONTEXT) == data


def test_a_swapped_in_wrapping_of_another_data_key_is_detected(stack: DevStack) -> None:
    """Replacing the wrapped key by a valid wrapping of a different data key (same key, same context)
    unwraps fine at the broker but fails the header's key commitment."""
    name = create_key(stack, "kms")
    keys = source(stack)
    env = Envelope(keys, frame_size=FRAME)
    message = env.encrypt_bytes(name, b"the real payload", CONTEXT)
    header = read_header(io.BytesIO(message))
    intruder = keys.generate_data_key(name, CONTEXT).ciphertext
    swapped = header.with_wrapped([intruder]).encode() + message[len(header.encode()) :]

    with pytest.raises(TamperedMessage, match="commitment"):
        env.decrypt_bytes(swapped, CONTEXT)


def test_rewrap_moves_the_header_to_the_latest_version_and_another_backend_without_touching_the_body(
    stack: DevStack,
) -> None:
    """After a rotation, rewrap names version 2; to_keys wraps under a kms key; the body is unchanged."""
    name, archive = create_key(stack, "hsm"), create_key(stack, "kms")
    env = envelope(stack)
    data = os.urandom(3 * FRAME + 1)
    message = env.encrypt_bytes(name, data, CONTEXT)
    assert lifecycle(stack, name, "rotate").status == 200

    latest, moved = io.BytesIO(), io.BytesIO()
    env.rewrap(io.BytesIO(message), latest, CONTEXT)
    env.rewrap(io.BytesIO(message), moved, CONTEXT, to_keys=[archive])

    old_header = read_header(io.BytesIO(message))
    for rewrapped, key, version in ((latest.getvalue(), name, 2), (moved.getvalue(), archive, 1)):
        new_header = read_header(io.BytesIO(rewrapped))
        assert new_header.wrapped[0].startswith(f"kb1:{key}:{version}:")
        assert rewrapped[len(new_header.encode()) :] == message[len(old_header.encode()) :]
        assert env.decrypt_bytes(rewrapped, CONTEXT) == data
    assert lifecycle(stack, name, "suspend").status == 200
    assert env.decrypt_bytes(moved.getvalue(), CONTEXT) == data  # no longer needs the hsm key


def test_a_suspended_key_refuses_new_data_keys_once_the_cache_reaches_max_age(stack: DevStack) -> None:
    """Within max age a cached data key keeps serving (that is what a cache is); at max age the
    broker is asked again, on both sides, and refuses the suspended key."""
    name = create_key(stack, "vault")
    now = [1000.0]
    keys = source(stack)
    env = Envelope(keys, frame_size=FRAME, cache=DataKeyCache(60, max_messages=100, clock=lambda: now[0]))
    first = env.encrypt_bytes(name, b"one", CONTEXT)
    assert env.decrypt_bytes(first, CONTEXT) == b"one"
    assert lifecycle(stack, name, "suspend").status == 200
    calls = keys.calls

    now[0] += 59
    second = env.encrypt_bytes(name, b"two", CONTEXT)
    assert env.decrypt_bytes(second, CONTEXT) == b"two"
    assert env.decrypt_bytes(first, CONTEXT) == b"one"
    assert keys.calls == calls  # all from the cache

    now[0] += 1
    with pytest.raises(EnvelopeError):
        env.decrypt_bytes(first, CONTEXT)  # NoUsableKey: the broker says 409
    with pytest.raises(RemoteError) as refused:
        env.encrypt_bytes(name, b"three", CONTEXT)
    assert refused.value.http_status == 409


def test_cached_small_messages_need_few_broker_calls(stack: DevStack) -> None:
    """1,000 messages with max_messages 100: 10 data-key calls, one decrypt call, never across contexts."""
    name = create_key(stack, "vault")
    keys = source(stack)
    cache = DataKeyCache(300, max_messages=100)
    env = Envelope(keys, cache=cache)
    sealed = [env.encrypt_bytes(name, b"record %d" % i, CONTEXT) for i in range(1000)]
    assert keys.calls == 10
    assert cache.encrypt_stats.hits == 990

    assert env.decrypt_bytes(sealed[0], CONTEXT) == b"record 0"
    assert env.decrypt_bytes(sealed[1], CONTEXT) == b"record 1"
    assert keys.calls == 11
    env.encrypt_bytes(name, b"other tenant", {"tenant": "other"})
    assert keys.calls == 12


# -- the command line -----------------------------------------------------------------------------


def test_cli_and_library_interoperate_over_files_and_streams(stack: DevStack, tmp_path: Path) -> None:
    """CLI-made files open with the library and the reverse; stdin/stdout works; the output is 0600."""
    name, escrow = create_key(stack, "vault"), create_key(stack, "hsm")
    env = envelope(stack)
    data = os.urandom(200_000)
    plain = tmp_path / "data.bin"
    plain.write_bytes(data)
    ctx = ["--context", "tenant=acme", "--context", "dataset=orders"]

    made = keybroker(
        stack, "encrypt-file", "--key", name, "--key", escrow, *ctx, "--frame-size", "4096", str(plain)
    )
    assert made.returncode == 0, made.stderr
    sealed = tmp_path / "data.bin.kbe"
    assert env.decrypt_bytes(sealed.read_bytes(), CONTEXT) == data
    assert sealed.stat().st_mode & 0o777 == 0o600

    (tmp_path / "lib.kbe").write_bytes(env.encrypt_bytes([escrow], data, CONTEXT))
    opened = keybroker(stack, "decrypt-file", *ctx, str(tmp_path / "lib.kbe"))
    assert opened.returncode == 0, opened.stderr
    assert (tmp_path / "lib").read_bytes() == data

    piped = keybroker(stack, "encrypt-file", "--key", name, *ctx, stdin=data)
    assert piped.returncode == 0, piped.stderr
    back = keybroker(stack, "decrypt-file", *ctx, stdin=piped.stdout)
    assert (back.returncode, back.stdout == data) == (0, True)
    assert b"\r" not in back.stderr  # no progress bar when stderr is not a terminal


def test_cli_directories_and_rewrap_in_place(stack: DevStack, tmp_path: Path) -> None:
    """A directory is sealed file by file into a mirror tree; rewrap-file rewrites headers in place."""
    name, archive = create_key(stack, "kms"), create_key(stack, "vault")
    tree = tmp_path / "in"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"alpha")
    (tree / "sub" / "b.txt").write_bytes(b"beta" * 1000)

    sealed = keybroker(
        stack, "encrypt-file", "--key", name, "--context", "t=1", str(tree), "--out", str(tmp_path / "out")
    )
    assert sealed.returncode == 0, sealed.stderr
    outs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.kbe"))
    assert outs == ["a.txt.kbe", "sub/b.txt.kbe"]

    body_before = (tmp_path / "out" / "sub" / "b.txt.kbe").read_bytes()
    move = ("--to-key", archive, "--drop-key", name)
    moved = keybroker(stack, "rewrap-file", *move, "--context", "t=1", str(tmp_path / "out"))
    assert moved.returncode == 0, moved.stderr
    body_after = (tmp_path / "out" / "sub" / "b.txt.kbe").read_bytes()
    assert read_header(io.BytesIO(body_after)).keys == (archive,)
    assert body_after != body_before

    opened = keybroker(
        stack, "decrypt-file", "--context", "t=1", str(tmp_path / "out"), "--out", str(tmp_path / "back")
    )
    assert opened.returncode == 0, opened.stderr
    assert (tmp_path / "back" / "sub" / "b.txt").read_bytes() == b"beta" * 1000
    assert (tmp_path / "back" / "a.txt").read_bytes() == b"alpha"


def test_cli_failures_exit_non_zero_remove_partial_output_and_say_why(
    stack: DevStack, tmp_path: Path
) -> None:
    """Truncated input, the wrong context, a key the caller may not use and a suspended key: exit 1, one
    clear line, and no output file (not even a partial one) left behind."""
    name = create_key(stack, "vault")
    env = envelope(stack)
    data = os.urandom(10 * FRAME)
    message = env.encrypt_bytes(name, data, {"t": "1"})
    header, body = frames(message)
    (tmp_path / "cut.kbe").write_bytes(header + b"".join(body[:-1]))
    (tmp_path / "ok.kbe").write_bytes(message)

    cut = keybroker(stack, "decrypt-file", "--context", "t=1", str(tmp_path / "cut.kbe"))
    wrong_ctx = keybroker(stack, "decrypt-file", "--context", "t=2", str(tmp_path / "ok.kbe"))
    not_mine = keybroker(stack, "decrypt-file", "--context", "t=1", str(tmp_path / "ok.kbe"), who="app")
    lifecycle(stack, name, "suspend")
    suspended = keybroker(stack, "decrypt-file", "--context", "t=1", str(tmp_path / "ok.kbe"))
    refused = keybroker(
        stack, "encrypt-file", "--key", name, str(tmp_path / "ok.kbe"), "--out", str(tmp_path / "x")
    )

    assert (cut.returncode, b"truncated" in cut.stderr) == (1, True), cut.stderr
    assert (wrong_ctx.returncode, b"different encryption context" in wrong_ctx.stderr) == (1, True)
    assert (not_mine.returncode, b"403" in not_mine.stderr) == (1, True), not_mine.stderr
    assert (suspended.returncode, b"409" in suspended.stderr) == (1, True), suspended.stderr
    assert (refused.returncode, b"409" in refused.stderr) == (1, True), refused.stderr
    retired = create_key(stack, "hsm")
    assert lifecycle(stack, retired, "revoke", {"reason": "retired"}).status == 200
    revoked = keybroker(
        stack, "encrypt-file", "--key", retired, str(tmp_path / "ok.kbe"), "--out", str(tmp_path / "y")
    )
    assert (revoked.returncode, b"409" in revoked.stderr) == (1, True), revoked.stderr
    for result in (cut, wrong_ctx, not_mine, suspended, refused, revoked):
        assert b"Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.kbe", "ok.kbe"]


def _on_a_terminal(stack: DevStack, *args: str) -> bytes:
    """Run ``keybroker ARGS`` with stderr on a pseudo-terminal; return what it wrote there."""
    tls = stack.layout.tls
    env = {
        **os.environ,
        "KEYBROKER_ADDR": stack.broker_url,
        "KEYBROKER_CACERT": str(tls / "ca.pem"),
        "KEYBROKER_CLIENT_CERT": str(tls / "admin.crt"),
        "KEYBROKER_CLIENT_KEY": str(tls / "admin.key"),
    }
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, seen
    return seen


def test_a_progress_bar_shows_on_a_terminal_and_not_with_quiet(stack: DevStack, tmp_path: Path) -> None:
    """On a terminal the command draws a byte progress bar on stderr; --quiet draws nothing."""
    name = create_key(stack, "vault")
    plain = tmp_path / "big.bin"
    plain.write_bytes(os.urandom(3 * 1024 * 1024))

    shown = _on_a_terminal(stack, "encrypt-file", "--key", name, str(plain))
    quiet = _on_a_terminal(
        stack, "decrypt-file", "--quiet", str(plain) + ".kbe", "--out", str(tmp_path / "back")
    )

    assert b"%|" in shown, shown  # the bar: "big.bin:   0%|      | 0.00/3.00M [...]"
    assert b"big.bin:" in shown
    assert quiet == b""
    assert (tmp_path / "back").read_bytes() == plain.read_bytes()


def test_the_readme_application_example_runs_as_written(stack: DevStack, tmp_path: Path) -> None:
    """The README's ten-line application example (a file through two keys, a cached record
    stream) runs as written with the variables the dev stack's env file sets."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Files and streams of any size", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    client = BrokerClient(stack.broker_url, stack.client_ssl("admin"))
    _OPEN.append(client)
    for name, backend in (("payments", "vault"), ("archive", "kms")):
        if not any(k["name"] == name for k in client.list_keys()):
            client.create_key(name, backend=backend, environment="prod")
    data = os.urandom(3 * 256 * 1024 + 5)
    (tmp_path / "backup.bin").write_bytes(data)
    tls = stack.layout.tls
    env = {
        **os.environ,
        "KEYBROKER_ADDR": stack.broker_url,
        "KEYBROKER_CACERT": str(tls / "ca.pem"),
        "KEYBROKER_CLIENT_CERT": str(tls / "admin.crt"),
        "KEYBROKER_CLIENT_KEY": str(tls / "admin.key"),
    }

    ran = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    assert ran.returncode == 0, ran.stderr
    sealed = (tmp_path / "backup.bin.kbe").read_bytes()
    assert read_header(io.BytesIO(sealed)).keys == ("payments", "archive")
    assert Envelope(client).decrypt_bytes(sealed, {"tenant": "acme"}) == data
