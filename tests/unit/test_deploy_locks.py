"""The deployment lock files are pinned and hashed, and the Dockerfile installs them hash-checked.

Static: no network, no container engine. The real proof that the hashes match PyPI and that the
locks are closed under their dependencies is a ``pip download --require-hashes`` of each lock
(README "Production deployment"); this keeps a hand edit from quietly undoing it.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SCRIPT = DEPLOY / "lock_hashes.py"
LOCKS = sorted(DEPLOY.glob("*.lock"))
DIGEST = "0" * 63


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_hashes", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lock_hashes"] = module
    spec.loader.exec_module(module)
    return module


lock_hashes = _load_script()


def pins(lock: Path) -> dict[str, str]:
    """Canonical name → version of every requirement in ``lock``."""
    entries = lock_hashes.parse(lock.read_text(), lock.name)
    return {canonicalize_name(e.name): e.version for e in entries if e.is_requirement}


def pip_commands() -> list[str]:
    """Every pip invocation in the Dockerfile's RUN lines, continuations joined."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [ln.strip()[4:] for ln in text.splitlines() if ln.strip().startswith("RUN ")]
    return [cmd.strip() for run in runs for cmd in run.split("&&") if re.match(r"\s*pip\s", cmd)]


@pytest.mark.parametrize("lock", LOCKS, ids=[p.name for p in LOCKS])
def test_every_lock_line_is_pinned_with_hashes(lock: Path) -> None:
    """Each requirement is exactly name==version with at least one sha256 hash, none twice."""
    entries = lock_hashes.parse(lock.read_text(), lock.name)
    assert lock_hashes.check(entries, lock.name) == []
    assert all(e.hashes for e in entries if e.is_requirement)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("six==1.17.0\n", "has no --hash"),
        (f"six==1.17.0 --hash=sha256:{DIGEST}1\nSix==1.16.0 --hash=sha256:{DIGEST}2\n", "pinned twice"),
        ("# only a comment\n", "no requirement lines"),
    ],
)
def test_the_checker_reports_a_lock_without_hashes(text: str, problem: str) -> None:
    """The checker the test above relies on does find a missing hash, a duplicate, an empty lock."""
    problems = lock_hashes.check(lock_hashes.parse(text, "x.lock"), "x.lock")
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    "line",
    ["six>=1.16", "six", "six==1.17.0; python_version<'3.12'", "six==1.17.0 --hash=md5:abc", "-e ."],
)
def test_the_checker_refuses_an_unpinned_line(line: str) -> None:
    """Ranges, bare names, markers, other options and editable installs are not lock lines."""
    with pytest.raises(lock_hashes.LockError):
        lock_hashes.parse(line + "\n", "x.lock")


