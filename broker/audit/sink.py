"""Where audit records go. Today: the durability probe that health uses."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def probe_writable(directory: Path) -> None:
    """Write, fsync and remove a file in ``directory``; raise OSError if any step fails.

    ``os.access`` is not enough: a full disk or a read-only remount pass it.
    """
    fd, name = tempfile.mkstemp(prefix=".probe-", dir=directory)
    try:
        os.write(fd, b"probe\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)
