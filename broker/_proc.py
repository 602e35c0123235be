"""Children that die with their parent: the kernel (``PR_SET_PDEATHSIG``) sends them SIGTERM
when the process that started them goes, even by ``kill -9``, so none is left orphaned.

libc's ``prctl`` is looked up once, here at import: the hook runs in the child between fork
and exec, where only async-signal-safe work belongs (no ``find_library``, which runs
``ldconfig``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[[int, int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    prctl: Callable[[int, int], int] = libc.prctl
    return prctl


_PRCTL = _libc_prctl()


def die_with_parent() -> None:
    """A ``preexec_fn``: this child gets SIGTERM when its parent dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
