"""The file commands' plan and output handling never lose a file: a file that appears at the output
path while a message is written is not replaced, and a plan in which one job's output would
replace another job's input or output is refused before anything is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli.files import _replacing, plan
from broker.errors import ConfigError


def test_an_output_that_appears_while_writing_is_not_replaced(tmp_path: Path) -> None:
    """The existence check runs before a possibly long write; a file created at the target in the
    meantime survives, the write is refused, and no temporary file is left."""
    target = tmp_path / "report.csv"

    def write_while_someone_creates_the_target() -> None:
        with _replacing(target, overwrite=False) as out:
            out.write(b"new content")
            target.write_bytes(b"someone else's file")

    with pytest.raises(ConfigError, match="already exists"):
        write_while_someone_creates_the_target()
    assert target.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]


def test_without_a_race_the_output_is_published_alone(tmp_path: Path) -> None:
    """The normal case: the output is in place with mode 0600 and no temporary file remains."""
    target = tmp_path / "report.csv"
    with _replacing(target, overwrite=False) as out:
        out.write(b"content")
    assert target.read_bytes() == b"content"
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]


def test_a_plan_that_would_overwrite_another_input_is_refused(tmp_path: Path) -> None:
    """``encrypt-file x x.kbe --force`` would write x's output over x.kbe before x.kbe is read."""
    (tmp_path / "x").write_bytes(b"one")
    (tmp_path / "x.kbe").write_bytes(b"two")
    with pytest.raises(ConfigError, match="both an input and the output"):
        plan("encrypt", [str(tmp_path / "x"), str(tmp_path / "x.kbe")], None)


def test_a_plan_writing_two_inputs_to_one_output_is_refused(tmp_path: Path) -> None:
    """Two directories holding the same name, mirrored into one output tree."""
    for side in ("left", "right"):
        (tmp_path / side).mkdir()
        (tmp_path / side / "same.txt").write_bytes(side.encode())
    with pytest.raises(ConfigError, match="both be written"):
        plan("encrypt", [str(tmp_path / "left"), str(tmp_path / "right")], str(tmp_path / "out"))


def test_rewrap_in_place_is_not_a_collision(tmp_path: Path) -> None:
    """Each rewrap job writes over its own input: allowed."""
    for name in ("a.kbe", "b.kbe"):
        (tmp_path / name).write_bytes(b"x")
    jobs = plan("rewrap", [str(tmp_path)], None)
    assert [(j.source, j.target) for j in jobs] == [(tmp_path / n, tmp_path / n) for n in ("a.kbe", "b.kbe")]
