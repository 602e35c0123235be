"""``keybroker backup`` and ``keybroker restore`` on the real stack: a disaster and the way back.

The module runs a stack of its own (its Vault and broker are stopped mid-way, which the
session stack must never see): keys on all three backends seal data, a backup is taken, more
work follows, then the Vault is lost. A NEW OpenBao (fresh raft directory, the same KMS key for
its awskms seal, the same audit device declaration) is restored from the file, and a broker on
the old audit directory, the old AppRole files and the new Vault opens everything sealed before
the backup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from broker.devstack.common import Layout
from broker.devstack.stack import DevStack, free_port
from broker.devstack.vault import DevVault
from broker.vaultops.backup import backup_policy
from tests.integration.cliops import keybroker
from tests.integration.conftest import https
from tests.integration.keyops import b64, create_key, decrypt, encrypt, lifecycle, unb64

pytestmark = pytest.mark.integration

CONTEXT = {"tenant": "acme", "purpose": "backup-test"}


@dataclasses.dataclass(frozen=True)
class _NewVaultLayout(Layout):
    """A fresh state directory whose Vault declares the lost cluster's audit file (as its config must)."""

    audit_log: Path = Path("/nonexistent")

    @property
    def vault_audit_log(self) -> Path:
        return self.audit_log


@dataclasses.dataclass
class Disaster:
    origin: DevStack
    backup: Path
    key_file: Path
    backup_out: str
    restore_out: str
    new_vault_addr: str
    # (key name, context, ciphertext, plaintext) sealed before the backup.
    sealed: list[tuple[str, dict[str, str], str, bytes]]
    anchor_at_backup: dict[str, Any]
    decrypted: list[tuple[int, bytes]]


def _anchor(stack: DevStack, address: str, token: str) -> dict[str, Any] | None:
    resp = requests.get(
        f"{address}/v1/kb-kv/data/audit/anchor-broker", headers={"X-Vault-Token": token}, timeout=10
    )
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()["data"]["data"]
    return data


def _wait_anchor(stack: DevStack, address: str, token: str, past: int, timeout: float = 40) -> dict[str, Any]:
    """Poll (bounded) until node broker's anchor is past record ``past``; the broker is kept busy."""
    deadline = time.monotonic() + timeout
    while True:
        doc = _anchor(stack, address, token)
        if doc is not None and int(doc["seq"]) > past:
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"no checkpoint anchored past record {past} within {timeout}s: {doc}")
        https(stack, "/v1/sys/health")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def disaster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Disaster]:
    root = tmp_path_factory.mktemp("backup")
    # A checkpoint (and so an anchor move) every second rather than every 10 s: a shorter test.
    fast = {"KEYBROKER__AUDIT__CHECKPOINT_SECONDS": "1"}
    origin = DevStack(root / "origin", broker_port=free_port(), broker_env=fast)
    origin.start()
    try:
        yield _run_disaster(origin, root)
    finally:
        origin.stop()


