"""The HSM through PKCS#11 (python-pkcs11): a pool of logged-in sessions, one per worker thread.

PKCS#11 sessions are not safe to share between threads, so each worker thread
opens and owns exactly one session; an async caller borrows a whole worker.

Login state belongs to the application, not the session: the first ``C_Login``
logs in every session on the token and a second one fails with
``UserAlreadyLoggedIn``; closing a logged-in session logs them all out. So one
dedicated session holds the login and is never used for work, and the worker
sessions are opened without a PIN. A session that fails with a device or session
error is dropped (with the login, when the token went away) and reopened on the
next use, so a token that comes back is picked up without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11err

from broker.backends._blocking import run_blocking
from broker.backends.vault import read_secret_file
from broker.config.model import HsmConfig
from broker.errors import BadGateway, ConfigError, NotFound, Unavailable

BACKEND = "hsm"
T = TypeVar("T")

# Failures that mean the token or session is gone or refuses us: retry later, not the caller's fault.
_UNAVAILABLE = (
    p11err.NoSuchToken,
    p11err.TokenNotPresent,
    p11err.TokenNotRecognised,
    p11err.DeviceRemoved,
    p11err.DeviceError,
    p11err.DeviceMemory,
    p11err.SessionClosed,
    p11err.SessionHandleInvalid,
    p11err.SessionCount,
    p11err.UserNotLoggedIn,
    p11err.PinIncorrect,
    p11err.PinLocked,
    p11err.PinExpired,
    p11err.PinInvalid,
    p11err.PinLenRange,
    p11err.UserPinNotInitialized,
    p11err.HostMemory,
)
# Failures after which the worker's session must not be reused.
_SESSION_BROKEN = (
    p11err.TokenNotPresent,
    p11err.DeviceRemoved,
    p11err.DeviceError,
    p11err.SessionClosed,
    p11err.SessionHandleInvalid,
    p11err.UserNotLoggedIn,
)


@contextlib.contextmanager
def map_pkcs11_errors(what: str) -> Iterator[None]:
    """Translate python-pkcs11 failures into broker errors at the seam."""
    try:
        yield
    except p11err.NoSuchKey as exc:
        raise NotFound(f"hsm: {what}: no such key object") from exc
    except _UNAVAILABLE as exc:
        raise Unavailable(f"hsm: {what}: {exc.__class__.__name__}", backend=BACKEND) from exc
    except p11err.PKCS11Error as exc:
        raise BadGateway(f"hsm: {what}: {exc.__class__.__name__}", backend=BACKEND) from exc


def read_pin(config: HsmConfig) -> str:
    if config.pin_file is not None:
        return read_secret_file(config.pin_file, "hsm.pin_file")
    pin = os.environ.get(config.pin_env, "")
    if not pin:
        raise ConfigError(f"environment variable {config.pin_env} is not set or empty", key="hsm.pin_env")
    return pin


class _Worker:
    """One thread and the one session it owns."""

    def __init__(self, index: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hsm-{index}")
        self.session: Any = None


class HsmClient:
    """A pool of PKCS#11 sessions; :meth:`run` executes a function against one of them."""

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._lib: Any = None
        self._pin = ""
        self._workers = [_Worker(i) for i in range(config.sessions)]
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._open_lock = threading.Lock()
        self._login_session: Any = None

    async def start(self) -> None:
        if not self._config.library.is_file():
            raise ConfigError(f"PKCS#11 library not found: {self._config.library}", key="hsm.library")
        self._pin = read_pin(self._config)
        self._lib = await run_blocking(
            None,
            lambda: pkcs11.lib(str(self._config.library)),
            deadline=30,
            backend=BACKEND,
            what="load library",
        )
        for worker in self._workers:
            self._idle.put_nowait(worker)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for worker in self._workers:
            if worker.session is not None:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(worker.executor, worker.session.close)
            worker.executor.shutdown(wait=False, cancel_futures=True)
        if self._login_session is not None:
            # Closed last: closing the logged-in session logs every session out.
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, self._login_session.close)

    def _open(self) -> Any:
        with map_pkcs11_errors("open session"), self._open_lock:
            token = self._lib.get_token(token_label=self._config.token_label)
            if self._login_session is None:
                # UserAlreadyLoggedIn: another session of ours still holds the login; enough.
                with contextlib.suppress(p11err.UserAlreadyLoggedIn):
                    self._login_session = token.open(user_pin=self._pin, rw=True)
            return token.open(rw=True)

    def _forget_login(self) -> None:
        with self._open_lock:
            self._login_session = None

    async def run(self, fn: Callable[[Any], T], *, what: str) -> T:
        """Run ``fn(session)`` on a pooled worker's thread, within the configured deadline."""
        if self._lib is None:
            raise Unavailable("hsm client is not started", backend=BACKEND)
        worker = await self._idle.get()
        try:

            def call() -> T:
                if worker.session is None:
                    worker.session = self._open()
                try:
                    with map_pkcs11_errors(what):
                        return fn(worker.session)
                except Unavailable as exc:
                    if isinstance(exc.__cause__, _SESSION_BROKEN):
                        worker.session = None
                        self._forget_login()
                    raise

            return await run_blocking(
                worker.executor,
                call,
                deadline=self._config.timeout_seconds,
                backend=BACKEND,
                what=what,
            )
        finally:
            self._idle.put_nowait(worker)

    async def health(self) -> dict[str, Any]:
        def probe(session: Any) -> int:
            # A random draw proves the token is present and the session logged in.
            return len(session.generate_random(64))

        await self.run(probe, what="health probe")
        return {
            "ok": True,
            "token_label": self._config.token_label,
            "logged_in": True,
            "sessions": len(self._workers),
        }
