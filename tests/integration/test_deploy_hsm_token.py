"""`keybroker deploy hsm-token` initialises a real SoftHSM2 token from PIN files, never from argv.

Each test gets its own SoftHSM2 token directory (SOFTHSM2_CONF), as the dev stack does; no
stack is started. The command runs as a subprocess so the module is initialised there with that
config, as in the compose file's ``hsm-init`` container.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.devstack import hsm
from broker.devstack.common import HSM_TOKEN_LABEL, Layout
from broker.devstack.hsm import find_softhsm_library

USER_PIN = "user-7c1f9e2a41"
SO_PIN = "so-3b8d0c5e96"


@pytest.fixture
def softhsm(tmp_path: Path) -> dict[str, str]:
    """The environment of a SoftHSM2 with an empty token directory of its own."""
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return {**os.environ, "SOFTHSM2_CONF": str(conf)}


def pin_files(directory: Path, user: str = USER_PIN, so: str = SO_PIN) -> tuple[Path, Path]:
    (directory / "pin").write_text(user + "\n")
    (directory / "so-pin").write_text(so + "\n")
    return directory / "pin", directory / "so-pin"


def hsm_token(env: dict[str, str], pin: Path, so_pin: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "deploy",
            "hsm-token",
            "--library",
            str(find_softhsm_library()),
            "--pin-file",
            str(pin),
            "--so-pin-file",
            str(so_pin),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


def logins(env: dict[str, str], label: str, user_pin: str, so_pin: str) -> tuple[bool, bool]:
    """(user login works, SO login works) on token ``label``, checked in a fresh process."""
    script = (
        "import sys, pkcs11\n"
        "lib = pkcs11.lib(sys.argv[1])\n"
        "token = lib.get_token(token_label=sys.argv[2])\n"
        "pins = sys.stdin.read().split()\n"
        # SO first: python-pkcs11 leaves a read-only session open after a refused login, and
        # an SO login is refused while one exists.
        "for kw in ({'so_pin': pins[1], 'rw': True}, {'user_pin': pins[0]}):\n"
        "    try:\n"
        "        token.open(**kw).close(); print('ok')\n"
        "    except pkcs11.exceptions.PinIncorrect:\n"
        "        print('refused')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(find_softhsm_library()), label],
        input=f"{user_pin}\n{so_pin}\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    )
    so, user = done.stdout.split()
    return user == "ok", so == "ok"


def assert_no_pin(done: subprocess.CompletedProcess[str], *pins: str) -> None:
    for pin in pins:
        assert pin not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_initialises_a_token_whose_pins_are_the_files(softhsm: dict[str, str], tmp_path: Path) -> None:
    """A new token labelled keybroker: the user PIN and SO PIN from the files log in, a second run
    changes nothing and only checks the PIN; no PIN appears in the output."""
    pin, so_pin = pin_files(tmp_path)
    first = hsm_token(softhsm, pin, so_pin)
    second = hsm_token(softhsm, pin, so_pin)

    assert first.returncode == 0, first.stderr
    assert "initialised" in first.stdout
    assert second.returncode == 0, second.stderr
    assert "exists" in second.stdout
    assert_no_pin(first, USER_PIN, SO_PIN)
    assert_no_pin(second, USER_PIN, SO_PIN)
    assert logins(softhsm, HSM_TOKEN_LABEL, USER_PIN, SO_PIN) == (True, True)
    assert logins(softhsm, HSM_TOKEN_LABEL, "not-the-pin", "not-the-so-pin") == (False, False)
    slots = subprocess.run(
        ["softhsm2-util", "--show-slots"], capture_output=True, text=True, check=True, timeout=30, env=softhsm
    ).stdout
    assert slots.count(f"Label:            {HSM_TOKEN_LABEL} ") == 1, "a second token was made"


def test_a_pin_file_that_does_not_open_the_token_fails(softhsm: dict[str, str], tmp_path: Path) -> None:
    """Once the token exists, a different user PIN is refused: exit 1, a clear message naming
    neither PIN, and the token keeps its PIN."""
    pin, so_pin = pin_files(tmp_path)
    assert hsm_token(softhsm, pin, so_pin).returncode == 0
    (tmp_path / "wrong").mkdir()
    wrong_pin, _ = pin_files(tmp_path / "wrong", user="wrong-pin-0a9b")

    done = hsm_token(softhsm, wrong_pin, so_pin)

    assert done.returncode == 1
    assert "user PIN was refused" in done.stderr
    assert "CKR_PIN_INCORRECT" in done.stderr
    assert_no_pin(done, USER_PIN, SO_PIN, "wrong-pin-0a9b")
    assert logins(softhsm, HSM_TOKEN_LABEL, USER_PIN, SO_PIN) == (True, True)


@pytest.mark.parametrize(
    ("flag", "make", "message"),
    [
        ("--pin-file", lambda p: None, "file not found"),
        ("--so-pin-file", lambda p: None, "file not found"),
        ("--pin-file", lambda p: p.mkdir(), "IsADirectoryError"),
        ("--pin-file", lambda p: p.write_text(""), "file is empty"),
        ("--so-pin-file", lambda p: p.write_bytes(b"\xff\xfe\n"), "UnicodeDecodeError"),
        ("--pin-file", lambda p: p.write_text("first\nsecond\n"), "more than one line"),
    ],
    ids=["missing-pin", "missing-so-pin", "directory", "empty", "not-utf8", "two-lines"],
)
def test_an_unusable_pin_file_is_a_usage_error(
    softhsm: dict[str, str], tmp_path: Path, flag: str, make: Any, message: str
) -> None:
    """A missing, empty, unreadable or malformed PIN file: exit 2, one line naming the flag and the
    reason, no traceback, and no token is initialised."""
    pin, so_pin = pin_files(tmp_path)
    bad = tmp_path / "bad"
    make(bad)
    args: dict[str, Path] = {"--pin-file": pin, "--so-pin-file": so_pin, flag: bad}

    done = hsm_token(softhsm, args["--pin-file"], args["--so-pin-file"])

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"keybroker: error: {flag}: ")
    assert message in done.stderr
    assert_no_pin(done, USER_PIN, SO_PIN, "first", "second")
    assert not list((Path(softhsm["SOFTHSM2_CONF"]).parent / "tokens").iterdir()), "a token was made"


def test_a_pin_the_token_refuses_and_a_missing_module_fail_cleanly(
    softhsm: dict[str, str], tmp_path: Path
) -> None:
    """SoftHSM2's own PIN rules (4-255 bytes) and a module path that does not load: exit 1 with
    the PKCS#11 reason, no traceback, no PIN echoed."""
    short, so_pin = pin_files(tmp_path, user="abc")
    refused = hsm_token(softhsm, short, so_pin)
    pin, _ = pin_files(tmp_path)
    no_module = hsm_token(softhsm, pin, so_pin, "--library", str(tmp_path / "missing.so"))

    assert refused.returncode == 1
    assert "CKR_PIN_LEN_RANGE" in refused.stderr
    assert_no_pin(refused, "abc", SO_PIN)
    assert no_module.returncode == 1
    assert "cannot load the PKCS#11 module" in no_module.stderr
    assert_no_pin(no_module, USER_PIN, SO_PIN)


def test_dev_stack_token_init_puts_no_pin_on_a_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dev stack initialises its token through `deploy hsm-token`: every child it runs gets the
    PINs by file (no PIN in any argv, where `ps` would show it) and the PIN files open the token."""
    layout = Layout(tmp_path / "state")
    layout.hsm_dir.mkdir(parents=True)
    argvs: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(argv: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        argvs.append([str(a) for a in argv])
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    hsm.init_token(layout, lambda _: None)
    hsm.init_token(layout, lambda _: None)  # again: the existing token is kept

    user_pin = layout.hsm_pin.read_text().strip()
    so_pin = layout.hsm_so_pin.read_text().strip()
    assert argvs
    for argv in argvs:
        assert not any(user_pin in a or so_pin in a for a in argv), argv
    env = {**os.environ, "SOFTHSM2_CONF": str(layout.softhsm_conf)}
    assert logins(env, HSM_TOKEN_LABEL, user_pin, so_pin) == (True, True)
