"""serve --workers: the worker argument is checked, each worker gets its own chain, and a worker that
keeps dying stops the supervisor instead of flapping forever."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from broker.config.load import load_config
from broker.workers import MAX_RESTARTS, Supervisor, parse_worker, worker_config
from tests.unit.test_config import VALID, write


@pytest.mark.parametrize("value", ["", "1", "2/2", "-1/2", "0/0", "0/65", "a/2", "0/2/3", " 0/2", "\u0661/2"])
def test_a_bad_worker_argument_is_refused(value: str) -> None:
    """Only I/N with 0 <= I < N <= 64, ASCII digits, is accepted."""
    with pytest.raises(ValueError, match="--worker takes I/N"):
        parse_worker(value)


def test_each_worker_writes_its_own_chain(tmp_path: Path) -> None:
    """Worker I's audit directory is audit.directory/worker-I and its node <node>-wI."""
    config = load_config(write(tmp_path, VALID), environ={})
    one = worker_config(config, 1)
    assert one.audit.directory == config.audit.directory / "worker-1"
    assert one.audit.node == f"{config.audit.node}-w1"
    assert one.server == config.server
    assert parse_worker("1/2") == (1, 2)


def test_a_worker_that_keeps_dying_stops_the_supervisor() -> None:
    """A worker exiting at once is restarted at most MAX_RESTARTS times, then run() returns 1."""
    starts: list[int] = []

    def command(index: int) -> list[str]:
        starts.append(index)
        return [sys.executable, "-c", "raise SystemExit(3)"]

    began = time.monotonic()
    assert Supervisor(1, command).run(poll=0.05) == 1
    assert len(starts) == MAX_RESTARTS + 1
    assert time.monotonic() - began < 60
