"""Reading a backup file is hostile-input parsing: only what ``keybroker backup`` writes is accepted.

The real round trip (snapshot, restore, decrypt) is tests/integration/test_backup_restore.py;
these build archives by hand to reach the refusals a real Vault never produces.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from broker.vaultops.backup import (
    ANCHORS,
    FORMAT,
    MAC,
    MANIFEST,
    SNAPSHOT,
    BackupError,
    BackupRefused,
    audit_device_mismatch,
    load_key,
    manifest_mac,
    read_backup,
)

KEY = bytes(range(32))
SNAP = b"\x1f\x8b" + os.urandom(3000)
ANCHOR_DOCS = {"broker": {"seq": 7, "hash": "ab" * 32, "epoch": "initial", "epochs": []}}


def _manifest(**changes: Any) -> dict[str, Any]:
    anchors = json.dumps(ANCHOR_DOCS).encode()
    doc: dict[str, Any] = {
        "format": FORMAT,
        "vault": {"seal_type": "awskms", "version": "2.6.2", "audit_devices": {}},
        "parts": {
            SNAPSHOT: {"sha256": hashlib.sha256(SNAP).hexdigest(), "bytes": len(SNAP)},
            ANCHORS: {"sha256": hashlib.sha256(anchors).hexdigest(), "bytes": len(anchors)},
        },
    }
    doc.update(changes)
    return doc


def _archive(
    path: Path,
    *,
    manifest: dict[str, Any] | None = None,
    key: bytes = KEY,
    snap: bytes = SNAP,
    extra: list[tarfile.TarInfo] | None = None,
    skip: str = "",
    mac: bytes | None = None,
) -> Path:
    raw = json.dumps(manifest or _manifest()).encode()
    parts = [
        (MANIFEST, raw),
        (MAC, mac if mac is not None else manifest_mac(key, raw).encode()),
        (ANCHORS, json.dumps(ANCHOR_DOCS).encode()),
        (SNAPSHOT, snap),
    ]
    with tarfile.open(path, "w") as tar:
        for name, data in parts:
            if name == skip:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def test_an_archive_as_written_is_read_back(tmp_path: Path) -> None:
    """The manifest, the anchors and where the snapshot's bytes lie come back; the snapshot reads whole."""
    backup = read_backup(_archive(tmp_path / "b"), KEY)
    with backup.snapshot() as snap:
        data = snap.read()

    assert backup.manifest["format"] == FORMAT
    assert backup.anchors == ANCHOR_DOCS
    assert data == SNAP


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info


@pytest.mark.parametrize(
    ("build", "says"),
    [
        (lambda p: _archive(p, extra=[_member("../../etc/cron.d/x")]), "unexpected member"),
        (lambda p: _archive(p, extra=[_member(SNAPSHOT)]), "vault.snap twice"),
        (lambda p: _archive(p, skip=SNAPSHOT, extra=[_member(SNAPSHOT, tarfile.SYMTYPE)]), "not a regular"),
        (lambda p: _archive(p, skip=ANCHORS), "anchors.json missing"),
        (lambda p: _archive(p, key=b"another key" * 4), "HMAC does not match"),
        (lambda p: _archive(p, mac=b"\xff\xfe not ascii"), "HMAC does not match"),
        (lambda p: _archive(p, manifest=_manifest(format="keybroker-backup/0")), "not a keybroker-backup/1"),
        (lambda p: _archive(p, manifest=_manifest(parts={SNAPSHOT: {}})), "exactly the parts"),
        (lambda p: _archive(p, snap=SNAP[:-1] + b"!"), "does not match its SHA-256"),
        (lambda p: _archive(p, snap=SNAP + b"!"), "the manifest says"),
        (lambda p: p.write_bytes(os.urandom(4096)) and p, "not a keybroker backup"),
    ],
    ids=[
        "path-escape",
        "duplicate",
        "symlink",
        "missing-part",
        "other-key",
        "mac-not-ascii",
        "old-format",
        "parts-list",
        "snapshot-byte",
        "snapshot-size",
        "not-a-tar",
    ],
)
def test_a_file_we_did_not_write_is_refused(tmp_path: Path, build: Any, says: str) -> None:
    """Each departure from what `keybroker backup` writes is refused with what is wrong, never a traceback."""
    path = build(tmp_path / "b")
    with pytest.raises(BackupRefused) as caught:
        read_backup(path, KEY)

    assert says in str(caught.value)