def test_check_mode_exit_codes_and_help(tmp_path: Path) -> None:
    """`lock_hashes.py --check` exits 0 on the real locks and 1, naming the line, on an unhashed
    one, without touching it; --help documents the tool."""
    run = [sys.executable, str(SCRIPT)]
    good = subprocess.run([*run, "--check", *map(str, LOCKS)], capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    bad_lock = tmp_path / "bad.lock"
    bad_lock.write_text("# header\nsix==1.17.0\n")
    bad = subprocess.run([*run, "--check", str(bad_lock)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "bad.lock:2: six==1.17.0 has no --hash" in bad.stderr
    assert bad_lock.read_text() == "# header\nsix==1.17.0\n"
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "--check" in helped.stdout


def test_render_round_trips() -> None:
    """What the script writes parses back to the same pins and hashes, comments kept."""
    text = f"# c\nsix==1.17.0 \\\n    --hash=sha256:{DIGEST}1 \\\n    --hash=sha256:{DIGEST}2\n"
    entries = lock_hashes.parse(text, "x.lock")
    assert lock_hashes.render(entries) == text


def test_dockerfile_installs_every_lock_hash_checked() -> None:
    """Every pip command that reads a lock (-r) uses --require-hashes; every lock is installed;
    the only other pip commands install the locally built keybroker wheel with --no-deps and
    --no-index, so nothing reaches an index without a hash."""
    installed: set[str] = set()
    for cmd in pip_commands():
        words = cmd.split()
        if "-r" in words:
            assert "--require-hashes" in words, cmd
            installed.add(Path(words[words.index("-r") + 1]).name)
        elif words[1] in ("install", "wheel"):
            assert "--no-deps" in words, cmd
            assert "--no-index" in words or words[-1] == ".", cmd
            target = words[-1]
            assert target == "." or re.fullmatch(r"/tmp/dist/keybroker-[\w.]+-py3-none-any\.whl", target), cmd
    assert installed == {p.name for p in LOCKS}


def test_runtime_lock_covers_the_package_dependencies() -> None:
    """Each dependency pyproject.toml declares is in requirements.lock at a version it allows (the
    runtime stage installs keybroker with --no-deps: a missing one would be absent at run time)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = pins(DEPLOY / "requirements.lock")
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement.name} is a dependency but not in requirements.lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (spec, locked[name])


def test_build_lock_satisfies_the_build_system() -> None:
    """The build stage installs exactly the build backend pyproject.toml asks for."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    locked = pins(DEPLOY / "requirements-build.lock")
    for spec in requires:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in locked, spec
        assert requirement.specifier.contains(locked[name]), (spec, locked[name])


def test_standin_lock_agrees_with_the_runtime_lock() -> None:
    """The stand-in image installs its lock over the runtime's packages: a package in both must
    be the same version, or pip would replace a hash-checked runtime package in that image."""
    runtime = pins(DEPLOY / "requirements.lock")
    standin = pins(DEPLOY / "requirements-kms-standin.lock")
    shared = runtime.keys() & standin.keys()
    assert {n: (runtime[n], standin[n]) for n in shared if runtime[n] != standin[n]} == {}


class _FakePypi(http.server.BaseHTTPRequestHandler):
    """PyPI's JSON API for two projects: ``one`` answers per version, ``two`` only per project
    (as some mirrors do), ``bad`` lists a file without a usable sha256."""

    files: ClassVar[dict[str, list[dict[str, object]]]] = {
        "one": [
            {"filename": "one-1.0-py3-none-any.whl", "digests": {"sha256": "b" * 64}},
            {"filename": "one-1.0.tar.gz", "digests": {"sha256": "a" * 64}},
        ],
        "two": [{"filename": "two-2.0.tar.gz", "digests": {"sha256": "c" * 64}}],
        "bad": [{"filename": "bad-3.0.tar.gz", "digests": {"md5": "d" * 32}}],
    }

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        body: dict[str, object] | None = None
        if len(parts) == 4 and parts[1] in ("one", "bad"):
            body = {"urls": self.files[parts[1]]}
        elif len(parts) == 3 and parts[1] == "two":
            body = {"releases": {"2.0": self.files["two"], "1.0": []}}
        data = json.dumps(body).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def fake_pypi() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakePypi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/pypi"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def test_hashes_come_from_every_file_of_the_version(fake_pypi: str) -> None:
    """Every file's sha256 of that exact version, sorted; the per-project listing is used when the
    per-version endpoint is missing; an unknown version or a file without sha256 is an error."""
    assert lock_hashes.hashes_for("one", "1.0", fake_pypi) == ["a" * 64, "b" * 64]
    assert lock_hashes.hashes_for("two", "2.0", fake_pypi) == ["c" * 64]
    with pytest.raises(lock_hashes.LockError, match="no such version"):
        lock_hashes.hashes_for("two", "9.9", fake_pypi)
    with pytest.raises(lock_hashes.LockError, match="lists no files"):
        lock_hashes.hashes_for("two", "1.0", fake_pypi)
    with pytest.raises(lock_hashes.LockError, match="no sha256 digest"):
        lock_hashes.hashes_for("bad", "3.0", fake_pypi)


def test_regeneration_refuses_a_plain_http_index(tmp_path: Path) -> None:
    """Hashes fetched over plain HTTP would be only as good as the network: usage error, lock unchanged."""
    lock = tmp_path / "x.lock"
    lock.write_text("six==1.17.0\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--pypi", "http://127.0.0.1:9/pypi", str(lock)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "https" in done.stderr
    assert lock.read_text() == "six==1.17.0\n"
