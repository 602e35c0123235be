"""``keybroker serve --workers N``: N broker processes on one port, under a supervising parent.

Python serves one core per process; several processes share the port through
``SO_REUSEPORT`` (the kernel spreads new connections over their listening sockets).
The parent serves nothing: it starts the workers, restarts one that dies (a crash, an
OOM kill, ``kill -9``) and, on SIGTERM or SIGINT, stops them all, each draining its
requests and flushing its audit log as a single broker does.

Each worker is a writer of its own: its audit log is the sub-directory ``worker-<i>`` of
``audit.directory`` and its node name ``<audit.node>-w<i>`` (so its own checkpoint key in
the HSM and its own anchor in Vault), as the design allows one hash chain per writer. A
restarted worker continues its chain; a record cut off by the kill is noted at its start.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from broker._proc import die_with_parent
from broker.config.model import Config
from broker.log import get_logger

log = get_logger(__name__)

MAX_WORKERS = 64
# A worker that dies this many times within RESTART_WINDOW seconds is not restarted again:
# a broker that cannot stay up (bad config, lost HSM) must fail loudly, not flap forever.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
STOP_TIMEOUT = 20.0
# Tells a restarted worker why it starts again; it notes this at the head of its chain.
RESTART_NOTE_ENV = "KEYBROKER_WORKER_RESTARTED"


def worker_dir_name(index: int) -> str:
    return f"worker-{index}"


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index``'s config: its own audit directory and node name (one chain per writer)."""
    audit = dataclasses.replace(
        config.audit,
        directory=config.audit.directory / worker_dir_name(index),
        node=f"{config.audit.node}-w{index}",
    )
    return dataclasses.replace(config, audit=audit)


def parse_worker(value: str) -> tuple[int, int]:
    """``I/N`` (the hidden ``--worker`` argument the parent passes) as (index, count)."""
    index, _, count = value.partition("/")
    # ASCII digits only: str.isdigit() also takes other scripts' digits, which int() reads.
    digits = index.isascii() and index.isdigit() and count.isascii() and count.isdigit()
    if not (digits and 0 <= int(index) < int(count) <= MAX_WORKERS):
        raise ValueError(f"--worker takes I/N with 0 <= I < N <= {MAX_WORKERS}")
    return int(index), int(count)


class Supervisor:
    """Starts ``count`` workers, restarts any that exits while not stopping, stops all on a signal."""

    def __init__(self, count: int, command: Callable[[int], list[str]]) -> None:
        self.count = count
        self._command = command
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._deaths: dict[int, deque[float]] = {i: deque() for i in range(count)}
        self._stopping = False

    def _start(self, index: int, note: str | None = None) -> None:
        env = dict(os.environ)
        env.pop(RESTART_NOTE_ENV, None)
        if note:
            env[RESTART_NOTE_ENV] = note
        proc = subprocess.Popen(self._command(index), env=env, preexec_fn=die_with_parent)
        self._procs[index] = proc
        log.info("worker_started", worker=index, pid=proc.pid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def run(self, poll: float = 0.2) -> int:
        """Serve until SIGTERM/SIGINT (0) or until a worker keeps dying (1)."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        for index in range(self.count):
            self._start(index)
        status = 0
        try:
            while not self._stopping:
                time.sleep(poll)
                for index, proc in list(self._procs.items()):
                    code = proc.poll()
                    if code is None or self._stopping:
                        continue
                    if not self._may_restart(index):
                        log.error("worker_keeps_dying", worker=index, exit_code=code, restarts=MAX_RESTARTS)
                        status = 1
                        self._stopping = True
                        break
                    log.warning("worker_died", worker=index, pid=proc.pid, exit_code=code)
                    previous_end = f"the previous process of this worker (pid {proc.pid})"
                    if code == 0:
                        # Stopped cleanly (a SIGTERM from someone else): its log was flushed and closed.
                        note = f"restarted by its supervisor: {previous_end} stopped cleanly"
                    else:
                        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
                        note = (
                            f"restarted by its supervisor: {previous_end} {how} without a clean stop; "
                            "records it had not yet written are not in the log"
                        )
                    self._start(index, note)
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return status

    def _may_restart(self, index: int) -> bool:
        now = time.monotonic()
        deaths = self._deaths[index]
        deaths.append(now)
        while deaths and now - deaths[0] > RESTART_WINDOW:
            deaths.popleft()
        return len(deaths) <= MAX_RESTARTS

    def stop(self) -> None:
        """SIGTERM every worker (each drains and flushes its audit log), then SIGKILL stragglers."""
        alive = [p for p in self._procs.values() if p.poll() is None]
        for proc in alive:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in alive:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker_stop_timeout", pid=proc.pid)  # noqa: TRY400 - a timeout, no traceback
                proc.kill()
                proc.wait()


def run_workers(config_file: Path, count: int) -> int:
    """The parent of ``keybroker serve --workers N``: each worker is ``serve --worker I/N``."""

    def command(index: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "broker",
            "serve",
            "--config",
            str(config_file),
            "--worker",
            f"{index}/{count}",
        ]

    log.info("supervisor_starting", workers=count, pid=os.getpid())
    return Supervisor(count, command).run()
