"""The audit sink under failure: it never dies or hangs, fails closed with a reason, and recovers.

Also the Vault anchor rules (with an in-memory anchor store standing in for Vault's
check-and-set KV): a wiped log cannot silently restart the chain, the anchor only moves
forward, and repeated checkpoint failure stops the log.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from broker.audit.chain import Anchor, canonical, verify
from broker.audit.checkpoints import AnchorConflict
from broker.audit.sink import INITIAL_EPOCH, AuditSink
from broker.errors import BrokerError, Conflict, Unavailable
from tests.unit.test_audit_chain import SoftSigner, files

STRANGE = ["\ud800", "a\udfffb", "\ud83d\ude00", "\udc00\ud800", "é\x00\u2028", "\U0001f600"]


@pytest.mark.parametrize("value", STRANGE)
def test_canonical_never_fails_and_reads_back_to_the_same_bytes(value: str) -> None:
    """Lone surrogates are escaped (not dropped); re-encoding what a reader parses gives the same line."""
    record = {"key": value, value: [value]}

    line = canonical(record)

    assert canonical(json.loads(line)) == line
    line.decode()  # valid UTF-8


class FailingSigner(SoftSigner):
    """Signs, except while ``fail`` holds an exception to raise."""

    def __init__(self) -> None:
        super().__init__()
        self.fail: Exception | None = None
        self.hang = False

    async def sign_digest(self, digest: bytes) -> bytes:
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        return await super().sign_digest(digest)


class MemoryAnchors:
    """Vault's anchor document in memory, with the same forward-only rules as VaultAnchors."""

    def __init__(self, doc: dict[str, Any] | None = None) -> None:
        self.doc = doc
        self.fail: Exception | None = None

    async def read(self) -> dict[str, Any] | None:
        return None if self.doc is None else dict(self.doc)

    async def advance(self, epoch: str, mark: Anchor) -> None:
        if self.fail is not None:
            raise self.fail
        if self.doc is not None:
            if (self.doc.get("epoch") or INITIAL_EPOCH) != epoch:
                raise AnchorConflict("another epoch")
            if int(self.doc["seq"]) > mark.seq:
                raise AnchorConflict("ahead")
        self.doc = {**(self.doc or {"epochs": []}), "seq": mark.seq, "hash": mark.hash, "epoch": epoch}

    async def begin_epoch(
        self, expected: dict[str, Any] | None, entry: dict[str, Any], mark: Anchor
    ) -> dict[str, Any]:
        if self.doc != expected:
            raise AnchorConflict("moved")
        history = list((self.doc or {}).get("epochs") or [])
        self.doc = {"seq": mark.seq, "hash": mark.hash, "epoch": entry["epoch"], "epochs": [*history, entry]}
        return dict(self.doc)


async def settle(sink: AuditSink) -> None:
    """Let the writer and anchor tasks run."""
    for _ in range(20):
        await asyncio.sleep(0.01)


def test_an_unencodable_record_fails_its_batch_promptly_and_the_sink_recovers(tmp_path: Path) -> None:
    """A record json cannot encode: its request gets 503 at once (no hang), health says why, and after
    the pause the next records are written and the chain verifies. A surrogate is written, not fatal."""
    signer = FailingSigner()

    async def run() -> tuple[float, str, dict[str, Any], int]:
        sink = AuditSink(tmp_path, signer=signer, checkpoint_every=3, write_timeout_seconds=5)
        await sink.start()
        await sink.append({"type": "event", "key": "\ud800"})
        started = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            await sink.append({"type": "event", "bad": {1, 2}})
        took = time.monotonic() - started
        status = sink.status()
        await asyncio.sleep(0.6)
        sink.check_ready()
        last = 0
        for n in range(5):
            last = await sink.append({"type": "event", "n": n})
        await sink.close()
        return took, refused.value.detail, status, last

    took, detail, status, last = asyncio.run(run())
    report = verify(files(tmp_path), signer.check())

    assert took < 2
    assert "could not write a batch (TypeError" in detail
    assert status["ok"] is False
    assert "could not write a batch" in status["error"]
    assert last > 2
    assert report.ok, report.to_json()
    assert report.checkpoints >= 1


def test_a_signer_raising_unexpectedly_fails_its_batch_and_the_sink_recovers(tmp_path: Path) -> None:
    """A checkpoint signer that raises a non-broker exception: that batch's requests get 503 promptly,
    health says why, and once it signs again records and checkpoints continue on a verifying chain."""
    signer = FailingSigner()

    async def run() -> tuple[list[Any], float, dict[str, Any]]:
        sink = AuditSink(
            tmp_path, signer=signer, checkpoint_every=2, checkpoint_seconds=0.1, write_timeout_seconds=5
        )
        await sink.start()
        signer.fail = RuntimeError("token removed")
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(sink.append({"type": "event", "n": n}) for n in range(3)), return_exceptions=True
        )
        took = time.monotonic() - started
        status = sink.status()
        signer.fail = None
        await asyncio.sleep(0.6)
        sink.check_ready()
        for n in range(4):
            await sink.append({"type": "event", "n": 10 + n})
        await asyncio.sleep(0.3)
        await sink.close()
        return outcomes, took, status

    outcomes, took, status = asyncio.run(run())
    report = verify(files(tmp_path), signer.check())

    assert [type(o) for o in outcomes] == [Unavailable] * 3
    assert took < 2
    assert "RuntimeError" in status["error"]
    assert report.ok, report.to_json()
    assert report.checkpoints >= 1
    assert report.last_seq == report.last_checkpoint_seq  # signing again: the tail got its checkpoint