def _run_disaster(origin: DevStack, root: Path) -> Disaster:
    # Keys on every backend; the transit key rotated, so data under two versions.
    sealed = []
    for backend in ("vault", "kms", "hsm"):
        name = create_key(origin, backend)
        for i in range(2):
            plaintext = os.urandom(48)
            reply = encrypt(origin, name, plaintext, CONTEXT)
            assert reply.status == 200, reply.body
            sealed.append((name, CONTEXT, str(reply.json()["ciphertext"]), plaintext))
            if backend == "vault" and i == 0:
                assert lifecycle(origin, name, "rotate").status == 200
    token = origin.root_token()
    _wait_anchor(origin, origin.vault_addr, token, past=0)

    key_file = root / "backup.key"
    key_file.write_text(os.urandom(32).hex() + "\n")
    key_file.chmod(0o600)
    backup = root / "keybroker.kbbackup"
    # Taken with the least policy the help documents, not the root token.
    admin = origin.vault_client()
    admin.sys.create_or_update_policy("kb-backup", backup_policy())
    operator = admin.auth.token.create(policies=["kb-backup"], ttl="15m")["auth"]["client_token"]
    vault_env = {"VAULT_ADDR": origin.vault_addr, "VAULT_TOKEN": operator}
    before = _anchor(origin, origin.vault_addr, token)
    made = keybroker(None, "backup", "--key-file", str(key_file), "--out", str(backup), env=vault_env)
    assert made.returncode == 0, made.stderr.decode()
    after = _anchor(origin, origin.vault_addr, token)
    # The anchor the file holds: the broker checkpoints every second, so the one read after the
    # backup may already be newer; the file's must lie between the reads around it.
    with tarfile.open(backup) as tar:
        anchor_in_file = json.loads(tar.extractfile("manifest.json").read())["anchors"]["broker"]  # type: ignore[union-attr]
    assert before is not None
    assert after is not None
    assert int(before["seq"]) <= int(anchor_in_file["seq"]) <= int(after["seq"])

    # Work after the backup: the local audit log (and Vault's anchor) move on past the file's.
    later = create_key(origin, "vault")
    assert encrypt(origin, later, b"after the backup", CONTEXT).status == 200
    _wait_anchor(origin, origin.vault_addr, token, past=int(anchor_in_file["seq"]))

    # The disaster: the broker and the Vault cluster are gone (the audit directory, the AppRole
    # files, the KMS stand-in and the HSM token survive).
    origin.children.pop("broker").stop()
    origin.children.pop("vault").stop()

    fresh = _NewVaultLayout(root / "new-vault", audit_log=origin.layout.vault_audit_log)
    for d in (fresh.vault_dir, fresh.logs, fresh.kms_unseal_key.parent):
        d.mkdir(parents=True, mode=0o700, exist_ok=True)
    # The awskms seal of the new cluster names the SAME KMS key: only it opens the snapshot's keyring.
    shutil.copyfile(origin.layout.kms_unseal_key, fresh.kms_unseal_key)
    new_vault = DevVault(fresh, origin.kms, tls=False, progress=lambda _m: None)
    origin.children["vault"] = new_vault.start()
    assert new_vault.seal_status().get("initialized") is False

    restored = keybroker(
        None,
        "restore",
        str(backup),
        "--key-file",
        str(key_file),
        "--address",
        new_vault.addr,
        "--approle-dir",
        str(origin.layout.approle_dir),
        env={"VAULT_TOKEN": "", "BAO_TOKEN": ""},
    )
    assert restored.returncode == 0, restored.stderr.decode() + restored.stdout.decode()

    # A broker with the old config, audit directory (node "broker") and AppRole files, on the new Vault.
    child = origin.spawn_broker(
        "broker-restored", origin.layout.broker_config, KEYBROKER__VAULT__ADDRESS=new_vault.addr
    )
    origin.children["broker"] = child
    origin.wait_healthy(child, origin.broker_url)
    decrypted = []
    for name, context, ciphertext, _ in sealed:
        reply = decrypt(origin, name, ciphertext, context)
        decrypted.append(
            (reply.status, unb64(reply.json()["plaintext"]) if reply.status == 200 else reply.body)
        )
    return Disaster(
        origin=origin,
        backup=backup,
        key_file=key_file,
        backup_out=made.stdout.decode() + made.stderr.decode(),
        restore_out=restored.stdout.decode() + restored.stderr.decode(),
        new_vault_addr=new_vault.addr,
        sealed=sealed,
        anchor_at_backup=anchor_in_file,
        decrypted=decrypted,
    )


def test_restored_vault_opens_everything_sealed_before_the_backup(disaster: Disaster) -> None:
    """Every ciphertext sealed on the three backends before the backup opens via a broker on the new Vault."""
    assert [status for status, _ in disaster.decrypted] == [200] * len(disaster.sealed)
    assert [plain for _, plain in disaster.decrypted] == [plain for *_, plain in disaster.sealed]
    # And it keeps working: a new encryption under the restored transit key round-trips.
    name = disaster.sealed[0][0]
    fresh = encrypt(disaster.origin, name, b"after the restore", CONTEXT)
    assert fresh.status == 200, fresh.body
    assert unb64(decrypt(disaster.origin, name, fresh.json()["ciphertext"], CONTEXT).json()["plaintext"]) == (
        b"after the restore"
    )


