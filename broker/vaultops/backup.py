"""``keybroker backup`` / ``restore``: a raft snapshot of OpenBao plus what the broker needs to come back.

The backup file is an uncompressed tar archive (inspect it with ``tar tvf``)::

    manifest.json    what was backed up, from where, and the SHA-256 and size of every part
    manifest.hmac    HMAC-SHA256 of manifest.json's exact bytes under the operator's backup key
    vault.snap       OpenBao's raft snapshot (``GET sys/storage/raft/snapshot``), as Vault gave it
    anchors.json     every broker node's audit anchor document, as stored in Vault KV

The snapshot holds all of Vault's storage (transit keys, the broker's KV state, PKI, AppRole,
policies, tokens) encrypted under Vault's barrier key, which only the seal (the KMS key of the
``awskms`` seal) can open. ``anchors.json`` repeats the audit anchors in clear so a restore can
say, before and without any token, where each node's audit chain will be anchored afterwards.

Reading is hostile-input parsing: the MAC is checked before the manifest is parsed, each part's
digest before it is used, and only the four names above, each once, as regular files, are
accepted. Nothing here logs or prints a token, the backup key or a Vault secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

from broker.errors import BrokerError
from broker.timeutil import iso, now_utc
from broker.vaultops.policy import Mounts

FORMAT = "keybroker-backup/1"
MANIFEST = "manifest.json"
MAC = "manifest.hmac"
SNAPSHOT = "vault.snap"
ANCHORS = "anchors.json"
PARTS = (SNAPSHOT, ANCHORS)
# A manifest or anchor document larger than this is not one we wrote.
MAX_SMALL_PART = 16 * 1024 * 1024
MIN_KEY_BYTES = 32
CHUNK = 1024 * 1024
# What a backup never holds, said in the manifest so the file documents itself.
NOT_INCLUDED = (
    "HSM objects (keys and the audit checkpoint signing key live in the PKCS#11 token: back it up "
    "with the HSM vendor's tools)",
    "AWS KMS keys (they live in KMS; the awskms seal key must still exist to open the snapshot)",
    "the brokers' local audit logs (copy each audit directory with the host's file backups)",
    "broker configuration, TLS certificates and keys, the AppRole secret-id file, the HSM PIN",
)


def backup_policy(kv: str = "kb-kv") -> str:
    """The least Vault policy ``keybroker backup`` needs (the broker's own AppRole has no ``sys/``)."""
    return (
        'path "sys/storage/raft/snapshot" { capabilities = ["read", "sudo"] }\n'
        'path "sys/audit"                 { capabilities = ["read", "sudo"] }\n'
        f'path "{kv}/metadata/audit"      {{ capabilities = ["list"] }}\n'
        f'path "{kv}/data/audit/*"        {{ capabilities = ["read"] }}\n'
    )


Progress = Callable[[str], None]
ByteProgress = Callable[[int, int | None], None]


class BackupError(BrokerError):
    code = "backup_failed"
    title = "Backup or restore failed"


class BackupRefused(BackupError):
    """The backup file is damaged, forged, or does not fit the target Vault: nothing was changed."""

    code = "backup_refused"
    title = "Backup refused"


@dataclass(frozen=True)
class VaultTarget:
    address: str
    token: str | None = None
    ca_file: Path | None = None
    timeout: float = 30.0

    def session(self) -> requests.Session:
        s = requests.Session()
        s.verify = str(self.ca_file) if self.ca_file else True
        if self.token:
            s.headers["X-Vault-Token"] = self.token
        # requests keeps custom headers across a redirect, even to another host: never follow one
        # with the token (an error names the redirect instead).
        s.max_redirects = 0
        return s

    def url(self, path: str) -> str:
        return f"{self.address.rstrip('/')}/v1/{path.lstrip('/')}"


# -- the backup key ------------------------------------------------------------------------


def load_key(path: Path) -> bytes:
    """The backup key: at least 32 bytes as hex in a file only its owner can read."""
    try:
        info = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise BackupError(f"--key-file: {exc.strerror}: {path}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise BackupError(
            f"--key-file: {path} is readable by others (mode {oct(info.st_mode & 0o777)}); chmod 600 it"
        )
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise BackupError(f"--key-file: {path} does not hold hex (make one: openssl rand -hex 32)") from None
    if len(key) < MIN_KEY_BYTES:
        raise BackupError(
            f"--key-file: the key in {path} is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed"
        )
    return key


def manifest_mac(key: bytes, manifest: bytes) -> str:
    return hmac.new(key, manifest, hashlib.sha256).hexdigest()


# -- taking a backup -----------------------------------------------------------------------


@dataclass
class BackupResult:
    path: Path
    manifest: dict[str, Any]
    size: int


def _check(resp: requests.Response, what: str) -> None:
    if resp.status_code in (401, 403):
        raise BackupError(
            f"Vault refused {what} (HTTP {resp.status_code}): the token lacks the policy for it"
        )
    if resp.status_code >= 400:
        raise BackupError(f"Vault refused {what} (HTTP {resp.status_code}): {_vault_errors(resp)}")


def _vault_errors(resp: requests.Response) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        errors = resp.json().get("errors")
        if errors:
            # Vault's own error text: bounded, one line.
            return "; ".join(str(e) for e in errors)[:300].replace("\n", " ")
    return resp.reason or "no detail"


def _body(resp: requests.Response, what: str) -> dict[str, Any]:
    """An answer's JSON object; anything else (a proxy's HTML page, a list) is a clear error."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BackupError(f"Vault answered {what} with something that is not a JSON object")
    return body


def _json(session: requests.Session, target: VaultTarget, path: str, what: str) -> dict[str, Any]:
    resp = session.get(target.url(path), timeout=target.timeout)
    _check(resp, what)
    return _body(resp, what)


def _audit_devices(session: requests.Session, target: VaultTarget) -> dict[str, Any]:
    body = _json(session, target, "sys/audit", "listing audit devices (sys/audit needs sudo)")
    listing = body.get("data") if isinstance(body.get("data"), dict) else body
    devices: dict[str, Any] = {}
    for path, dev in sorted((listing or {}).items()):
        if isinstance(dev, dict) and "type" in dev:
            devices[str(path)] = {
                "type": dev.get("type"),
                "local": bool(dev.get("local", False)),
                "options": dict(sorted((dev.get("options") or {}).items())),
            }
    return devices


def _anchors(session: requests.Session, target: VaultTarget, kv: str) -> dict[str, Any]:
    """Every node's audit anchor document (KV ``audit/anchor-<node>``), by node name."""
    resp = session.request("LIST", target.url(f"{kv}/metadata/audit"), timeout=target.timeout)
    if resp.status_code == 404:
        return {}
    what = f"listing {kv}/metadata/audit"
    _check(resp, what)
    data = _body(resp, what).get("data")
    names = (data.get("keys") if isinstance(data, dict) else None) or []
    if not isinstance(names, list):
        raise BackupError(f"Vault answered {what} with no list of keys")
    out: dict[str, Any] = {}
    for name in sorted(str(n) for n in names):
        if not name.startswith("anchor-") or name.endswith("/"):
            continue
        doc = _json(session, target, f"{kv}/data/audit/{name}", f"reading the audit anchor {name}")
        data = (doc.get("data") or {}).get("data")
        if isinstance(data, dict):
            out[name.removeprefix("anchor-")] = data
    return out


def take_backup(
    target: VaultTarget,
    out: Path,
    key: bytes,
    *,
    mounts: Mounts | None = None,
    progress: Progress = lambda _m: None,
    byte_progress: ByteProgress | None = None,
) -> BackupResult:
    """Write a backup of ``target`` to ``out`` (a new file, 0600, written atomically)."""
    mounts = mounts or Mounts()
    if out.exists() or out.is_symlink():
        raise BackupError(f"--out: {out} already exists; refusing to overwrite it")
    if not os.access(out.parent if str(out.parent) else Path("."), os.W_OK | os.X_OK):
        raise BackupError(f"--out: cannot write into {out.parent}")
    session = target.session()
    try:
        health = session.get(target.url("sys/health"), timeout=target.timeout)
        seal = _json(session, target, "sys/seal-status", "the seal status")
        if health.status_code != 200:
            raise BackupError(
                f"Vault at {target.address} is not an active, unsealed node "
                f"(health HTTP {health.status_code}); "
                "point --address at the active node"
            )
        _check(session.get(target.url("auth/token/lookup-self"), timeout=target.timeout), "the token")
        progress("reading the audit devices and every broker node's audit anchor")
        devices = _audit_devices(session, target)
        anchors = _anchors(session, target, mounts.kv)
        anchors_raw = json.dumps(anchors, sort_keys=True, indent=2).encode() + b"\n"
        # The snapshot is streamed to a hidden 0600 file beside --out (never whole in memory), the
        # archive written to another, renamed over --out only when complete and on disk.
        snap_path = _hidden(out, "snap")
        tmp = _hidden(out, "partial")
        try:
            with _new_private(snap_path) as snap:
                progress("taking a raft snapshot of Vault (sys/storage/raft/snapshot)")
                snap_sha, snap_size = _download_snapshot(session, target, snap, byte_progress)
                manifest = {
                    "format": FORMAT,
                    "created": iso(now_utc()),
                    "vault": {
                        "address": target.address,
                        "version": seal.get("version"),
                        "seal_type": seal.get("type"),
                        "cluster_name": seal.get("cluster_name"),
                        "cluster_id": seal.get("cluster_id"),
                        "storage_type": seal.get("storage_type"),
                        "audit_devices": devices,
                    },
                    "mounts": {"transit": mounts.transit, "kv": mounts.kv, "approle": mounts.approle},
                    "anchors": {
                        node: {"seq": doc.get("seq"), "hash": doc.get("hash"), "epoch": doc.get("epoch")}
                        for node, doc in anchors.items()
                    },
                    "parts": {
                        SNAPSHOT: {"sha256": snap_sha, "bytes": snap_size},
                        ANCHORS: {
                            "sha256": hashlib.sha256(anchors_raw).hexdigest(),
                            "bytes": len(anchors_raw),
                        },
                    },
                    "not_included": list(NOT_INCLUDED),
                }
                manifest_raw = json.dumps(manifest, sort_keys=True, indent=2).encode() + b"\n"
                mac = manifest_mac(key, manifest_raw).encode() + b"\n"
                progress("writing the backup file")
                snap.seek(0)
                with _new_private(tmp) as archive:
                    now = time.time()
                    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
                        for name, data in ((MANIFEST, manifest_raw), (MAC, mac), (ANCHORS, anchors_raw)):
                            tar.addfile(_member(name, len(data), now), io.BytesIO(data))
                        tar.addfile(_member(SNAPSHOT, snap_size, now), snap)
                    archive.flush()
                    os.fsync(archive.fileno())
            try:
                # A hard link, not a rename: it fails rather than replace a file created meanwhile.
                os.link(tmp, out)
            except FileExistsError:
                raise BackupError(f"--out: {out} appeared meanwhile; refusing to overwrite it") from None
            _fsync_dir(out.parent)
        finally:
            for leftover in (snap_path, tmp):
                with contextlib.suppress(OSError):
                    leftover.unlink()
    except requests.exceptions.RequestException as exc:
        raise _unreachable(target, exc) from None
    finally:
        session.close()
    return BackupResult(out, manifest, out.stat().st_size)


def _unreachable(target: VaultTarget, exc: requests.exceptions.RequestException) -> BackupError:
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return BackupError(
            f"Vault at {target.address} answered with a redirect, which is not followed with the token: "
            "point --address at the active node"
        )
    return BackupError(f"cannot reach Vault at {target.address} ({exc.__class__.__name__})")


def _download_snapshot(
    session: requests.Session, target: VaultTarget, spool: IO[bytes], byte_progress: ByteProgress | None
) -> tuple[str, int]:
    """Stream the snapshot to the end of ``spool`` (a hidden 0600 file); its SHA-256 and size."""
    digest = hashlib.sha256()
    size = 0
    with session.get(target.url("sys/storage/raft/snapshot"), timeout=target.timeout, stream=True) as resp:
        _check(resp, "the raft snapshot (sys/storage/raft/snapshot needs read and sudo)")
        length = resp.headers.get("Content-Length", "")
        total = int(length) if length.isascii() and length.isdigit() else None
        for chunk in resp.iter_content(CHUNK):
            spool.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if byte_progress:
                byte_progress(size, total)
    if size == 0:
        raise BackupError("Vault sent an empty snapshot")
    spool.flush()
    return digest.hexdigest(), size


def _member(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(mtime)
    return info


def _hidden(out: Path, what: str) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.{what}")


def _new_private(path: Path) -> IO[bytes]:
    """A new file, mode 0600 from its first byte; never follows or replaces anything."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask left
    return os.fdopen(fd, "w+b")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path if str(path) else ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading a backup ----------------------------------------------------------------------


@dataclass
class BackupFile:
    """A verified backup: its manifest, anchors, and where the snapshot's bytes are in the file."""

    path: Path
    manifest: dict[str, Any]
    anchors: dict[str, Any]
    snapshot_offset: int
    snapshot_size: int
    warnings: list[str] = field(default_factory=list)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[io.RawIOBase]:
        with self.path.open("rb") as fh:
            fh.seek(self.snapshot_offset)
            yield _Window(fh, self.snapshot_size)


class _Window(io.RawIOBase):
    """``size`` bytes of ``fh`` from its current position, as a readable stream."""

    def __init__(self, fh: IO[bytes], size: int) -> None:
        self._fh = fh
        self._left = size
        self.size = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._fh.read(n)
        self._left -= len(data)
        return data

    def __len__(self) -> int:
        return self.size


def read_backup(path: Path, key: bytes) -> BackupFile:
    """Open and verify ``path``: BackupRefused (with what is wrong) unless every check passes."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise BackupError(f"cannot read {path}: {exc.strerror}") from None
    with fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r:")  # noqa: SIM115 - closed with fh, its file
        except (tarfile.TarError, EOFError, ValueError):
            raise BackupRefused(
                f"{path} is not a keybroker backup (not a tar archive, or truncated)"
            ) from None
        members: dict[str, tarfile.TarInfo] = {}
        try:
            for member in tar:
                if member.name not in (MANIFEST, MAC, *PARTS):
                    raise BackupRefused(f"{path} holds an unexpected member {member.name[:80]!r}")
                if member.name in members:
                    raise BackupRefused(f"{path} holds {member.name} twice")
                # Plain regular members only, as the writer makes them: tar's other "regular" kinds
                # (sparse above all) are read by extractfile (the digest) differently from the raw
                # bytes at offset_data that a restore streams, so other bytes could pass the check.
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
                    raise BackupRefused(f"{path}: {member.name} is not a regular file (or is sparse)")
                members[member.name] = member
        except (tarfile.TarError, EOFError) as exc:
            raise BackupRefused(
                f"{path} is damaged ({exc.__class__.__name__}: truncated or altered)"
            ) from None
        missing = [n for n in (MANIFEST, MAC, *PARTS) if n not in members]
        if missing:
            raise BackupRefused(f"{path} is incomplete: {', '.join(missing)} missing")
        manifest_raw = _small(tar, members[MANIFEST])
        # Bytes, not text: compare_digest refuses non-ASCII strings, and the member is untrusted.
        mac = _small(tar, members[MAC]).strip()
        if not hmac.compare_digest(mac, manifest_mac(key, manifest_raw).encode()):
            raise BackupRefused(
                f"{path}: the manifest's HMAC does not match under this backup key (the file was altered, "
                "or it was made with another key)"
            )
        try:
            manifest = json.loads(manifest_raw)
        except ValueError:
            raise BackupRefused(f"{path}: the manifest is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BackupRefused(
                f"{path}: not a {FORMAT} backup (format {str(manifest.get('format'))[:40]!r})"
            )
        parts = manifest.get("parts")
        if not isinstance(parts, dict) or set(parts) != set(PARTS):
            raise BackupRefused(f"{path}: the manifest does not list exactly the parts {', '.join(PARTS)}")
        for name in PARTS:
            want = parts[name]
            member = members[name]
            if not isinstance(want, dict) or want.get("bytes") != member.size:
                raise BackupRefused(
                    f"{path}: {name} is {member.size} bytes, the manifest says {want.get('bytes')}"
                )
            if _digest(tar, member) != want.get("sha256"):
                raise BackupRefused(
                    f"{path}: {name} does not match its SHA-256 in the manifest (damaged or altered)"
                )
        try:
            anchors = json.loads(_small(tar, members[ANCHORS]))
        except ValueError:
            raise BackupRefused(f"{path}: {ANCHORS} is not JSON") from None
        if not isinstance(anchors, dict):
            raise BackupRefused(f"{path}: {ANCHORS} is not a JSON object")
        snap = members[SNAPSHOT]
        return BackupFile(path, manifest, anchors, snap.offset_data, snap.size)


def _small(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    if member.size > MAX_SMALL_PART:
        raise BackupRefused(f"{member.name} is {member.size} bytes: larger than any this tool writes")
    fh = tar.extractfile(member)
    if fh is None:
        raise BackupRefused(f"{member.name} cannot be read")
    data = fh.read()
    if len(data) != member.size:
        raise BackupRefused(f"{member.name} is truncated")
    return data


def _digest(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    fh = tar.extractfile(member)
    if fh is None:
        raise BackupRefused(f"{member.name} cannot be read")
    digest = hashlib.sha256()
    read = 0
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
        read += len(chunk)
    if read != member.size:
        raise BackupRefused(f"{member.name} is truncated")
    return digest.hexdigest()


# -- restoring -----------------------------------------------------------------------------


@dataclass
class RestoreResult:
    initialised_here: bool
    seconds: float
    anchors: dict[str, Any]
    approle_checked: bool = False


def audit_device_mismatch(backed_up: dict[str, Any], target: dict[str, Any]) -> str | None:
    """Why the target's declared audit devices differ from the backup's, or None.

    OpenBao declares audit devices in its config file and, after a restore, refuses to
    unseal when the restored audit table differs from the config: so they must match first.
    """
    for path in sorted(set(backed_up) | set(target)):
        old, new = backed_up.get(path), target.get(path)
        if old is None:
            kind = new.get("type") if new else ""
            return f"the target declares audit device {path} ({kind}), the backup has none"
        if new is None:
            return (
                f"the backup has audit device {path} ({old.get('type')}, options {old.get('options')}): "
                "declare "
                "it in the new cluster's config with the same options"
            )
        if old.get("type") != new.get("type"):
            return f"audit device {path} is {old.get('type')} in the backup, {new.get('type')} on the target"
        if old.get("options") != new.get("options"):
            return (
                f"audit device {path} has options {old.get('options')} in the backup but "
                f"{new.get('options')} "
                "on the target: declare the backup's options in the new cluster's config"
            )
    return None


def _version_tuple(version: object) -> tuple[int, ...]:
    out = []
    for piece in str(version or "").split("+")[0].split("-")[0].split("."):
        # ASCII digits only: str.isdigit() also takes "²" and other scripts' digits.
        if not (piece.isascii() and piece.isdigit()):
            break
        out.append(int(piece))
    return tuple(out)


def restore_backup(
    target: VaultTarget,
    backup: BackupFile,
    *,
    overwrite: bool = False,
    approle_dir: Path | None = None,
    wait_seconds: float = 120.0,
    progress: Progress = lambda _m: None,
    byte_progress: ByteProgress | None = None,
) -> RestoreResult:
    """Restore ``backup`` into the Vault at ``target`` (snapshot-force); checks first, changes last."""
    started = time.monotonic()
    session = target.session()
    vault = backup.manifest.get("vault") or {}
    try:
        seal = _json(session, target, "sys/seal-status", "the seal status")
        if seal.get("type") != vault.get("seal_type"):
            raise BackupRefused(
                f"the backup was taken under a {vault.get('seal_type')} seal, "
                f"the target uses {seal.get('type')}: "
                "the snapshot's keyring can only be opened by the same seal (the same KMS key for awskms)"
            )
        if _version_tuple(seal.get("version")) < _version_tuple(vault.get("version")):
            raise BackupRefused(
                f"the target runs OpenBao {seal.get('version')}, "
                f"older than the backup's {vault.get('version')}; "
                "restore into the same version or newer"
            )
        initialised_here = False
        if not seal.get("initialized"):
            progress("the target Vault is not initialised: initialising it to load the snapshot")
            answer = session.put(
                target.url("sys/init"),
                json={"recovery_shares": 1, "recovery_threshold": 1},
                timeout=target.timeout,
            )
            _check(answer, "initialising the target")
            # A throwaway: the restore replaces the token store, so this token stops working and the
            # backed-up cluster's root token and recovery keys apply again. It is never written down.
            session.headers["X-Vault-Token"] = str(answer.json()["root_token"])
            initialised_here = True
        elif not target.token:
            raise BackupError(
                "the target Vault is initialised: give its root token with --token-file or VAULT_TOKEN"
            )
        try:
            _fit_and_load(session, target, backup, overwrite, wait_seconds, progress, byte_progress)
        except BackupError as exc:
            if not initialised_here:
                raise
            raise type(exc)(
                f"{exc.detail}. The target was initialised for this restore and that token is gone: stop "
                "it, empty its raft directory and start it again before the next attempt"
            ) from None
        progress("snapshot loaded; waiting for Vault to unseal itself with the restored keyring")
        session.headers.pop("X-Vault-Token", None)
        _wait_active(session, target, wait_seconds, "after the restore", standby_ok=True)
        checked = False
        if approle_dir is not None:
            _check_approle(session, target, backup, approle_dir)
            checked = True
    except requests.exceptions.RequestException as exc:
        raise _unreachable(target, exc) from None
    finally:
        session.close()
    return RestoreResult(initialised_here, time.monotonic() - started, backup.anchors, checked)


def _fit_and_load(
    session: requests.Session,
    target: VaultTarget,
    backup: BackupFile,
    overwrite: bool,
    wait_seconds: float,
    progress: Progress,
    byte_progress: ByteProgress | None,
) -> None:
    """Check that the (initialised) target fits the backup, then load the snapshot into it."""
    vault = backup.manifest.get("vault") or {}
    _wait_active(session, target, wait_seconds, "before the restore")
    devices = _audit_devices(session, target)
    mismatch = audit_device_mismatch(vault.get("audit_devices") or {}, devices)
    if mismatch:
        raise BackupRefused(
            f"the target does not fit this backup: {mismatch} "
            "(OpenBao would refuse to unseal after the restore)"
        )
    kv = str((backup.manifest.get("mounts") or {}).get("kv") or Mounts().kv)
    if not overwrite and _holds_broker_state(session, target, kv):
        raise BackupRefused(
            f"the target already holds broker state in {kv}/: a restore replaces ALL of its data. "
            "Restore into a fresh cluster, or pass --overwrite-existing to roll this one back"
        )
    progress(f"loading the snapshot into {target.address} (sys/storage/raft/snapshot-force)")
    with backup.snapshot() as snap:
        body = _Counted(snap, backup.snapshot_size, byte_progress)
        resp = session.post(
            target.url("sys/storage/raft/snapshot-force"),
            data=body,
            headers={
                "Content-Length": str(backup.snapshot_size),
                "Content-Type": "application/octet-stream",
            },
            timeout=max(target.timeout, 120.0),
        )
    _check(resp, "the snapshot (sys/storage/raft/snapshot-force needs update and sudo)")


class _Counted(io.RawIOBase):
    """A readable stream that reports how much of it was read (for the progress line)."""

    def __init__(self, inner: io.RawIOBase, size: int, report: ByteProgress | None) -> None:
        self._inner = inner
        self._size = size
        self._done = 0
        self._report = report

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(CHUNK if n is None or n < 0 else n)
        self._done += len(data)
        if self._report and data:
            self._report(self._done, self._size)
        return data

    def tell(self) -> int:
        # With __len__, what lets requests send a Content-Length (else it falls back to chunking lines).
        return self._done

    def __len__(self) -> int:
        return self._size


def _wait_active(
    session: requests.Session, target: VaultTarget, seconds: float, when: str, *, standby_ok: bool = False
) -> None:
    """Until ``sys/health`` answers 200 (initialised, unsealed, active), bounded by ``seconds``.

    A standby (429) is refused at once before a restore (the snapshot goes to the leader); after
    one, ``standby_ok`` accepts it: the cluster is unsealed, whichever node leads.
    """
    deadline = time.monotonic() + seconds
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = session.get(target.url("sys/health"), timeout=5)
        except requests.exceptions.RequestException as exc:
            last = exc.__class__.__name__  # a restoring node stops answering for a few seconds
        else:
            if resp.status_code == 200 or (standby_ok and resp.status_code == 429):
                return
            if resp.status_code == 429:
                leader = _other_leader(session, target)
                if leader:
                    raise BackupRefused(
                        f"Vault at {target.address} is a standby: point --address at the active "
                        f"node ({leader})"
                    )
            last = f"HTTP {resp.status_code}"
        time.sleep(0.3)
    raise BackupError(
        f"Vault at {target.address} was not active and unsealed {when} within {seconds:g}s "
        f"(last health: {last}); "
        "check its log, its seal configuration and that the KMS key is reachable"
    )


def _other_leader(session: requests.Session, target: VaultTarget) -> str:
    """The active node's address when ``target`` is a standby of a cluster that has one, else ''.

    A node just initialised answers 429 too until it has elected itself: that one is waited for.
    """
    try:
        resp = session.get(target.url("sys/leader"), timeout=5)
        doc = resp.json() if resp.status_code == 200 else {}
    except (requests.exceptions.RequestException, ValueError):
        return ""
    if not isinstance(doc, dict) or doc.get("is_self"):
        return ""
    return str(doc.get("leader_address") or "")[:200]


def _holds_broker_state(session: requests.Session, target: VaultTarget, kv: str) -> bool:
    resp = session.request("LIST", target.url(f"{kv}/metadata/"), timeout=target.timeout)
    if resp.status_code in (400, 403, 404):
        # 404: empty or no such mount; 400/403: no such mount path (nothing of the broker's here).
        return False
    _check(resp, f"listing {kv}/")
    return bool(((resp.json() or {}).get("data") or {}).get("keys"))


def _check_approle(
    session: requests.Session, target: VaultTarget, backup: BackupFile, approle_dir: Path
) -> None:
    """The broker's AppRole credentials log in to the restored Vault and read back the anchors."""
    try:
        role_id = (approle_dir / "role-id").read_text().strip()
        secret_id = (approle_dir / "secret-id").read_text().strip()
    except OSError as exc:
        raise BackupError(f"--approle-dir: {exc.strerror}: {exc.filename}") from None
    mount = str((backup.manifest.get("mounts") or {}).get("approle") or Mounts().approle)
    resp = session.post(
        target.url(f"auth/{mount}/login"),
        json={"role_id": role_id, "secret_id": secret_id},
        timeout=target.timeout,
    )
    if resp.status_code != 200:
        raise BackupError(
            f"the restored Vault refused the broker's AppRole credentials in {approle_dir} "
            f"(HTTP {resp.status_code}); "
            "issue a new secret id with `keybroker vault bootstrap` and the backed-up cluster's root token"
        )
    auth = _body(resp, "the broker's AppRole login").get("auth")
    token = str((auth.get("client_token") if isinstance(auth, dict) else None) or "")
    # The broker's token on a session that, like every other here, never follows a redirect.
    broker = dataclasses.replace(target, token=token).session()
    try:
        kv = str((backup.manifest.get("mounts") or {}).get("kv") or Mounts().kv)
        found = _anchors(broker, target, kv)
        with contextlib.suppress(requests.exceptions.RequestException):
            broker.post(target.url("auth/token/revoke-self"), timeout=target.timeout)
    finally:
        broker.close()
    if found != backup.anchors:
        raise BackupError(
            "the restored Vault's audit anchors differ from the backup's: the restore did not take"
        )