def test_a_request_never_waits_longer_than_the_write_timeout(tmp_path: Path) -> None:
    """A checkpoint signer that hangs holds the batch: the request gets 503 after the bound (not never),
    and health says the writer is stuck."""
    signer = FailingSigner()

    async def run() -> tuple[float, str, dict[str, Any]]:
        sink = AuditSink(tmp_path, signer=signer, checkpoint_every=1, write_timeout_seconds=0.5)
        await sink.start()
        signer.hang = True
        started = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            await sink.append({"type": "event"})
        took = time.monotonic() - started
        status = sink.status()
        await sink.close()
        return took, refused.value.detail, status

    took, detail, status = asyncio.run(run())

    assert 0.4 < took < 3
    assert "not on disk within 0.5 s" in detail
    assert status["ok"] is False
    assert "stuck on one batch" in status["error"]


def test_repeated_checkpoint_failures_stop_the_log_until_one_succeeds(tmp_path: Path) -> None:
    """Signing (HSM) or anchoring (Vault) failing N times in a row makes check_ready refuse with the
    reason; the next successful checkpoint lifts it."""
    signer = FailingSigner()
    anchors = MemoryAnchors()

    async def run() -> tuple[str, str, bool]:
        sink = AuditSink(
            tmp_path,
            signer=signer,
            anchors=anchors,
            checkpoint_every=1,
            checkpoint_seconds=0.05,
            checkpoint_max_failures=3,
        )
        await sink.start()
        signer.fail = Unavailable("hsm down", backend="hsm")
        for n in range(3):
            await sink.append({"type": "event", "n": n})
            await asyncio.sleep(0.06)
        with pytest.raises(Unavailable) as signing:
            sink.check_ready()
        signer.fail = None
        anchors.fail = Unavailable("vault sealed", backend="vault")
        await asyncio.sleep(0.3)  # checkpoints are retried once per interval, even with no new record
        with pytest.raises(Unavailable) as anchoring:
            sink.check_ready()
        anchors.fail = None
        await asyncio.sleep(0.3)
        await settle(sink)
        sink.check_ready()
        await sink.close()
        return signing.value.detail, anchoring.value.detail, True

    signing, anchoring, resumed = asyncio.run(run())

    assert re.search(r"\d+ checkpoints in a row could not be signed or anchored", signing)
    assert "hsm down" in signing
    assert "vault sealed" in anchoring
    assert resumed
    assert verify(files(tmp_path), signer.check(), anchor=Anchor(anchors.doc["seq"], anchors.doc["hash"])).ok  # type: ignore[index]


def _write(directory: Path, signer: SoftSigner, anchors: MemoryAnchors, n: int) -> None:
    async def run() -> None:
        sink = AuditSink(directory, signer=signer, anchors=anchors, checkpoint_every=2)
        await sink.start()
        for i in range(n):
            await sink.append({"type": "event", "n": i})
        await settle(sink)
        await sink.close()

    asyncio.run(run())


def test_a_wiped_log_with_an_anchor_refuses_until_a_named_epoch_is_started(tmp_path: Path) -> None:
    """No files but an anchor in Vault: nothing is written (no second chain at seq 1), the reason names the
    command; a new epoch writes its record (who, why, what it supersedes) and moves the anchor."""
    signer, anchors = SoftSigner(), MemoryAnchors()
    directory = tmp_path / "audit"
    _write(directory, signer, anchors, 6)
    old = dict(anchors.doc or {})
    shutil.rmtree(directory)

    async def run() -> tuple[str, str, dict[str, Any], int]:
        sink = AuditSink(directory, signer=signer, anchors=anchors, checkpoint_every=2)
        await sink.start()
        with pytest.raises(Unavailable) as refused:
            sink.check_ready()
        with pytest.raises(Unavailable) as not_written:
            await sink.append({"type": "event"})
        with pytest.raises(Conflict):
            await sink.begin_epoch(INITIAL_EPOCH, by="admin", reason="reuse")
        written = await sink.begin_epoch("restore-1", by="spiffe://x/user/admin", reason="disk lost")
        sink.check_ready()
        seq = await sink.append({"type": "event", "after": True})
        await settle(sink)
        await sink.close()
        return refused.value.detail, not_written.value.detail, written, seq

    detail, second, written, seq = asyncio.run(run())
    lines = [json.loads(x) for _, content in files(directory) for x in content.splitlines()]

    assert "holds no records" in detail
    assert f"names record {old['seq']}" in detail
    assert "keybroker audit new-epoch" in detail
    assert "holds no records" in second
    assert lines[0]["type"] == "epoch"
    assert (lines[0]["seq"], lines[0]["epoch"], lines[0]["by"], lines[0]["reason"]) == (
        1,
        "restore-1",
        "spiffe://x/user/admin",
        "disk lost",
    )
    assert lines[0]["supersedes"] == {"epoch": INITIAL_EPOCH, "seq": old["seq"], "hash": old["hash"]}
    assert written["epoch"] == "restore-1"
    assert [e["epoch"] for e in written["epochs"]] == ["restore-1"]
    assert seq == 2
    assert (anchors.doc or {})["epoch"] == "restore-1"