def test_backup_file_is_private_and_never_shows_a_token(disaster: Disaster) -> None:
    """The file is 0600 and a tar of exactly the manifest, its HMAC, the anchors and the snapshot; no output
    or manifest carries the root token or the backup key."""
    mode = stat.S_IMODE(disaster.backup.stat().st_mode)
    with tarfile.open(disaster.backup) as tar:
        names = tar.getnames()
        manifest_raw = tar.extractfile("manifest.json").read()  # type: ignore[union-attr]
        snapshot = tar.extractfile("vault.snap").read()  # type: ignore[union-attr]
    manifest = json.loads(manifest_raw)
    secrets = [disaster.origin.root_token(), disaster.key_file.read_text().strip()]

    assert mode == 0o600
    assert names == ["manifest.json", "manifest.hmac", "anchors.json", "vault.snap"]
    assert manifest["parts"]["vault.snap"]["sha256"] == hashlib.sha256(snapshot).hexdigest()
    assert manifest["vault"]["seal_type"] == "awskms"
    assert manifest["anchors"]["broker"]["seq"] == disaster.anchor_at_backup["seq"]
    for text in (disaster.backup_out, disaster.restore_out, manifest_raw.decode()):
        for secret in secrets:
            assert secret not in text
    assert not list(disaster.backup.parent.glob(".*.partial"))
    assert not list(disaster.backup.parent.glob(".*.snap"))


def test_old_root_token_and_anchor_come_back_and_the_audit_chain_continues(disaster: Disaster) -> None:
    """After the restore the lost cluster's root token works, Vault's anchor is the backup's (older than the
    local log), the broker on that log starts anyway and moves the anchor forward; the chain verifies."""
    token = disaster.origin.root_token()
    backed_up = int(disaster.anchor_at_backup["seq"])
    moved = _wait_anchor(disaster.origin, disaster.new_vault_addr, token, past=backed_up)
    report = https(disaster.origin, "/v1/audit/verify").json()

    assert f"node broker: record {backed_up}" in disaster.restore_out
    assert "checked: the AppRole credentials" in disaster.restore_out
    assert int(moved["seq"]) > backed_up
    assert moved["epoch"] == disaster.anchor_at_backup["epoch"]
    assert report["ok"] is True, report


