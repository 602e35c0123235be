"""The audit chain and sink on a real filesystem, signed with a software P-256 key standing in for the HSM.

(The real HSM signs in the integration tests; here the chain logic is under test.)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from broker.audit.chain import Anchor, canonical, verify
from broker.audit.signing import load_public_key, signature_checker
from broker.audit.sink import AuditSink
from broker.errors import Unavailable


class SoftSigner:
    """Signs like the HSM does (raw r||s over a SHA-256 digest), with a key in memory."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())

    async def sign_digest(self, digest: bytes) -> bytes:
        r, s = decode_dss_signature(self.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    async def public_key_der(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def check(self) -> Any:
        return signature_checker(load_public_key(asyncio.run(self.public_key_der())))


def write_log(directory: Path, signer: SoftSigner, records: int, **sink_args: Any) -> AuditSink:
    """Start a sink, append ``records`` events concurrently (group commit), stop it."""

    async def run() -> AuditSink:
        sink = AuditSink(directory, signer=signer, checkpoint_every=5, **sink_args)
        await sink.start()
        for wave in range(0, records, 5):  # waves of concurrent requests: several group commits
            await asyncio.gather(
                *(sink.append({"type": "event", "n": i}) for i in range(wave, min(records, wave + 5)))
            )
        await sink.close()
        return sink

    return asyncio.run(run())


def files(directory: Path) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted(directory.glob("audit-*.jsonl"))]


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, SoftSigner]:
    signer = SoftSigner()
    write_log(tmp_path, signer, 20)
    return tmp_path, signer


def lines_of(directory: Path) -> tuple[Path, list[bytes]]:
    path = sorted(directory.glob("audit-*.jsonl"))[0]
    return path, path.read_bytes().splitlines()


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_a_valid_log_verifies_with_its_checkpoints(log: tuple[Path, SoftSigner]) -> None:
    """21 records (start + 20), checkpoints every 5, every signature good."""
    directory, signer = log

    report = verify(files(directory), signer.check())

    assert (report.ok, report.records - report.checkpoints, report.problems) == (True, 21, 0)
    assert report.checkpoints >= 4


def _first(directory: Path, signer: SoftSigner, **kw: Any) -> tuple[str, int | None, int]:
    report = verify(files(directory), signer.check(), **kw)
    assert not report.ok
    assert report.first_problem is not None
    return report.first_problem.kind, report.first_problem.seq, report.first_problem.line


def test_an_edited_record_is_named(log: tuple[Path, SoftSigner]) -> None:
    """Change one field of record 3 (kept canonical): the chain breaks at 4 and names 3."""
    directory, signer = log
    path, lines = lines_of(directory)
    record = json.loads(lines[2])
    record["n"] = 999
    lines[2] = canonical(record)
    rewrite(path, lines)

    assert _first(directory, signer) == ("edited", 3, 3)


def test_a_deleted_record_is_named(log: tuple[Path, SoftSigner]) -> None:
    directory, signer = log
    path, lines = lines_of(directory)
    del lines[9]
    rewrite(path, lines)

    assert _first(directory, signer)[:2] == ("deleted", 11)


def test_an_inserted_record_is_named(log: tuple[Path, SoftSigner]) -> None:
    """A copy of record 4 slipped in after record 9."""
    directory, signer = log
    path, lines = lines_of(directory)
    lines.insert(9, lines[3])
    rewrite(path, lines)

    assert _first(directory, signer) == ("inserted", 4, 10)


def test_reordered_records_are_named(log: tuple[Path, SoftSigner]) -> None:
    directory, signer = log
    path, lines = lines_of(directory)
    lines[11], lines[12] = lines[12], lines[11]
    rewrite(path, lines)

    assert _first(directory, signer) == ("reordered", 13, 12)


def test_a_truncated_log_is_caught_by_the_anchor(log: tuple[Path, SoftSigner]) -> None:
    """Cutting the tail leaves a valid prefix: the Vault anchor (or the live head) still catches it."""
    directory, signer = log
    intact = verify(files(directory), signer.check())
    path, lines = lines_of(directory)
    rewrite(path, lines[:-6])
    anchor = Anchor(intact.last_seq, intact.head)

    kind, seq, _ = _first(directory, signer, anchor=anchor)

    assert (kind, seq) == ("truncated", intact.last_seq)


def test_a_resigned_checkpoint_without_the_hsm_key_is_caught(log: tuple[Path, SoftSigner]) -> None:
    """An attacker rewrites history and re-signs with their own key: the signature does not verify."""
    directory, signer = log
    forger = SoftSigner()
    path, lines = lines_of(directory)
    for i, line in enumerate(lines):
        record = json.loads(line)
        if record.get("type") == "checkpoint":
            from broker.audit.chain import checkpoint_digest

            record["signature"] = (
                __import__("base64")
                .b64encode(asyncio.run(forger.sign_digest(checkpoint_digest(record))))
                .decode()
            )
            lines[i] = canonical(record)
            break
    rewrite(path, lines)

    assert _first(directory, signer)[0] in ("bad-signature", "edited")


