#!/usr/bin/env python3
"""Give each ``name==version`` line of a pip lock file the SHA-256 of every file PyPI has for it.

The Dockerfile installs the locks with ``pip --require-hashes``, so every line needs a hash for
each distribution file pip may pick on any platform the image is built for: all wheels and the
sdist of that exact version, as PyPI's JSON API lists them. Regenerate after changing a version::

    python deploy/lock_hashes.py deploy/requirements.lock      # rewrites the file in place
    python deploy/lock_hashes.py --check deploy/*.lock         # offline: every line pinned and hashed

Standard library only, so it runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PYPI = "https://pypi.org/pypi"
# A requirement line of a lock: exactly one name, exactly one version, no extras or markers
# (a marker would make the lock differ by platform, which these images must not).
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)$")
HASH = re.compile(r"^--hash=sha256:(?P<digest>[0-9a-f]{64})$")
TIMEOUT = 60.0


class LockError(Exception):
    """A lock file that is not all ``name==version`` lines with hashes, or a failed lookup."""


@dataclass
class Entry:
    """One logical line of a lock file: a comment/blank line kept as is, or a pinned requirement."""

    lineno: int
    text: str = ""
    name: str = ""
    version: str = ""
    hashes: list[str] = field(default_factory=list)

    @property
    def is_requirement(self) -> bool:
        return bool(self.name)


def canonical(name: str) -> str:
    """PEP 503 normalised name: the form pip compares names in."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse(text: str, source: str) -> list[Entry]:
    """The logical lines of a lock (backslash continuations joined); LockError on anything else."""
    entries: list[Entry] = []
    physical = text.splitlines()
    i = 0
    while i < len(physical):
        start = i
        line = physical[i]
        while line.rstrip().endswith("\\") and i + 1 < len(physical):
            i += 1
            line = line.rstrip()[:-1] + " " + physical[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            entries.append(Entry(lineno=start + 1, text=physical[start]))
            continue
        words = stripped.split()
        pin = PIN.match(words[0])
        if pin is None:
            raise LockError(f"{source}:{start + 1}: {words[0]!r} is not pinned as name==version")
        entry = Entry(lineno=start + 1, name=pin.group("name"), version=pin.group("version"))
        for word in words[1:]:
            digest = HASH.match(word)
            if digest is None:
                raise LockError(f"{source}:{start + 1}: {word!r} is not a --hash=sha256:<hex> option")
            entry.hashes.append(digest.group("digest"))
        entries.append(entry)
    return entries


def check(entries: list[Entry], source: str) -> list[str]:
    """The problems with a parsed lock: missing hashes, duplicate names, no requirement at all."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    for entry in entries:
        if not entry.is_requirement:
            continue
        key = canonical(entry.name)
        if key in seen:
            problems.append(f"{source}:{entry.lineno}: {entry.name} is pinned twice (line {seen[key]})")
        seen[key] = entry.lineno
        if not entry.hashes:
            problems.append(f"{source}:{entry.lineno}: {entry.name}=={entry.version} has no --hash")
        if len(set(entry.hashes)) != len(entry.hashes):
            problems.append(f"{source}:{entry.lineno}: {entry.name} lists a hash twice")
    if not seen:
        problems.append(f"{source}: no requirement lines")
    return problems


def _get_json(url: str) -> dict[str, object]:
    # main() accepts only an https base URL, so no file: or custom scheme reaches these two.
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
        loaded = json.load(response)
    if not isinstance(loaded, dict):
        raise LockError(f"{url}: not a JSON object")
    return loaded


def release_files(name: str, version: str, pypi: str = PYPI) -> list[dict[str, object]]:
    """PyPI's file records (``filename``, ``digests``) for one exact version.

    The per-version endpoint is asked first; some mirrors serve only the per-project one, whose
    ``releases`` map has the same records, so that is the fallback.
    """
    quoted = urllib.parse.quote(name, safe="")
    try:
        files = _get_json(f"{pypi}/{quoted}/{urllib.parse.quote(version, safe='')}/json").get("urls")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise LockError(f"{name}=={version}: PyPI answered {exc.code}") from exc
        releases = _get_json(f"{pypi}/{quoted}/json").get("releases")
        if not isinstance(releases, dict) or version not in releases:
            raise LockError(f"{name}=={version}: PyPI has no such version") from exc
        files = releases[version]
    if not isinstance(files, list) or not files:
        raise LockError(f"{name}=={version}: PyPI lists no files for it")
    return [f for f in files if isinstance(f, dict)]


def hashes_for(name: str, version: str, pypi: str = PYPI) -> list[str]:
    """Sorted SHA-256 digests of every file (each wheel and the sdist) of ``name==version``."""
    digests: set[str] = set()
    for record in release_files(name, version, pypi):
        recorded = record.get("digests")
        digest = recorded.get("sha256") if isinstance(recorded, dict) else None
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise LockError(f"{name}=={version}: {record.get('filename')!r} has no sha256 digest")
        digests.add(digest)
    return sorted(digests)


def render(entries: list[Entry]) -> str:
    """The lock text: comments as they were, each requirement followed by one hash per line."""
    out: list[str] = []
    for entry in entries:
        if not entry.is_requirement:
            out.append(entry.text)
            continue
        out.append(f"{entry.name}=={entry.version}" + (" \\" if entry.hashes else ""))
        for n, digest in enumerate(entry.hashes):
            out.append(f"    --hash=sha256:{digest}" + (" \\" if n + 1 < len(entry.hashes) else ""))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Add to every name==version line of pip lock files the --hash=sha256 of each "
        "file PyPI publishes for that version (all wheels and the sdist), or check that they have them.",
    )
    parser.add_argument("locks", nargs="+", type=Path, metavar="LOCK", help="lock files to update or check")
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing and ask no server: exit 1 unless every line is name==version with a hash",
    )
    parser.add_argument("--pypi", default=PYPI, help=f"PyPI JSON API base URL (default {PYPI})")
    args = parser.parse_args(argv)
    if not args.check and urllib.parse.urlsplit(args.pypi).scheme != "https":
        parser.error("--pypi must be an https URL: the hashes are only as good as the channel")
    problems: list[str] = []
    for lock in args.locks:
        try:
            entries = parse(lock.read_text(encoding="utf-8"), str(lock))
            if args.check:
                problems += check(entries, str(lock))
                continue
            for entry in entries:
                if entry.is_requirement:
                    entry.hashes = hashes_for(entry.name, entry.version, args.pypi.rstrip("/"))
            found = check(entries, str(lock))
            if found:
                problems += found
                continue
            lock.write_text(render(entries), encoding="utf-8")
            count = sum(e.is_requirement for e in entries)
            print(f"{lock}: {count} requirements, {sum(len(e.hashes) for e in entries)} hashes")
        except (OSError, LockError, urllib.error.URLError, ValueError) as exc:
            problems.append(f"{lock}: {exc}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
