"""The file commands never lose data, on the real stack: an in-place ``rewrap-file`` only replaces
a file once its new header is proven to open it (a swapped-in wrapping of another data key is
never built on; an escrow wrapping is never dropped); over a directory one bad file neither
stops nor harms the others and the exit status says so; SIGTERM leaves no partial file."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli.client import BrokerClient
from broker.devstack.stack import DevStack
from broker.envelope import Envelope, read_header
from tests.integration.cliops import keybroker
from tests.integration.keyops import create_key, lifecycle

FRAME = 64
CONTEXT = {"t": "1"}
CTX_ARGS = ("--context", "t=1")

_OPEN: list[BrokerClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _client(stack: DevStack) -> BrokerClient:
    client = BrokerClient(stack.broker_url, stack.client_ssl("admin"))
    _OPEN.append(client)
    return client


def _with_wrappings(message: bytes, wrapped: list[str]) -> bytes:
    """The message with its wrapped-key list replaced (what someone able to edit the file can do:
    the list is outside the header tag)."""
    header = read_header(io.BytesIO(message))
    return header.with_wrapped(wrapped).encode() + message[len(header.encode()) :]


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_rewrap_refuses_a_file_whose_only_wrapping_holds_another_data_key(
    stack: DevStack, tmp_path: Path
) -> None:
    """The wrapping was swapped for a valid wrapping of another data key (same key, same context):
    rewrap-file, to another key or to the latest version, refuses with exit 1 and a clear line,
    and the file is byte for byte what it was (before: it was rewritten around the wrong key)."""
    name, archive = create_key(stack, "vault"), create_key(stack, "kms")
    client = _client(stack)
    env = Envelope(client, frame_size=FRAME)
    message = env.encrypt_bytes(name, os.urandom(5 * FRAME), CONTEXT)
    intruder = client.generate_data_key(name, CONTEXT).ciphertext
    path = tmp_path / "doc.kbe"
    path.write_bytes(_with_wrappings(message, [intruder]))
    before = path.read_bytes()

    moved = keybroker(stack, "rewrap-file", "--to-key", archive, *CTX_ARGS, str(path))
    rotated = keybroker(stack, "rewrap-file", *CTX_ARGS, str(path))

    for done in (moved, rotated):
        assert done.returncode == 1, done.stderr
        assert b"commitment" in done.stderr, done.stderr
        assert b"Traceback" not in done.stderr
    assert path.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_rewrap_builds_on_the_wrapping_that_opens_when_a_swapped_one_comes_first(
    stack: DevStack, tmp_path: Path
) -> None:
    """A valid wrapping of another data key put first in the list: decrypt still opens the file
    through the genuine wrapping, and an in-place rewrap to another key leaves a file that opens
    (before: the new header held only the wrong key, the genuine wrapping dropped: data lost)."""
    name, archive = create_key(stack, "vault"), create_key(stack, "hsm")
    client = _client(stack)
    env = Envelope(client, frame_size=FRAME)
    data = os.urandom(4 * FRAME + 9)
    message = env.encrypt_bytes(name, data, CONTEXT)
    genuine = read_header(io.BytesIO(message)).wrapped[0]
    intruder = client.generate_data_key(name, CONTEXT).ciphertext
    path = tmp_path / "doc.kbe"
    path.write_bytes(_with_wrappings(message, [intruder, genuine]))

    assert env.decrypt_bytes(path.read_bytes(), CONTEXT) == data
    moved = keybroker(stack, "rewrap-file", "--to-key", archive, "--drop-key", name, *CTX_ARGS, str(path))

    assert moved.returncode == 0, moved.stderr
    assert read_header(io.BytesIO(path.read_bytes())).keys == (archive,)
    opened = keybroker(stack, "decrypt-file", *CTX_ARGS, str(path), "--out", str(tmp_path / "back"))
    assert opened.returncode == 0, opened.stderr
    assert (tmp_path / "back").read_bytes() == data


def test_rewrap_to_another_key_keeps_the_escrow_wrapping(stack: DevStack, tmp_path: Path) -> None:
    """A file wrapped for daily use and for escrow, re-wrapped to an archive key: the escrow
    wrapping stays and still opens the file alone (before: every wrapping but the new one was
    dropped, the escrow key with them)."""
    daily, escrow, archive = create_key(stack, "vault"), create_key(stack, "hsm"), create_key(stack, "kms")
    env = Envelope(_client(stack), frame_size=FRAME)
    data = os.urandom(3 * FRAME)
    path = tmp_path / "doc.kbe"
    path.write_bytes(env.encrypt_bytes([daily, escrow], data, CONTEXT))

    moved = keybroker(stack, "rewrap-file", "--to-key", archive, *CTX_ARGS, str(path))

    assert moved.returncode == 0, moved.stderr
    assert read_header(io.BytesIO(path.read_bytes())).keys == (archive, daily, escrow)
    for key in (archive, daily):
        assert lifecycle(stack, key, "suspend").status == 200
    assert env.decrypt_bytes(path.read_bytes(), CONTEXT) == data  # through the escrow key alone


def test_one_bad_file_in_a_directory_neither_stops_nor_harms_the_others(
    stack: DevStack, tmp_path: Path
) -> None:
    """decrypt-file and rewrap-file over a directory: a file whose output cannot be written (a
    directory is in the way), a tampered file and a file with a swapped-in wrapping each fail with
    a line naming them; the good files are processed; the exit status is 1; the failed inputs are
    unchanged and no partial file is left (before: the first OSError stopped the whole run)."""
    name = create_key(stack, "vault")
    client = _client(stack)
    env = Envelope(client, frame_size=FRAME)
    tree = tmp_path / "tree"
    tree.mkdir()
    data = {n: os.urandom(3 * FRAME + i) for i, n in enumerate(("a", "b", "c", "d"))}
    for n, plain in data.items():
        (tree / f"{n}.kbe").write_bytes(env.encrypt_bytes(name, plain, CONTEXT))
    (tree / "a").mkdir()  # a.kbe's output name is taken by a directory
    tampered = bytearray((tree / "b.kbe").read_bytes())
    tampered[-3] ^= 1
    (tree / "b.kbe").write_bytes(bytes(tampered))
    intruder = client.generate_data_key(name, CONTEXT).ciphertext
    (tree / "c.kbe").write_bytes(_with_wrappings((tree / "c.kbe").read_bytes(), [intruder]))
    before = {p.name: p.read_bytes() for p in tree.glob("*.kbe")}

    opened = keybroker(stack, "decrypt-file", "--force", *CTX_ARGS, str(tree))

    assert opened.returncode == 1, opened.stderr
    lines = opened.stderr.decode().strip().splitlines()
    failed = [line.split(":")[2].strip() for line in lines if line.startswith("keybroker: error:")]
    assert [Path(p).name for p in failed] == ["a.kbe", "b.kbe", "c.kbe"], lines
    assert b"Traceback" not in opened.stderr
    assert (tree / "d").read_bytes() == data["d"]
    assert not (tree / "b").exists()
    assert not (tree / "c").exists()
    assert (tree / "a").is_dir()
    assert _leftovers(tree) == []

    rotated = keybroker(stack, "rewrap-file", *CTX_ARGS, str(tree))

    assert rotated.returncode == 1, rotated.stderr
    assert rotated.stderr.count(b"keybroker: error:") == 1
    assert b"c.kbe" in rotated.stderr
    assert (tree / "c.kbe").read_bytes() == before["c.kbe"]
    for n in ("a", "d"):
        assert env.decrypt_bytes((tree / f"{n}.kbe").read_bytes(), CONTEXT) == data[n]
    assert _leftovers(tree) == []


def test_sigterm_during_a_write_removes_the_partial_output(stack: DevStack, tmp_path: Path) -> None:
    """encrypt-file stopped by SIGTERM while it streams: it exits 143 and neither the output
    nor its temporary file is left behind (before: killed outright, the .partial file stayed)."""
    name = create_key(stack, "vault")
    tls = stack.layout.tls
    env = {
        **os.environ,
        "KEYBROKER_ADDR": stack.broker_url,
        "KEYBROKER_CACERT": str(tls / "ca.pem"),
        "KEYBROKER_CLIENT_CERT": str(tls / "admin.crt"),
        "KEYBROKER_CLIENT_KEY": str(tls / "admin.key"),
    }
    out = tmp_path / "stream.kbe"
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "encrypt-file", "--key", name, *CTX_ARGS, "-", "--out", str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(os.urandom(1024 * 1024))  # more than a frame: the stream is being written
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not _leftovers(tmp_path) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert _leftovers(tmp_path), "the temporary output never appeared"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdin.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert code == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _seal(stack: DevStack, tmp_path: Path, key: str, name: str) -> Path:
    plain = tmp_path / f"{name}.txt"
    plain.write_bytes(b"quarterly numbers\n" * 100)
    sealed = tmp_path / f"{name}.kbe"
    out = keybroker(stack, "encrypt-file", "--key", key, str(plain), "--out", str(sealed))
    assert out.returncode == 0, out.stderr
    return sealed


def test_an_in_place_rewrap_keeps_the_files_permissions(stack: DevStack, tmp_path: Path) -> None:
    """A 0640 file (read by a service through its group) is still 0640 after an in-place rewrap
    (it became the temporary file's 0600)."""
    key = create_key(stack, "vault")
    sealed = _seal(stack, tmp_path, key, "config")
    sealed.chmod(0o640)
    lifecycle(stack, key, "rotate")
    out = keybroker(stack, "rewrap-file", str(sealed))
    assert out.returncode == 0, out.stderr
    assert oct(sealed.stat().st_mode & 0o777) == oct(0o640)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_an_in_place_rewrap_through_another_name_is_refused(
    stack: DevStack, tmp_path: Path, kind: str
) -> None:
    """``rewrap-file --drop-key`` through a symbolic link, or of a file with other hard links,
    would replace only that name and leave the old header, still wrapped under the dropped key,
    in the file the other names reach: refused before anything is read, every name unchanged."""
    old, new = create_key(stack, "vault"), create_key(stack, "vault")
    sealed = _seal(stack, tmp_path, old, "real")
    before = sealed.read_bytes()
    other = tmp_path / "other.kbe"
    if kind == "symlink":
        other.symlink_to(sealed)
    else:
        os.link(sealed, other)
    out = keybroker(stack, "rewrap-file", "--to-key", new, "--drop-key", old, str(other))
    assert out.returncode != 0
    assert ("symbolic link" if kind == "symlink" else "hard links") in out.stderr.decode()
    assert sealed.read_bytes() == before
    assert other.read_bytes() == before
