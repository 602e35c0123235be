"""Writing files that hold secrets: owner-only from the first byte, replaced atomically."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: str | bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600, via a temp file and rename (never half-written).

    With ``exclusive`` the call fails with FileExistsError rather than replace a file.
    """
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    if exclusive and path.exists():
        raise FileExistsError(str(path))
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def check_writable_target(path: Path) -> None:
    """Fail now, before any irreversible step, if ``path`` could not be written later."""
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into {parent}")