def _tampered(disaster: Disaster, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"{how}.kbbackup"
    data = bytearray(disaster.backup.read_bytes())
    with tarfile.open(disaster.backup) as tar:
        members = {m.name: m for m in tar.getmembers()}
    if how == "snapshot":
        snap = members["vault.snap"]
        data[snap.offset_data + snap.size // 2] ^= 0x01
    elif how == "manifest":
        # A forger rewrites a part and its digest in the manifest: only the HMAC stands in the way.
        man = members["manifest.json"]
        text = bytes(data[man.offset_data : man.offset_data + man.size])
        data[man.offset_data : man.offset_data + man.size] = text.replace(b'"awskms"', b'"shamir"')
    elif how == "truncated":
        del data[len(data) // 2 :]
    copy.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("snapshot", "vault.snap does not match its SHA-256"),
        ("manifest", "HMAC does not match"),
        ("truncated", "truncated"),
    ],
)
def test_a_tampered_backup_is_refused_before_vault_is_touched(
    disaster: Disaster, tmp_path: Path, how: str, says: str
) -> None:
    """A flipped snapshot byte, an edited manifest or a cut file: restore refuses with a clear error, exit 1,
    and the Vault it was pointed at still serves the broker."""
    bad = _tampered(disaster, tmp_path, how)
    refused = keybroker(
        None,
        "restore",
        str(bad),
        "--key-file",
        str(disaster.key_file),
        "--address",
        disaster.new_vault_addr,
        "--overwrite-existing",
        env={"VAULT_TOKEN": disaster.origin.root_token()},
    )
    name, context, ciphertext, plaintext = disaster.sealed[0]
    still = decrypt(disaster.origin, name, ciphertext, context)

    assert refused.returncode == 1, refused.stdout
    assert says in refused.stderr.decode(), refused.stderr
    assert "Traceback" not in refused.stderr.decode()
    assert still.status == 200
    assert unb64(still.json()["plaintext"]) == plaintext


def test_wrong_key_and_a_live_cluster_are_refused(disaster: Disaster, tmp_path: Path) -> None:
    """Another backup key fails the HMAC; the intact file is refused by a Vault that holds broker state unless
    the operator says --overwrite-existing."""
    other = tmp_path / "other.key"
    other.write_text(os.urandom(32).hex())
    other.chmod(0o600)
    wrong_key = keybroker(None, "restore", "--verify-only", "--key-file", str(other), str(disaster.backup))
    env = {"VAULT_TOKEN": disaster.origin.root_token()}
    live = keybroker(
        None,
        "restore",
        str(disaster.backup),
        "--key-file",
        str(disaster.key_file),
        "--address",
        disaster.new_vault_addr,
        env=env,
    )
    verify_only = keybroker(
        None, "restore", "--verify-only", "--key-file", str(disaster.key_file), str(disaster.backup)
    )

    assert wrong_key.returncode == 1
    assert "HMAC does not match" in wrong_key.stderr.decode()
    assert live.returncode == 1
    assert "already holds broker state" in live.stderr.decode(), live.stderr
    assert verify_only.returncode == 0
    assert "intact and authentic" in verify_only.stdout.decode()


def test_backup_refuses_to_overwrite_and_a_loose_key_file(disaster: Disaster, tmp_path: Path) -> None:
    """--out must be a new file; a backup key readable by others is refused before Vault is asked."""
    loose = tmp_path / "loose.key"
    loose.write_text(b64(os.urandom(32)))
    loose.chmod(0o644)
    env = {"VAULT_ADDR": disaster.new_vault_addr, "VAULT_TOKEN": disaster.origin.root_token()}
    exists = keybroker(
        None, "backup", "--key-file", str(disaster.key_file), "--out", str(disaster.backup), env=env
    )
    loose_key = keybroker(None, "backup", "--key-file", str(loose), "--out", str(tmp_path / "b"), env=env)

    assert exists.returncode == 1
    assert "already exists" in exists.stderr.decode()
    assert loose_key.returncode == 1
    assert "readable by others" in loose_key.stderr.decode()
    assert not (tmp_path / "b").exists()


def test_a_new_cluster_with_other_audit_devices_is_refused_before_the_snapshot(
    disaster: Disaster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A fresh Vault whose config declares its audit file elsewhere would not unseal after the restore
    (OpenBao refuses a restored audit table that differs from its config): restore refuses first, names the
    device and the options to declare, and loads nothing."""
    layout = Layout(tmp_path_factory.mktemp("other-audit"))
    for d in (layout.vault_dir, layout.logs, layout.kms_unseal_key.parent, layout.vault_audit_log.parent):
        d.mkdir(parents=True, mode=0o700, exist_ok=True)
    shutil.copyfile(disaster.origin.layout.kms_unseal_key, layout.kms_unseal_key)
    other = DevVault(layout, disaster.origin.kms, tls=False, progress=lambda _m: None)
    child = other.start()
    try:
        refused = keybroker(
            None,
            "restore",
            str(disaster.backup),
            "--key-file",
            str(disaster.key_file),
            "--address",
            other.addr,
            env={"VAULT_TOKEN": "", "BAO_TOKEN": ""},
        )
        lookup = requests.get(
            f"{other.addr}/v1/auth/token/lookup-self",
            headers={"X-Vault-Token": disaster.origin.root_token()},
            timeout=10,
        )
    finally:
        child.stop()
    err = refused.stderr.decode()

    assert refused.returncode == 1, refused.stdout
    assert "audit device keybroker/ has options" in err, err
    assert str(disaster.origin.layout.vault_audit_log) in err
    assert "empty its raft directory" in err
    # Nothing was loaded: the lost cluster's root token means nothing there.
    assert lookup.status_code == 403


def test_a_token_without_the_backup_policy_is_refused(disaster: Disaster, tmp_path: Path) -> None:
    """A token with only Vault's default policy cannot take a backup: exit 1, the reason named, no file."""
    admin = requests.Session()
    admin.headers["X-Vault-Token"] = disaster.origin.root_token()
    created = admin.post(
        f"{disaster.new_vault_addr}/v1/auth/token/create",
        json={"policies": ["default"], "ttl": "5m"},
        timeout=10,
    )
    weak = created.json()["auth"]["client_token"]
    out = tmp_path / "weak.kbbackup"
    env = {"VAULT_ADDR": disaster.new_vault_addr, "VAULT_TOKEN": weak}
    refused = keybroker(None, "backup", "--key-file", str(disaster.key_file), "--out", str(out), env=env)

    assert refused.returncode == 1
    assert "the token lacks the policy" in refused.stderr.decode(), refused.stderr
    assert weak not in refused.stderr.decode() + refused.stdout.decode()
    assert not out.exists()
    assert not list(tmp_path.glob(".*"))
