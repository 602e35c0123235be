"""`keybroker dev`, the README's run command, as a person uses it."""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from broker.devstack.processes import pid_alive
from broker.devstack.stack import free_port

READY_LINE = "Ctrl-C stops everything"


class DevProcess:
    """`keybroker dev` in a subprocess, its output collected line by line."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "dev", "--state-dir", str(state_dir), "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_ready(self, timeout: float = 90) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if READY_LINE in line:
                return time.monotonic() - started
        raise AssertionError("keybroker dev did not become ready:\n" + "".join(self.output))

    def stop(self, sig: int, timeout: float = 60) -> int:
        """Signal the supervisor, wait for it, and close its output pipe."""
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._pump_thread.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def descendants(self) -> set[int]:
        """PIDs of every process below the supervisor, from /proc."""
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as fh:
                        parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        found: set[int] = set()
        frontier = {self.proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
            found |= frontier
        return found

    def curl_from_banner(self) -> list[str]:
        text = "".join(self.output)
        match = re.search(r"(curl --cacert .*?)\n\s*(https://\S+)", text.replace("\\\n", "\n"))
        assert match, text
        return [*shlex.split(match.group(1)), match.group(2)]


def wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = {pid for pid in pids if pid_alive(pid)}
        if not alive:
            return alive
        time.sleep(0.1)
    return {pid for pid in pids if pid_alive(pid)}


def health_via_banner(argv: list[str]) -> dict[str, object]:
    """Run the printed curl (with curl when installed) and return the JSON it got."""
    if shutil.which("curl"):
        done = subprocess.run(
            [*argv, "--silent", "--fail"], capture_output=True, text=True, timeout=30, check=True
        )
        return dict(json.loads(done.stdout))
    import urllib.request

    from broker.config.tls import client_ssl_context

    opts = dict(zip(argv[1:-1:2], argv[2:-1:2], strict=True))
    ctx = client_ssl_context(Path(opts["--cacert"]), Path(opts["--cert"]), Path(opts["--key"]))
    with urllib.request.urlopen(argv[-1], context=ctx, timeout=15) as resp:
        return dict(json.load(resp))


def readme_cli_after_sourcing(env_file: Path) -> subprocess.CompletedProcess[str]:
    """The README's next step, in a shell whose PATH knows nothing of the virtualenv."""
    return subprocess.run(
        ["bash", "-c", f". {shlex.quote(str(env_file))} && keybroker health --json"],
        env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dev_runs_resumes_unsealed_and_leaves_no_orphans(tmp_path: Path) -> None:
    """Start, curl the printed command, Ctrl-C-like stop, resume sealed-free, survive a kill -9."""
    state, port = tmp_path / "dev", free_port()

    first = DevProcess(state, port)
    startup = first.wait_ready()
    health = health_via_banner(first.curl_from_banner())
    from_env_file = readme_cli_after_sourcing(state / "env")
    children = first.descendants()
    first_exit = first.stop(signal.SIGINT)
    orphans_after_stop = wait_gone(children, 15)

    second = DevProcess(state, port)
    resume = second.wait_ready()
    resumed = health_via_banner(second.curl_from_banner())
    children = second.descendants()
    second.stop(signal.SIGKILL)  # no chance to clean up: the kernel must take the children down
    orphans_after_kill = wait_gone(children, 20)

    vault = health["vault"]
    assert isinstance(vault, dict)
    assert (health["status"], vault["seal_type"], vault["sealed"]) == ("ok", "awskms", False)
    assert startup < 60
    assert first_exit == 0
    assert len(children) >= 3
    assert orphans_after_stop == set()
    assert "Vault bootstrap" in "".join(second.output)
    assert "initialising Vault" not in "".join(second.output)  # resumed, not re-initialised
    assert resumed["status"] == "ok"
    assert from_env_file.returncode == 0, from_env_file.stderr
    assert json.loads(from_env_file.stdout)["status"] == "ok"
    assert resume < 60
    assert orphans_after_kill == set()


def test_dev_refuses_a_second_run_on_the_same_state(tmp_path: Path) -> None:
    """Two stacks on one state directory would corrupt it: the second refuses clearly."""
    state = tmp_path / "dev"
    first = DevProcess(state, free_port())
    first.wait_ready()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "broker", "dev", "--state-dir", str(state), "--port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        first.stop(signal.SIGTERM)

    assert second.returncode == 1
    assert "another keybroker dev is already running" in second.stderr
    assert "Traceback" not in second.stderr


def test_dev_replicas_need_ha(tmp_path: Path) -> None:
    """--replicas is a cluster option: without --ha it is a usage error (exit 2), nothing started."""
    done = subprocess.run(
        [sys.executable, "-m", "broker", "dev", "--state-dir", str(tmp_path / "s"), "--replicas", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--replicas needs --ha" in done.stderr
    assert not (tmp_path / "s").exists()


def test_a_state_directory_keeps_its_shape(tmp_path: Path) -> None:
    """A single-node state directory is refused by --ha and a cluster's by the single-node stack (either
    switch would strand raft without a quorum), before any process starts."""
    from broker.devstack.stack import DevStack, StackError

    single = tmp_path / "single"
    (single / "vault").mkdir(parents=True)
    (single / "vault" / "init.json").write_text("{}")
    cluster = tmp_path / "cluster"
    (cluster / "vault" / "node-2").mkdir(parents=True)
    refusals = ((single, True, "holds a single-node stack"), (cluster, False, "holds an --ha cluster"))
    for state, ha, says in refusals:
        stack = DevStack(state, broker_port=free_port(), ha=ha, replicas=2 if ha else 1)
        with pytest.raises(StackError, match=says):
            stack.start()
        assert not stack.children
