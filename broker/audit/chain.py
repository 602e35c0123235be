"""The audit log's hash chain and its verification: pure, no I/O.

Every line is one canonical JSON object (sorted keys, no spaces) carrying ``seq``
(1, 2, 3 ... across all files) and ``prev``, the SHA-256 of the previous line's
bytes. A ``checkpoint`` record also carries ``head`` (the hash of the record just
before it) and an ECDSA P-256 ``signature`` made inside the HSM over the SHA-256
of the checkpoint without its signature. So whoever holds the files but not the
HSM key can edit, delete, insert or reorder records only by breaking the chain
or a signature, and :func:`verify` names the first record where it breaks.

Truncating the end leaves a valid prefix; that is caught by comparing with an
anchor kept outside the files (the broker writes each checkpoint's seq and hash
to Vault) and, for the live log, with the broker's own head.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64
FILE_PREFIX, FILE_SUFFIX = "audit-", ".jsonl"


def canonical(record: Mapping[str, Any]) -> bytes:
    """The one byte form of a record: sorted keys, no spaces, UTF-8; it cannot fail on any str.

    A Python str may hold UTF-16 surrogates (``json.loads`` accepts ``"\\ud800"``), which
    UTF-8 cannot encode. Such strings are written, not dropped: surrogate pairs are joined
    into the character they spell, and a lone surrogate is written as its JSON escape
    (``\\ud800``). Reading the line back gives the same string, so a re-encoding for
    verification yields the same bytes.
    """
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        text = json.dumps(_scalar_strings(record), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        # Only lone surrogates remain unencodable; backslashreplace spells them \\udXXX, a JSON escape.
        return text.encode("utf-8", "backslashreplace")


def _scalar_strings(value: Any) -> Any:
    """``value`` with every surrogate pair in its strings (keys too) joined into one character."""
    if isinstance(value, str):
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if isinstance(value, Mapping):
        return {_scalar_strings(k): _scalar_strings(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scalar_strings(v) for v in value]
    return value


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def checkpoint_digest(checkpoint: Mapping[str, Any]) -> bytes:
    """What the HSM signs: SHA-256 of the checkpoint's canonical form without its signature."""
    body = {k: v for k, v in checkpoint.items() if k != "signature"}
    return hashlib.sha256(canonical(body)).digest()


def file_name(first_seq: int) -> str:
    """Files are named by their first record, so name order is chain order."""
    return f"{FILE_PREFIX}{first_seq:012d}{FILE_SUFFIX}"


@dataclass(frozen=True)
class Anchor:
    """A checkpoint's position as recorded outside the log (Vault)."""

    seq: int
    hash: str


@dataclass
class Problem:
    file: str
    line: int
    seq: int | None
    kind: str  # edited | deleted | inserted | reordered | truncated | malformed | bad-signature
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "seq": self.seq,
            "kind": self.kind,
            "detail": self.detail,
        }


@dataclass
class Report:
    ok: bool = True
    files: int = 0
    records: int = 0
    checkpoints: int = 0
    last_seq: int = 0
    head: str = GENESIS
    last_checkpoint_seq: int = 0
    first_problem: Problem | None = None
    problems: int = 0
    notes: list[str] = field(default_factory=list)
    # Why an intact-looking log is not proven complete (no key, no anchor, an unsigned tail).
    unverified: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """broken (a problem was found) | unverified (nothing found, but not proven) | intact."""
        if not self.ok:
            return "broken"
        return "unverified" if self.unverified else "intact"

    def fail(self, problem: Problem) -> None:
        self.ok = False
        self.problems += 1
        if self.first_problem is None:
            self.first_problem = problem

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "files": self.files,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "last_seq": self.last_seq,
            "head": self.head,
            "last_checkpoint_seq": self.last_checkpoint_seq,
            "problems": self.problems,
            "first_problem": self.first_problem.to_json() if self.first_problem else None,
            "notes": self.notes,
            "unverified": self.unverified,
            "verdict": self.verdict,
        }