def test_a_truncated_or_replaced_log_is_refused_and_an_intact_one_continues(tmp_path: Path) -> None:
    """The local chain must hold the anchored record: cut short or rewritten, the log stays closed."""
    signer, anchors = SoftSigner(), MemoryAnchors()
    directory = tmp_path / "audit"
    _write(directory, signer, anchors, 6)
    _write(directory, signer, anchors, 2)  # an intact log restarts and continues
    first, last = sorted(directory.glob("audit-*.jsonl"))
    anchored = int((anchors.doc or {})["seq"])

    async def status() -> dict[str, Any]:
        sink = AuditSink(directory, signer=signer, anchors=anchors)
        await sink.start()
        report = sink.status()
        await sink.close()
        return report

    lines = last.read_bytes().splitlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line)["seq"] == anchored)
    forged = {**json.loads(lines[index]), "node": "elsewhere"}
    last.write_bytes(b"".join(x + b"\n" for x in [*lines[:index], canonical(forged), *lines[index + 1 :]]))
    replaced = asyncio.run(status())
    last.unlink()
    first.write_bytes(b"".join(line + b"\n" for line in first.read_bytes().splitlines()[:2]))
    truncated = asyncio.run(status())

    assert replaced["ok"] is False
    assert f"record {anchored} in {directory} is not the one anchored" in replaced["error"]
    assert truncated["ok"] is False
    assert "ends at record 2" in truncated["error"]
    assert verify(files(directory), signer.check()).ok  # the prefix alone looks fine: only the anchor tells


def test_the_anchor_never_moves_back(tmp_path: Path) -> None:
    """An anchor ahead of this writer (another writer, or a replayed directory) stops the log at once."""
    signer, anchors = SoftSigner(), MemoryAnchors()

    async def run() -> str:
        sink = AuditSink(tmp_path, signer=signer, anchors=anchors, checkpoint_every=1)
        await sink.start()
        await settle(sink)
        anchors.doc = {**(anchors.doc or {}), "seq": 10_000}
        await sink.append({"type": "event"})
        await settle(sink)
        try:
            sink.check_ready()
        except BrokerError as exc:
            return exc.detail
        finally:
            await sink.close()
        return ""

    detail = asyncio.run(run())

    assert "moved elsewhere" in detail
    assert (anchors.doc or {})["seq"] == 10_000


def test_context_hmacs_never_fail_on_surrogates() -> None:
    """A context value or key that is not valid Unicode still gets its own, stable HMAC."""
    from broker.audit.events import hmac_context, hmac_value

    key = b"k" * 32

    assert hmac_value(key, "\ud800") == hmac_value(key, "\ud800")
    assert hmac_value(key, "\ud800") != hmac_value(key, "\udfff")
    assert list(hmac_context(key, {"\ud800": "a\udfffb"})) == ["\ud800"]


def test_a_directory_that_cannot_be_opened_at_start_is_not_taken_for_a_wiped_one(tmp_path: Path) -> None:
    """Unopenable at start (its chain end unknown): refused with that reason, never "awaiting an epoch";
    once it can be opened the sink checks the anchor, writes its start record and serves."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    directory = blocker / "audit"

    async def run() -> tuple[dict[str, Any], bool, dict[str, Any]]:
        sink = AuditSink(directory, signer=SoftSigner(), anchors=MemoryAnchors(), checkpoint_seconds=0.1)
        await sink.start()
        during, awaiting = sink.status(), sink.awaiting_epoch
        blocker.unlink()
        blocker.mkdir()
        for _ in range(50):
            await asyncio.sleep(0.05)
            if sink.status()["ok"]:
                break
        after = sink.status()
        await sink.close()
        return during, awaiting, after

    during, awaiting, after = asyncio.run(run())

    assert during["ok"] is False
    assert "cannot open the audit directory" in during["error"]
    assert awaiting is False
    assert after["ok"] is True, after
    assert [json.loads(x)["type"] for _, c in files(directory) for x in c.splitlines()][:1] == ["start"]
