"""Red-team checks of the file commands on the real stack: an output path that is a symbolic link
(to a file someone wants overwritten, or dangling towards a file someone wants created) is never
written through, and a hostile header is refused with one line before any broker call."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.keyops import create_key


def _sealed(stack: DevStack, tmp_path: Path, data: bytes) -> Path:
    name = create_key(stack, "vault")
    plain = tmp_path / "report.csv"
    plain.write_bytes(data)
    done = keybroker(stack, "encrypt-file", "--key", name, "--context", "t=1", str(plain))
    assert done.returncode == 0, done.stderr
    plain.unlink()
    return tmp_path / "report.csv.kbe"


def test_decrypt_never_writes_through_a_link_at_the_output_path(stack: DevStack, tmp_path: Path) -> None:
    """``report.csv`` is a link to another file: refused without --force (the file untouched);
    with --force the link itself is replaced by the plaintext, the linked file still untouched."""
    data = os.urandom(3000)
    sealed = _sealed(stack, tmp_path, data)
    victim = tmp_path / "victim.conf"
    victim.write_bytes(b"precious\n")
    (tmp_path / "report.csv").symlink_to(victim)

    refused = keybroker(stack, "decrypt-file", "--context", "t=1", str(sealed))
    forced = keybroker(stack, "decrypt-file", "--context", "t=1", "--force", str(sealed))

    assert refused.returncode == 2  # refused as a usage error, before any broker call
    assert b"already exists" in refused.stderr
    assert forced.returncode == 0, forced.stderr
    assert victim.read_bytes() == b"precious\n"
    out = (tmp_path / "report.csv").lstat()
    assert stat.S_ISREG(out.st_mode)
    assert stat.S_IMODE(out.st_mode) == 0o600
    assert (tmp_path / "report.csv").read_bytes() == data


def test_decrypt_never_creates_a_file_through_a_dangling_link(stack: DevStack, tmp_path: Path) -> None:
    """``report.csv`` is a dangling link to where someone wants a file created: the link is replaced,
    nothing appears at its target."""
    data = os.urandom(100)
    sealed = _sealed(stack, tmp_path, data)
    planted = tmp_path / "elsewhere" / "planted"
    planted.parent.mkdir()
    (tmp_path / "report.csv").symlink_to(planted)

    done = keybroker(stack, "decrypt-file", "--context", "t=1", str(sealed))

    assert done.returncode == 0, done.stderr
    assert not planted.exists()
    assert stat.S_ISREG((tmp_path / "report.csv").lstat().st_mode)
    assert (tmp_path / "report.csv").read_bytes() == data


def test_a_hostile_header_is_refused_in_one_line_with_nothing_written(
    stack: DevStack, tmp_path: Path
) -> None:
    """A frame size of 4 GiB or a context count far over the limit: one line, exit 1, no output file
    (the sizes are checked before anything is allocated or sent to the broker)."""
    huge_frame = b"kbe1\x01" + struct.pack(">I", 0xFFFFFFFF) + bytes(32)
    many_fields = b"kbe1\x01" + struct.pack(">I", 1024) + bytes(32) + struct.pack(">H", 0xFFFF)
    for label, raw in (("frame", huge_frame), ("fields", many_fields)):
        path = tmp_path / f"{label}.kbe"
        path.write_bytes(raw)
        done = keybroker(stack, "decrypt-file", str(path))
        assert done.returncode == 1, (label, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert b"Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fields.kbe", "frame.kbe"]
