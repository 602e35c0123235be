"""The compiled load generator (bench/loadgen, Go standard library only): build it and run one cell.

``make bench`` installs the distribution's Go toolchain (``scripts/setup.sh --with-bench``);
the binary is built into ``bench/.build/`` (ignored by git) with the local toolchain only
and no module downloads, so the build needs no network. HTTP cells (the broker, direct
Vault) use it: a Go client keeps far more requests in flight per CPU second than the
Python one, so a slow cell is the server's, and the run shows the generator's CPU share.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).parent / "loadgen"
BUILD = Path(__file__).parent / ".build"
BINARY = BUILD / "loadgen"


class GeneratorMissing(RuntimeError):
    """Go is not installed, or the build failed."""


def build() -> Path:
    """Build the generator if its source is newer than the binary; the binary's path."""
    sources = [SOURCE / "main.go", SOURCE / "go.mod"]
    if BINARY.exists() and all(BINARY.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return BINARY
    go = shutil.which("go")
    if go is None:
        raise GeneratorMissing("Go is not installed: run `scripts/setup.sh --with-bench` (make bench does)")
    BUILD.mkdir(exist_ok=True)
    env = {
        **os.environ,
        # The distribution's toolchain, no module proxy: the generator has no dependencies.
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
        "GOCACHE": str(BUILD / "gocache"),
        "GOPATH": str(BUILD / "gopath"),
    }
    done = subprocess.run(
        [go, "build", "-trimpath", "-o", str(BINARY), "."],
        cwd=SOURCE,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise GeneratorMissing(f"go build failed: {done.stderr.strip()}")
    return BINARY


@dataclass(frozen=True)
class HttpCell:
    """One HTTP endpoint to load, and how to check its answers."""

    url: str
    body: bytes
    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    field: str = ""  # dotted JSON path of the answer field to check
    prefix: str = ""
    equals: str = ""


def run(cell: HttpCell, concurrency: int, warmup: float, duration: float) -> dict[str, Any]:
    """Run the generator once; its JSON report (rps, p50/p90/p99/max ms, errors, cpu_seconds)."""
    binary = build()
    with (
        tempfile.NamedTemporaryFile(prefix="kb-loadgen-", suffix=".json") as body,
        tempfile.NamedTemporaryFile(prefix="kb-loadgen-", suffix=".headers", mode="w") as headers,
    ):
        body.write(cell.body)
        body.flush()
        # In a private file, not on the command line: a Vault token would show in ps.
        headers.write("".join(f"{name}:{value}\n" for name, value in cell.headers))
        headers.flush()
        argv = [
            str(binary),
            f"-url={cell.url}",
            f"-body={body.name}",
            f"-ca={cell.ca_file}",
            f"-c={concurrency}",
            f"-t={duration}s",
            f"-warmup={warmup}s",
            f"-headers={headers.name}",
        ]
        if cell.cert_file:
            argv += [f"-cert={cell.cert_file}", f"-key={cell.key_file}"]
        if cell.field:
            argv.append(f"-field={cell.field}")
        if cell.prefix:
            argv.append(f"-prefix={cell.prefix}")
        if cell.equals:
            argv.append(f"-equals={cell.equals}")
        done = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=warmup + duration + 120
        )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report
