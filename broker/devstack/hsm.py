"""The SoftHSM2 token of the dev stack: its own token directory and PINs in the state directory."""

from __future__ import annotations

import os
import subprocess
import sys
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
    library = find_softhsm_library()
    if not (layout.hsm_pin.is_file() and layout.hsm_so_pin.is_file()):
        write_private(layout.hsm_pin, os.urandom(12).hex() + "\n")
        write_private(layout.hsm_so_pin, os.urandom(12).hex() + "\n")
    # The PINs go by file to `keybroker deploy hsm-token` (the compose file's hsm-init too):
    # softhsm2-util would need them on its command line, readable in `ps` by every user.
    # In a child process: SoftHSM2 reads SOFTHSM2_CONF when the module is initialised.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "deploy",
            "hsm-token",
            "--library",
            str(library),
            "--label",
            HSM_TOKEN_LABEL,
            "--pin-file",
            str(layout.hsm_pin),
            "--so-pin-file",
            str(layout.hsm_so_pin),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise StackError(f"the HSM token could not be initialised: {done.stderr.strip()}")
    if "initialised" in done.stdout:
        progress(f"  hsm: token '{HSM_TOKEN_LABEL}' initialised; PINs in {layout.hsm_dir} (0600)")