# Verifies a checkpoint signature: (digest, raw r||s signature) -> valid?
SignatureCheck = Callable[[bytes, bytes], bool]
# A segment's content: its bytes, or a function that opens it afresh and yields its lines (each
# with its b"\n", the last one without when the file ends inside a record), so a log of any
# size is verified in constant memory.
Content = bytes | Callable[[], Iterable[bytes]]


def lines_of(content: Content) -> Iterator[bytes]:
    """The segment's lines as a file yields them (with their line ends)."""
    if isinstance(content, bytes):
        # Split on b"\n" only, as reading the file does (bytes.splitlines would also cut at b"\r").
        parts = content.split(b"\n")
        last = parts.pop()
        return iter([p + b"\n" for p in parts] + ([last] if last else []))
    return iter(content())


class SeqSet:
    """A set of record numbers kept as sorted disjoint ranges: a sound log (1, 2, 3 ...) costs one
    range however long it is; only damage (gaps, repeats) adds ranges."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []  # inclusive

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self._starts, seq) - 1
        return i >= 0 and seq <= self._ends[i]

    def add(self, seq: int) -> None:
        starts, ends = self._starts, self._ends
        if ends and ends[-1] + 1 == seq:  # the common case: the next record
            ends[-1] = seq
            return
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and seq <= ends[i]:
            return
        if i >= 0 and ends[i] + 1 == seq:
            ends[i] = seq
        else:
            i += 1
            starts.insert(i, seq)
            ends.insert(i, seq)
        if i + 1 < len(starts) and starts[i + 1] == ends[i] + 1:  # joins the next range
            ends[i] = ends.pop(i + 1)
            starts.pop(i + 1)

    @property
    def ranges(self) -> int:
        return len(self._starts)


def verify(
    files: Iterable[tuple[str, Content]],
    check_signature: SignatureCheck | None,
    *,
    anchor: Anchor | None = None,
    live_head: Anchor | None = None,
    writer_running: bool = False,
) -> Report:
    """Check the chain over ``files`` (name, content) in name order; name the first bad record.

    ``writer_running``: another process appends to this log right now (a sibling worker), so
    an unfinished last line of the last file is a record being written, not damage: it is
    left out (and said so) instead of reported as truncated.

    ``check_signature`` None skips signature checks. ``anchor``: the last checkpoint
    recorded in Vault; ``live_head``: the running broker's last written record. Either
    catches a truncated tail. What could not be checked makes the verdict
    ``unverified`` rather than ``intact``: no public key, no anchor (a wiped or
    truncated log cannot be told from a short one), or records after the last signed
    checkpoint that no live head vouches for.

    Lines are read one at a time and only what the checks need is kept (the numbers seen as
    ranges, the hashes of the anchored records), so memory stays flat however long the log.
    """
    report = Report()
    if check_signature is None:
        report.unverified.append("checkpoint signatures were not checked (no public key given)")
    prev_hash, prev_seq = GENESIS, 0
    prev_at = ("", 0)
    seen = SeqSet()
    marks = {m.seq for m in (anchor, live_head) if m is not None}
    marked: dict[int, str] = {}
    ordered = sorted(files, key=lambda f: f[0])
    present: SeqSet | None = None  # every number in the files: read only once a gap needs it
    for name, content in ordered:
        report.files += 1
        number = 0
        for raw in lines_of(content):
            number += 1
            if not raw.endswith(b"\n") and writer_running and name == ordered[-1][0]:
                report.notes.append(f"{name} line {number}: a record being written was left out")
                continue
            if not raw.endswith(b"\n"):
                report.fail(Problem(name, number, None, "truncated", "the file ends inside a record"))
            line = raw.rstrip(b"\n")
            try:
                record = json.loads(line)
                seq = int(record["seq"])
                claimed_prev = str(record["prev"])
            except (ValueError, KeyError, TypeError):
                report.fail(Problem(name, number, None, "malformed", "not an audit record (edited?)"))
                continue
            if canonical(record) != line:
                report.fail(
                    Problem(name, number, seq, "edited", "the line is not in canonical form (edited)")
                )
            if seq != prev_seq + 1:
                if present is None and seq > prev_seq + 1:
                    present = _all_seqs(ordered)
                kind, detail = _sequence_problem(seq, prev_seq, seen, present or SeqSet())
                report.fail(Problem(name, number, seq, kind, detail))
            elif claimed_prev != prev_hash:
                report.fail(
                    Problem(
                        prev_at[0],
                        prev_at[1],
                        prev_seq,
                        "edited",
                        f"record {prev_seq} was altered: its hash is not the one record {seq} chained to",
                    )
                )
            if record.get("type") == "checkpoint":
                report.checkpoints += 1
                _check_checkpoint(record, prev_hash, check_signature, report, name, number)
                report.last_checkpoint_seq = seq
            this_hash = line_hash(line)
            if seq in marks:
                marked[seq] = this_hash
            seen.add(seq)
            prev_hash, prev_seq, prev_at = this_hash, max(seq, prev_seq), (name, number)
            report.records += 1
    report.last_seq, report.head = prev_seq, prev_hash
    if anchor is None:
        report.unverified.append(
            "no anchor from Vault: a wiped, truncated or replaced log cannot be told from a short one"
        )
    if live_head is None and report.last_seq > report.last_checkpoint_seq:
        report.unverified.append(
            f"records {report.last_checkpoint_seq + 1}..{report.last_seq} come after the last signed "
            "checkpoint: nothing vouches for them"
        )
    for what, mark in (("anchored in Vault", anchor), ("written by the running broker", live_head)):
        if mark is None:
            continue
        if mark.seq > prev_seq:
            report.fail(
                Problem(
                    "",
                    0,
                    mark.seq,
                    "truncated",
                    f"record {mark.seq} was {what} but the log ends at record {prev_seq}",
                )
            )
        elif marked.get(mark.seq) != mark.hash:
            report.fail(Problem("", 0, mark.seq, "edited", f"record {mark.seq} differs from the one {what}"))
    return report


def _all_seqs(files: Iterable[tuple[str, Content]]) -> SeqSet:
    found = SeqSet()
    for _, content in files:
        for line in lines_of(content):
            try:
                found.add(int(json.loads(line)["seq"]))
            except (ValueError, KeyError, TypeError):
                continue
    return found


def _sequence_problem(seq: int, prev_seq: int, seen: SeqSet, present: SeqSet) -> tuple[str, str]:
    if seq > prev_seq + 1 and prev_seq + 1 in present and prev_seq + 1 not in seen:
        return "reordered", f"record {seq} comes before record {prev_seq + 1}"
    if seq > prev_seq + 1:
        missing = f"{prev_seq + 1}" if seq == prev_seq + 2 else f"{prev_seq + 1}..{seq - 1}"
        return "deleted", f"record(s) {missing} are missing"
    if seq in seen:
        return "inserted", f"record {seq} appears a second time (inserted or replayed)"
    return "reordered", f"record {seq} comes after record {prev_seq}"


def _check_checkpoint(
    record: Mapping[str, Any],
    prev_hash: str,
    check_signature: SignatureCheck | None,
    report: Report,
    name: str,
    number: int,
) -> None:
    seq = int(record["seq"])
    if record.get("head") != prev_hash:
        report.fail(Problem(name, number, seq, "edited", "the checkpoint's head is not the record before it"))
    if check_signature is None:
        return
    try:
        signature = base64.b64decode(str(record["signature"]), validate=True)
    except (KeyError, ValueError):
        report.fail(
            Problem(name, number, seq, "bad-signature", "the checkpoint carries no readable signature")
        )
        return
    if not check_signature(checkpoint_digest(record), signature):
        report.fail(Problem(name, number, seq, "bad-signature", "the HSM signature does not verify"))
