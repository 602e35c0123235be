"""Child processes of the dev stack: started with their output in a log file, stopped for sure.

Each child asks the kernel (``PR_SET_PDEATHSIG``) to send it SIGTERM if its parent
dies, so even a ``kill -9`` of ``keybroker dev`` leaves no orphan behind; a
normal stop sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker._proc import die_with_parent


class ChildFailed(RuntimeError):
    """A child exited or never became ready; the message carries the tail of its log."""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            # Own process group: the terminal's Ctrl-C reaches only the supervisor,
            # which then stops children in order (broker, Vault, KMS).
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    return Child(name=name, process=process, log_path=log_path)


def wait_until(
    child: Child, ready: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll ``ready`` until it is true; fail early if the child exits, or after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise ChildFailed(
                f"{child.name} exited (status {child.process.returncode}) before {what}.\n"
                f"Last lines of {child.log_path}:\n{child.log_tail()}"
            )
        if ready():
            return
        if time.monotonic() > deadline:
            raise ChildFailed(
                f"{child.name} did not reach '{what}' within {timeout:g}s.\n"
                f"Last lines of {child.log_path}:\n{child.log_tail()}"
            )
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
