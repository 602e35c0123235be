"""The SoftHSM2 token of the dev stack: its own token directory and PINs in the state directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from broker._files import write_private
from broker.devstack.common import HSM_TOKEN_LABEL, SOFTHSM_LIBRARIES, Layout, StackError, child_env


def find_softhsm_library() -> Path:
    for candidate in SOFTHSM_LIBRARIES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise StackError(
        "SoftHSM2 is not installed (libsofthsm2.so not found); run `make setup` or `apt-get install softhsm2`"
    )


def init_token(layout: Layout, progress: Callable[[str], None]) -> None:
    """Initialise the token unless this state directory has one; random PINs, files 0600."""
    tokens = layout.hsm_dir / "tokens"
    tokens.mkdir(mode=0o700, exist_ok=True)
    write_private(
        layout.softhsm_conf,
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n",
    )
    env = child_env(SOFTHSM2_CONF=str(layout.softhsm_conf))
    if not shutil.which("softhsm2-util"):
        raise StackError("softhsm2-util not found; run `make setup` or `apt-get install softhsm2`")
    slots = subprocess.run(
        ["softhsm2-util", "--show-slots"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if f"Label:            {HSM_TOKEN_LABEL}" in slots.stdout and layout.hsm_pin.is_file():
        return
    pin, so_pin = os.urandom(12).hex(), os.urandom(12).hex()
    write_private(layout.hsm_pin, pin + "\n")
    write_private(layout.hsm_so_pin, so_pin + "\n")
    done = subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            HSM_TOKEN_LABEL,
            "--so-pin",
            so_pin,
            "--pin",
            pin,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise StackError(f"softhsm2-util could not initialise the token: {done.stderr.strip()}")
    progress(f"  hsm: token '{HSM_TOKEN_LABEL}' initialised; PINs in {layout.hsm_dir} (0600)")
