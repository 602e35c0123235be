"""PKCS#11 test modules (``p11shim/*.c``): small C libraries in front of SoftHSM2 that note or
change what the broker asks of the token. Compiled per test run (a C compiler is a test
prerequisite, installed by ``scripts/setup.sh --with-test-tools``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCES = Path(__file__).parent / "p11shim"


def build_shim(source: str, out_dir: Path) -> Path:
    """Compile ``p11shim/<source>.c`` into ``out_dir/<source>.so`` and return its path."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler (cc) is needed to build the PKCS#11 test modules; apt-get install gcc"
    out = out_dir / f"{source}.so"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(out), str(SOURCES / f"{source}.c"), "-ldl"],
        check=True,
        timeout=120,
    )
    return out