def test_audit_devices_must_match_exactly() -> None:
    """The target must declare the backup's audit devices, same type and options; the message says what."""
    ours = {
        "keybroker/": {"type": "file", "local": False, "options": {"file_path": "/a.log", "mode": "0600"}}
    }
    moved = {"keybroker/": {**ours["keybroker/"], "options": {"file_path": "/b.log", "mode": "0600"}}}
    socket = {"keybroker/": {**ours["keybroker/"], "type": "socket"}}

    assert audit_device_mismatch(ours, ours) is None
    assert "/a.log" in str(audit_device_mismatch(ours, moved))
    assert "declare it" in str(audit_device_mismatch(ours, {}))
    assert "the backup has none" in str(audit_device_mismatch({}, ours))
    assert "socket on the target" in str(audit_device_mismatch(ours, socket))


@pytest.mark.parametrize(
    ("text", "mode", "says"),
    [
        ("ab" * 32, 0o644, "readable by others"),
        ("not hex at all", 0o600, "does not hold hex"),
        ("ab" * 16, 0o600, "at least 32"),
    ],
)
def test_a_weak_or_exposed_backup_key_is_refused(tmp_path: Path, text: str, mode: int, says: str) -> None:
    """The backup key is 32+ bytes of hex in an owner-only file; anything else is refused, naming why."""
    path = tmp_path / "k"
    path.write_text(text)
    path.chmod(mode)
    with pytest.raises(BackupError) as caught:
        load_key(path)

    assert says in str(caught.value)
    assert text not in str(caught.value)


class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_byte_progress_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch, tty: bool) -> None:
    """The snapshot's byte counter redraws one stderr line on a terminal and stays silent in a pipe or log."""
    from broker.cli.backup import _Meter

    err = _Terminal(tty)
    monkeypatch.setattr("sys.stderr", err)
    meter = _Meter("snapshot")
    meter(1_000_000, 4_000_000)
    meter(4_000_000, 4_000_000)
    meter.end()

    if tty:
        assert err.getvalue().startswith("\r  snapshot: 1.0 MB of 4.0 MB (25%)")
        assert "4.0 MB of 4.0 MB (100%)" in err.getvalue()
        assert err.getvalue().endswith("\n")
    else:
        assert err.getvalue() == ""


def test_a_redirect_is_not_followed_with_the_token(tmp_path: Path) -> None:
    """A Vault address that redirects elsewhere gets a clear error; the token never reaches the other host
    (requests keeps custom headers such as X-Vault-Token across redirects)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from broker.vaultops.backup import VaultTarget, take_backup

    seen: list[str | None] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("X-Vault-Token"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{other.server_port}{self.path}")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    first = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for server in (first, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = VaultTarget(f"http://127.0.0.1:{first.server_port}", token="s.not-for-elsewhere", timeout=5)
        with pytest.raises(BackupError) as caught:
            take_backup(target, tmp_path / "out", KEY)
    finally:
        for server in (first, other):
            server.shutdown()
            server.server_close()

    assert "redirect" in str(caught.value)
    assert seen == []
    assert not (tmp_path / "out").exists()


def test_versions_take_ascii_digits_only() -> None:
    """A version string from the network with other scripts' digits stops there, never a ValueError."""
    from broker.vaultops.backup import _version_tuple

    assert _version_tuple("2.6.2") == (2, 6, 2)
    assert _version_tuple("2.\u00b2.1") == (2,)
    assert _version_tuple("\u0662.6") == ()


@pytest.mark.parametrize("content", [b"<html>proxy error</html>", b"[1, 2]", b"", b"null"])
def test_an_answer_that_is_no_json_object_is_a_clear_error(content: bytes) -> None:
    """A proxy's HTML page or a JSON list where Vault sends an object: BackupError, not a traceback."""
    import requests

    from broker.vaultops.backup import _body

    resp = requests.Response()
    resp.status_code = 200
    resp._content = content
    with pytest.raises(BackupError, match="not a JSON object"):
        _body(resp, "listing audit devices")