def test_rotated_files_verify_as_one_chain(tmp_path: Path) -> None:
    """A tiny size limit rotates after every batch; the chain runs on across files."""
    signer = SoftSigner()

    async def run() -> None:
        sink = AuditSink(tmp_path, signer=signer, checkpoint_every=4, max_file_bytes=300)
        await sink.start()
        for i in range(12):
            await sink.append({"type": "event", "n": i})
        await sink.close()

    asyncio.run(run())
    report = verify(files(tmp_path), signer.check())

    assert report.files >= 4
    assert (report.ok, report.records - report.checkpoints) == (True, 13)


def test_files_also_rotate_by_age(tmp_path: Path) -> None:
    """max_file_seconds: each batch after the file's time is up opens a new file; one chain throughout."""
    signer = SoftSigner()

    async def run() -> None:
        sink = AuditSink(tmp_path, signer=signer, checkpoint_every=100, max_file_seconds=0.05)
        await sink.start()
        for i in range(3):
            await asyncio.sleep(0.06)
            await sink.append({"type": "event", "n": i})
        await sink.close()

    asyncio.run(run())
    report = verify(files(tmp_path), signer.check())

    assert (report.ok, report.files) == (True, 4)


def test_a_restart_continues_the_chain_and_cuts_an_unfinished_record(tmp_path: Path) -> None:
    """A crash mid-write leaves half a line: the next start cuts it, says so, and chains on."""
    signer = SoftSigner()
    write_log(tmp_path, signer, 3)
    path = sorted(tmp_path.glob("audit-*.jsonl"))[-1]
    with path.open("ab") as fh:
        fh.write(b'{"half":')
    write_log(tmp_path, signer, 3)

    report = verify(files(tmp_path), signer.check())
    notes = [json.loads(line) for _, content in files(tmp_path) for line in content.splitlines()]

    assert report.ok
    assert any(r.get("type") == "resume" and "discarded 8 bytes" in r.get("note", "") for r in notes)


def test_group_commit_writes_concurrent_records_in_few_fsyncs(tmp_path: Path) -> None:
    """200 concurrent appends: every one gets its own seq, in far fewer write+fsync batches."""
    signer = SoftSigner()
    sink = write_log(tmp_path, signer, 200)

    report = verify(files(tmp_path), signer.check())

    assert report.ok
    assert sink.records_written >= 201
    assert sink.batches_written < 50


def test_an_immutable_log_refuses_then_resumes(tmp_path: Path) -> None:
    """chattr +i (even root cannot write): check_ready refuses; after -i, writing resumes in a new file."""

    async def run() -> tuple[str, bool]:
        sink = AuditSink(tmp_path, signer=SoftSigner(), checkpoint_every=100)
        await sink.start()
        await sink.append({"type": "event", "n": 1})
        active = sorted(tmp_path.glob("audit-*.jsonl"))[-1]  # noqa: ASYNC240 - a test, stepping file state
        subprocess.run(["chattr", "+i", str(active)], check=True)  # noqa: ASYNC221
        try:
            with pytest.raises(Unavailable) as refused:
                sink.check_ready()
        finally:
            subprocess.run(["chattr", "-i", str(active)], check=True)  # noqa: ASYNC221
        await asyncio.sleep(0.6)
        sink.check_ready()
        await sink.append({"type": "event", "n": 2})
        await sink.close()
        return refused.value.detail, True

    detail, resumed = asyncio.run(run())

    assert "audit log unavailable: Operation not permitted" in detail
    assert resumed
    assert len(files(tmp_path)) == 2
    assert verify(files(tmp_path), None).ok


def test_a_removed_active_file_is_never_written_to_again(tmp_path: Path) -> None:
    """Records never go into an unlinked inode: the removal is refused, then a new file goes on."""

    async def run() -> None:
        sink = AuditSink(tmp_path, signer=SoftSigner(), checkpoint_every=100)
        await sink.start()
        await sink.append({"type": "event", "n": 1})
        os.unlink(sorted(tmp_path.glob("audit-*.jsonl"))[-1])  # noqa: ASYNC240 - a test, stepping file state
        with pytest.raises(Unavailable, match="No such file"):
            sink.check_ready()
        await asyncio.sleep(0.6)
        sink.check_ready()
        await sink.append({"type": "event", "n": 2})
        await sink.close()

    asyncio.run(run())
    remaining = files(tmp_path)
    report = verify(remaining, None)

    assert len(remaining) == 1
    assert b'"n":2' in remaining[0][1]
    assert (report.ok, report.first_problem.kind if report.first_problem else None) == (False, "deleted")


def test_a_second_writer_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    """One chain per writer: the second sink on a directory fails at start, naming the fix."""
    from broker.errors import ConfigError

    async def run() -> None:
        first = AuditSink(tmp_path, signer=SoftSigner())
        await first.start()
        try:
            with pytest.raises(ConfigError, match=r"give each replica its own audit\.directory"):
                await AuditSink(tmp_path, signer=SoftSigner()).start()
        finally:
            await first.close()

    asyncio.run(run())
