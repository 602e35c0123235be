"""Red-team checks of backup-file reading: the snapshot bytes a restore sends to Vault are the
bytes whose SHA-256 the authenticated manifest names, whatever the tar encoding of the member."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from broker.vaultops.backup import (
    ANCHORS,
    FORMAT,
    MAC,
    MANIFEST,
    SNAPSHOT,
    BackupRefused,
    manifest_mac,
    read_backup,
)

KEY = bytes(range(32))
# A snapshot as the real writer made it, ending in a run of zero bytes (a hole candidate).
SNAP = b"\x1f\x8b" + b"A" * 510 + bytes(1024)
ANCHOR_DOCS = {"broker": {"seq": 1, "hash": "cd" * 32, "epoch": "initial", "epochs": []}}
INJECTED = b"EVIL" * 256  # 1024 bytes outside any tar member


def _sparse_header(name: str, stored: int, real: int) -> bytes:
    """An old-GNU sparse ('S') header: ``stored`` bytes of data at offset 0, ``real`` bytes in all."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = stored
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))[:512]
    block[386:398] = b"%011o\0" % 0  # sparse entry 1: offset
    block[398:410] = b"%011o\0" % stored  # sparse entry 1: bytes
    block[482] = 0  # no extension headers
    block[483:495] = b"%011o\0" % real
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _forged(path: Path) -> Path:
    """A genuine backup (right key, right digests) whose snapshot member was re-encoded as a
    sparse member with the trailing zeros as a hole, and other bytes appended after it."""
    anchors = json.dumps(ANCHOR_DOCS).encode()
    manifest = json.dumps(
        {
            "format": FORMAT,
            "vault": {"seal_type": "awskms", "version": "2.6.2", "audit_devices": {}},
            "parts": {
                SNAPSHOT: {"sha256": hashlib.sha256(SNAP).hexdigest(), "bytes": len(SNAP)},
                ANCHORS: {"sha256": hashlib.sha256(anchors).hexdigest(), "bytes": len(anchors)},
            },
        }
    ).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (
            (MANIFEST, manifest),
            (MAC, manifest_mac(KEY, manifest).encode()),
            (ANCHORS, anchors),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    regular = out.getvalue()[: out.getvalue().rfind(anchors) + 512 * ((len(anchors) + 511) // 512)]
    path.write_bytes(regular + _sparse_header(SNAPSHOT, 512, len(SNAP)) + SNAP[:512] + INJECTED)
    return path


def test_a_sparse_snapshot_member_cannot_smuggle_other_bytes_into_a_restore(tmp_path: Path) -> None:
    """The digest is checked over the member as tar expands it (holes as zeros) while a restore
    streams the raw bytes from the member's offset (here the genuine data, then the appended
    bytes): a sparse member is refused."""
    path = _forged(tmp_path / "forged.kbbackup")
    with pytest.raises(BackupRefused, match="regular file"):
        read_backup(path, KEY)


def test_the_forged_file_is_a_readable_tar(tmp_path: Path) -> None:
    """The forgery above is well-formed for Python's tarfile (so the first test tests the reader,
    not a broken fixture): the snapshot member expands to exactly the genuine snapshot."""
    path = _forged(tmp_path / "forged.kbbackup")
    with tarfile.open(path, "r:") as tar:
        member = tar.getmember(SNAPSHOT)
        fh = tar.extractfile(member)
        assert fh is not None
        assert member.issparse()
        assert fh.read() == SNAP


def test_a_contiguous_type_snapshot_member_is_refused(tmp_path: Path) -> None:
    """Only plain regular members are the writer's: another 'regular' type flag is not accepted."""
    anchors = json.dumps(ANCHOR_DOCS).encode()
    manifest = json.dumps(
        {
            "format": FORMAT,
            "vault": {"seal_type": "awskms", "version": "2.6.2", "audit_devices": {}},
            "parts": {
                SNAPSHOT: {"sha256": hashlib.sha256(SNAP).hexdigest(), "bytes": len(SNAP)},
                ANCHORS: {"sha256": hashlib.sha256(anchors).hexdigest(), "bytes": len(anchors)},
            },
        }
    ).encode()
    path = tmp_path / "b"
    with tarfile.open(path, "w") as tar:
        for name, data in (
            (MANIFEST, manifest),
            (MAC, manifest_mac(KEY, manifest).encode()),
            (ANCHORS, anchors),
            (SNAPSHOT, SNAP),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if name == SNAPSHOT:
                info.type = tarfile.CONTTYPE
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BackupRefused, match="regular file"):
        read_backup(path, KEY)
