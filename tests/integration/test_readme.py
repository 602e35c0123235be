"""Every shell block of README.md runs as written, in order, in one shell, against a fresh dev stack.

The blocks run from a directory laid out like the repository root (``.keybroker/dev`` is the
stack's state, ``config`` the repository's), with a PATH that knows nothing of the
virtualenv: sourcing the env file, as the README says, must be enough. A block is skipped
only when an HTML comment ``<!-- readme-test: skip (why) -->`` stands right before it, and
only a block of ``make`` commands may be skipped (the ones that start servers or the suite).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from broker.devstack.stack import DevStack, free_port

REPO = Path(__file__).parents[2]
SKIP = re.compile(r"^<!-- readme-test: skip \((?P<why>[^)]+)\) -->$")


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    text: str
    skip: str | None  # why, when marked


def shell_blocks(readme: str) -> list[Block]:
    """The ```sh blocks, each with its line and the skip reason written right before it."""
    lines = readme.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            end = lines.index("```", i + 1)
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marked = SKIP.fullmatch(before)
            blocks.append(
                Block(i + 1, "\n".join(lines[i + 1 : end]), marked.group("why") if marked else None)
            )
            i = end
        i += 1
    return blocks


def script(blocks: list[Block]) -> str:
    """One bash script: stop at the first failing command, saying which README block it was in."""
    parts = ["set -euo pipefail"]
    for block in blocks:
        parts.append(f'echo "::readme block at line {block.line}" >&2')
        parts.append(block.text)
    return "\n".join(parts) + "\n"


def _may_skip(block: Block) -> bool:
    """Blocks a test cannot run: `make` (servers, the suite, benchmarks) or a service on another host."""
    commands = [c for c in block.text.splitlines() if c.strip() and not c.lstrip().startswith("#")]
    only_make = all(c.startswith("make ") for c in commands)
    elsewhere = re.search(r"https?://(?!127\.0\.0\.1|localhost|\[::1\])", block.text) is not None
    return only_make or elsewhere


def test_only_blocks_a_test_cannot_run_are_skipped_and_each_skip_says_why() -> None:
    """A skip marker stands right before its block, says why, and only on make or another host's service."""
    blocks = shell_blocks((REPO / "README.md").read_text())
    skipped = [b for b in blocks if b.skip is not None]
    markers = [line for line in (REPO / "README.md").read_text().splitlines() if "readme-test" in line]

    assert len(blocks) - len(skipped) >= 8
    assert len(markers) == len(skipped), "a readme-test marker that is not right before a ```sh block"
    for block in skipped:
        assert _may_skip(block), f"README line {block.line}: this block can run in the test; run it"


def test_every_readme_command_runs_as_written(tmp_path: Path) -> None:
    """The README's blocks, in order, against `keybroker dev`'s stack: each command exits 0."""
    blocks = [b for b in shell_blocks((REPO / "README.md").read_text()) if b.skip is None]
    stack = DevStack(tmp_path / "state", broker_port=free_port())
    stack.start()
    try:
        work = tmp_path / "repo"
        (work / ".keybroker").mkdir(parents=True)
        (work / ".keybroker" / "dev").symlink_to(stack.layout.root)
        (work / "config").symlink_to(REPO / "config")
        env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            # The code under test (a worktree's, in development) — not a setting the README relies on.
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}),
        }
        started = time.monotonic()
        ran = subprocess.run(
            ["bash", "-c", script(blocks)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        seconds = time.monotonic() - started
    finally:
        stack.stop()

    where = [line for line in ran.stderr.splitlines() if line.startswith("::readme block")]
    assert ran.returncode == 0, f"failed in {where[-1] if where else '?'}:\n{ran.stderr[-3000:]}"
    assert len(where) == len(blocks)
    out = ran.stdout
    assert "broker https://127.0.0.1:" in out  # keybroker health
    assert "valid: signed by key releases" in out
    assert "ALLOW  allowed by rule developer/crypto-dev-staging" in out
    assert out.count("card 4111") >= 2  # decrypted by the admin, then by the grantee (no newline after)
    assert re.search(r"card 4111retired g-[0-9a-f]{20}\n", out)  # the grantee's decrypt, then its retire
    assert "audit log intact" in out
    assert (work / "dana.key").stat().st_mode & 0o777 == 0o600
    assert (work / "report.html").read_text().startswith("<!doctype html>")
    assert seconds < 120, f"the README's commands took {seconds:.0f} s"
