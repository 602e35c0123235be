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

Locking: python-pkcs11 (0.10) calls ``C_Initialize(NULL)``, which by the PKCS#11
standard promises the library that no two threads call it at once; SoftHSM2 then
turns its own locking off, and concurrent calls corrupt its state (seen as
``GeneralError`` and ``TemplateInconsistent`` under concurrent rotations). So
:func:`load_library` initialises the library itself first, through its function
list, with ``CKF_OS_LOCKING_OK`` (the library may use the OS's mutexes; SoftHSM2,
AWS CloudHSM's and the other thread-safe libraries accept it), then hands it to
python-pkcs11 without a second ``C_Initialize``. Calls then run in parallel, one
session per worker thread (python-pkcs11 also locks each session). Only a library
that refuses OS locking (``CKR_CANT_LOCK``), or one something else in this process
initialised first, is called under one process-wide lock, as before.

Object handles: finding a key object is a token search (SoftHSM2 walks and decrypts
every object's attributes: most of a call's cost), so each worker keeps the handles it
found, per session. A handle names the object as long as the object exists; a destroy
through this broker forgets every cached handle, and a handle the token no longer knows
(destroyed elsewhere) is dropped and searched for again once. A version is destroyed only
after its key left every state that encrypts with it, so a stale handle can only meet a
decryption, whose GCM tag fails closed on any other key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import ctypes
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11err
from pkcs11 import Attribute, Mechanism, ObjectClass, _pkcs11
from pkcs11 import KeyType as KeyType_
from pkcs11.util.ec import (
    decode_ecdsa_signature,
    encode_ec_public_key,
    encode_ecdsa_signature,
    encode_named_curve_parameters,
)

from broker import spans
from broker.backends._blocking import run_blocking
from broker.backends.base import Context, KeyRef, PerItemBatches, canonical_context
from broker.config.model import HsmConfig
from broker.config.secrets import read_secret_file
from broker.errors import (
    BackendTimeout,
    BadGateway,
    ConfigError,
    DecryptionFailed,
    NotFound,
    OutcomeUnknown,
    Unavailable,
)
from broker.log import get_logger
from broker.requestvars import note_backend_call
from broker.vocab import Backend, KeyType

BACKEND = "hsm"
T = TypeVar("T")
log = get_logger(__name__)

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

# The mapped error names the exception class (``upstream_code``); decided on by name after mapping.
_SESSION_BROKEN_CODES = frozenset(cls.__name__ for cls in _SESSION_BROKEN)


@contextlib.contextmanager
def map_pkcs11_errors(what: str) -> Iterator[None]:
    """Translate python-pkcs11 failures into broker errors at the seam."""
    try:
        yield
    except p11err.NoSuchKey as exc:
        raise NotFound(f"hsm: {what}: no such key object") from exc
    except _UNAVAILABLE as exc:
        name = exc.__class__.__name__
        raise Unavailable(f"hsm: {what}: {name}", backend=BACKEND, upstream_code=name) from exc
    except p11err.PKCS11Error as exc:
        name = exc.__class__.__name__
        raise BadGateway(f"hsm: {what}: {name}", backend=BACKEND, upstream_code=name) from exc


def read_pin(config: HsmConfig) -> str:
    if config.pin_file is not None:
        return read_secret_file(config.pin_file, "hsm.pin_file")
    pin = os.environ.get(config.pin_env, "")
    if not pin:
        raise ConfigError(f"environment variable {config.pin_env} is not set or empty", key="hsm.pin_env")
    return pin


# PKCS#11 2.40 constants for C_Initialize (pkcs11t.h).
CKF_OS_LOCKING_OK = 0x00000002
CKR_OK = 0x00000000
CKR_CANT_LOCK = 0x0000000A
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x00000191


class _CkInitializeArgs(ctypes.Structure):
    """CK_C_INITIALIZE_ARGS: no mutex callbacks, CKF_OS_LOCKING_OK (the library's own locks)."""

    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _CkFunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST: the version, then C_Initialize (the only entry used here)."""

    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte), ("C_Initialize", ctypes.c_void_p)]


_C_INITIALIZE = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)
_C_GET_FUNCTION_LIST = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.POINTER(ctypes.POINTER(_CkFunctionListHead)))
# The ctypes handles of initialised libraries: never unloaded while python-pkcs11 uses them.
_RAW_LIBRARIES: dict[str, ctypes.CDLL] = {}
# Libraries this module initialised with CKF_OS_LOCKING_OK.
_THREAD_SAFE: set[str] = set()


class _Preinitialised(_pkcs11.lib):
    """python-pkcs11's library object for a library this module already initialised."""

    def initialize(self) -> None:
        # python-pkcs11 would call C_Initialize(NULL) (no locking) and fail on CKR_ALREADY_INITIALIZED.
        return None


def _initialise_with_os_locking(path: str) -> int:
    """``C_Initialize`` with CKF_OS_LOCKING_OK through the library's function list; the CK_RV."""
    raw = _RAW_LIBRARIES.get(path) or ctypes.CDLL(path)
    _RAW_LIBRARIES[path] = raw
    functions = ctypes.POINTER(_CkFunctionListHead)()
    rv = int(_C_GET_FUNCTION_LIST(("C_GetFunctionList", raw))(ctypes.byref(functions)))
    if rv != CKR_OK or not functions or not functions.contents.C_Initialize:
        raise ConfigError(f"{path}: C_GetFunctionList failed (CK_RV 0x{rv:x})", key="hsm.library")
    args = _CkInitializeArgs(None, None, None, None, CKF_OS_LOCKING_OK, None)
    return int(_C_INITIALIZE(functions.contents.C_Initialize)(ctypes.byref(args)))


def load_library(path: str) -> tuple[Any, bool]:
    """python-pkcs11's library object for ``path``, and whether its calls may run in parallel.

    True when this call initialised the library with CKF_OS_LOCKING_OK; False when the library
    cannot lock (it is initialised without) or was initialised before in this process in a
    way not known here: its callers must then make one call at a time.
    """
    loaded = pkcs11._loaded.get(path)
    if loaded is not None:
        # Loaded before: by this module (locking known) or by python-pkcs11 itself (no locking).
        return loaded, isinstance(loaded, _Preinitialised) and path in _THREAD_SAFE
    rv = _initialise_with_os_locking(path)
    if rv == CKR_CANT_LOCK:
        return pkcs11.lib(path), False
    if rv not in (CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise ConfigError(f"{path}: C_Initialize failed (CK_RV 0x{rv:x})", key="hsm.library")
    lib = _Preinitialised(path)
    pkcs11._loaded[path] = lib  # a later pkcs11.lib(path) in this process gets this one
    if rv == CKR_OK:
        _THREAD_SAFE.add(path)
    return lib, rv == CKR_OK


class _Worker:
    """One thread and the one session it owns."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hsm-{index}")
        self.session: Any = None
        # Key objects found on this session: (label, CKA_ID, class) -> python-pkcs11 object.
        self.objects: dict[tuple[str, bytes, ObjectClass], Any] = {}
        self.generation = 0


# Calls one worker takes from the queue in one trip to its thread.
MAX_CALLS_PER_HANDOFF = 64


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Any], Any]
    what: str
    context: contextvars.Context
    future: asyncio.Future[Any]


# (True, result) or (False, the exception the call raised).
_Outcome = tuple[bool, Any]

# Failures that mean a cached object handle no longer names an object: search again.
_STALE_HANDLE = (p11err.ObjectHandleInvalid, p11err.KeyHandleInvalid)
_current_worker = threading.local()


class HsmClient:
    """A pool of PKCS#11 sessions; :meth:`run` executes a function against one of them.

    Calls queue for the workers; a worker that comes free takes its share of the calls
    waiting (split over the sessions, at most :data:`MAX_CALLS_PER_HANDOFF`) and runs them
    one after the other on its session in one trip to its thread. One call alone leaves at
    once; under load, one thread hand-off and one event-loop wake-up serve several calls
    instead of one each (a PKCS#11 call on a cached handle takes tens of microseconds, the
    hand-off about as long again).
    """

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._lib: Any = None
        self._pin = ""
        self._workers = [_Worker(i) for i in range(config.sessions)]
        self._free: list[_Worker] = []
        self._waiting: collections.deque[_Call] = collections.deque()
        self._open_lock = threading.Lock()
        # See the module docstring: taken around every call unless the library locks itself.
        self._call_lock = threading.Lock()
        self.thread_safe = False
        # Bumped when objects are destroyed: every worker's cached handles are forgotten.
        self._generation = 0
        self._login_session: Any = None

    async def start(self) -> None:
        if not self._config.library.is_file():
            raise ConfigError(f"PKCS#11 library not found: {self._config.library}", key="hsm.library")
        self._pin = read_pin(self._config)
        self._lib, self.thread_safe = await run_blocking(
            None,
            lambda: load_library(str(self._config.library)),
            deadline=30,
            backend=BACKEND,
            what="load library",
        )
        if not self.thread_safe:
            log.warning(
                "hsm_calls_serialised", reason="the PKCS#11 library was not initialised with OS locking"
            )
        self._free = list(self._workers)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        self._lib = None
        stopped = Unavailable("hsm client is closed", backend=BACKEND)
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.future.done():
                waiting.future.set_exception(stopped)
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

    async def run(self, fn: Callable[[Any], T], *, what: str, repeatable: bool = True) -> T:
        """Run ``fn(session)`` on a pooled worker's thread, within the configured deadline.

        ``repeatable=False`` (it creates an object): past the deadline it may still run, so the
        caller hears :class:`OutcomeUnknown` rather than a 503 to retry.
        """
        if self._lib is None:
            raise Unavailable("hsm client is not started", backend=BACKEND)
        loop = asyncio.get_running_loop()
        # The caller's context goes with the call: its backend calls are noted on its record.
        call = _Call(fn, what, contextvars.copy_context(), loop.create_future())
        self._waiting.append(call)
        self._dispatch()
        deadline = self._config.timeout_seconds
        called = spans.now()
        try:
            async with asyncio.timeout(deadline):
                result: T = await call.future
                return result
        except TimeoutError:
            # Not started yet: it never will be (_dispatch skips a done future). Running: its
            # thread finishes and the answer is dropped; the worker then serves the queue again.
            if not repeatable:
                raise OutcomeUnknown(
                    f"{BACKEND}: {what} did not finish within {deadline:g}s and may still be carried "
                    "out; nothing was recorded: read the key before trying again",
                    backend=BACKEND,
                ) from None
            raise BackendTimeout(
                f"{BACKEND}: {what} took longer than {deadline:g}s", backend=BACKEND
            ) from None
        finally:
            spans.add("backend", spans.now() - called)

    def _dispatch(self) -> None:
        """Hand waiting calls to free workers (event loop thread)."""
        loop = asyncio.get_running_loop()
        while self._waiting and self._free:
            # A fair share of what waits, so the other sessions get the rest when they come free
            # instead of one worker running everything in turn while another idles.
            share = min(MAX_CALLS_PER_HANDOFF, -(-len(self._waiting) // len(self._workers)))
            batch: list[_Call] = []
            while self._waiting and len(batch) < share:
                call = self._waiting.popleft()
                if not call.future.done():  # timed out or cancelled while waiting
                    batch.append(call)
            if not batch:
                return
            worker = self._free.pop()
            done = loop.run_in_executor(worker.executor, self._run_batch, worker, batch)
            done.add_done_callback(functools.partial(self._finished, worker, batch))

    def _finished(self, worker: _Worker, batch: list[_Call], done: asyncio.Future[list[_Outcome]]) -> None:
        """A worker's batch is back (event loop thread): answer each call, then serve the queue."""
        self._free.append(worker)
        if done.cancelled() or done.exception() is not None:
            error = done.exception() if not done.cancelled() else None
            failed = Unavailable(f"hsm: worker failed ({type(error).__name__})", backend=BACKEND)
            outcomes: list[_Outcome] = [(False, failed)] * len(batch)
        else:
            outcomes = done.result()
        for call, (ok, value) in zip(batch, outcomes, strict=True):
            if call.future.done():
                continue
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)
        if self._lib is not None:
            self._dispatch()

    def _run_batch(self, worker: _Worker, batch: list[_Call]) -> list[_Outcome]:
        """Each call in turn on the worker's session (worker thread); an outcome per call."""
        outcomes: list[_Outcome] = []
        with contextlib.nullcontext() if self.thread_safe else self._call_lock:
            for call in batch:
                try:
                    outcomes.append((True, call.context.run(self._run_one, worker, call.fn, call.what)))
                except Exception as exc:  # noqa: BLE001 - each call's failure is its own answer
                    outcomes.append((False, exc))
        return outcomes

    def _run_one(self, worker: _Worker, fn: Callable[[Any], Any], what: str) -> Any:
        if worker.session is None:
            worker.objects.clear()
            worker.session = self._open()
        if worker.generation != self._generation:
            worker.objects.clear()
            worker.generation = self._generation
        _current_worker.value = worker
        try:
            with map_pkcs11_errors(what):
                try:
                    result = fn(worker.session)
                except _STALE_HANDLE:
                    # A cached handle of an object destroyed elsewhere: search afresh, once.
                    worker.objects.clear()
                    result = fn(worker.session)
        except Unavailable as exc:
            if exc.upstream_code in _SESSION_BROKEN_CODES:
                worker.session = None
                worker.objects.clear()
                self._forget_login()
            raise
        finally:
            _current_worker.value = None
        note_backend_call(BACKEND, what, f"{self._config.token_label}/session-{worker.index}")
        return result

    @property
    def config(self) -> HsmConfig:
        return self._config

    def forget_objects(self) -> None:
        """Every worker drops its cached handles before its next call (objects were destroyed)."""
        self._generation += 1

    @staticmethod
    def find_key(session: Any, label: str, object_id: bytes, cls: ObjectClass) -> Any:
        """The key object (label, CKA_ID, class) on ``session``: the worker's cached handle, or a search."""
        worker: _Worker | None = getattr(_current_worker, "value", None)
        slot = (label, object_id, cls)
        if worker is not None and worker.session is session:
            found = worker.objects.get(slot)
            if found is None:
                found = worker.objects[slot] = session.get_key(object_class=cls, label=label, id=object_id)
            return found
        return session.get_key(object_class=cls, label=label, id=object_id)

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
            "os_locking": self.thread_safe,
        }


# P-256 (prime256v1) named-curve OID.
_P256_OID = "1.2.840.10045.3.1.7"
_NONCE_BYTES = 12
_TAG_BITS = 128
LABEL_PREFIX = "kb:"


_NON_EXTRACTABLE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    # Nobody may relabel an object afterwards (swap a version's CKA_ID or a key's label).
    Attribute.MODIFIABLE: False,
}
# Each key does its one job: token defaults (SoftHSM: an AES key may also wrap, unwrap,
# sign and verify; an EC private key may derive) would make it an oracle for others.
_AES_TEMPLATE = {
    **_NON_EXTRACTABLE,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
_EC_PRIVATE_TEMPLATE = {**_NON_EXTRACTABLE, Attribute.SIGN: True, Attribute.DERIVE: False}
_EC_PUBLIC_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.VERIFY: True,
    Attribute.MODIFIABLE: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
    Attribute.DERIVE: False,
}


def generate_p256(session: Any, label: str, object_id: bytes) -> None:
    """An ECDSA P-256 key pair kept in the token; the private half never leaves it."""
    params = session.create_domain_parameters(
        KeyType_.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_P256_OID)}, local=True
    )
    params.generate_keypair(
        store=True,
        label=label,
        id=object_id,
        private_template=_EC_PRIVATE_TEMPLATE,
        public_template=_EC_PUBLIC_TEMPLATE,
    )


def object_label(key_name: str) -> str:
    """The CKA_LABEL every object of one logical key carries; CKA_ID tells its versions apart."""
    return LABEL_PREFIX + key_name


class _CkGcmParams(ctypes.Structure):
    """CK_GCM_PARAMS (PKCS#11 2.40) in the Unix ABI: CK_ULONG is unsigned long, natural alignment."""

    _fields_ = [
        ("pIv", ctypes.c_void_p),
        ("ulIvLen", ctypes.c_ulong),
        ("ulIvBits", ctypes.c_ulong),
        ("pAAD", ctypes.c_void_p),
        ("ulAADLen", ctypes.c_ulong),
        ("ulTagBits", ctypes.c_ulong),
    ]


# Bytes after the IV in its buffer, filled with a random canary: a token that writes back
# more than the 12 bytes it was given changes them, and the result is refused.
_IV_GUARD_BYTES = 20


class GcmParams:
    """AES-GCM parameters whose IV buffer is the broker's own, writable memory.

    python-pkcs11's ``GCMParams`` points ``pIv`` into a Python ``bytes`` object, so a
    token that writes its generated IV back (AWS CloudHSM does, by its documentation)
    would write into an immutable object and the broker would never see the IV it
    must store. python-pkcs11 hands a ``bytes`` mechanism parameter to the token
    unchanged as the raw parameter block, so this builds the CK_GCM_PARAMS struct
    itself around ctypes buffers that live as long as this object (the caller keeps
    it until the operation has returned).
    """

    def __init__(self, iv: bytes, aad: bytes, tag_bits: int = 128) -> None:
        self._guard = os.urandom(_IV_GUARD_BYTES)
        self._iv_len = len(iv)
        self._iv = ctypes.create_string_buffer(iv + self._guard, len(iv) + _IV_GUARD_BYTES)
        self._aad = ctypes.create_string_buffer(aad, len(aad)) if aad else None
        block = _CkGcmParams(
            ctypes.addressof(self._iv),
            len(iv),
            len(iv) * 8,
            ctypes.addressof(self._aad) if self._aad is not None else None,
            len(aad),
            tag_bits,
        )
        self.raw = bytes(block)

    @property
    def iv(self) -> bytes:
        """The IV as the buffer holds it now (after an encryption: what the token used)."""
        return bytes(self._iv.raw[: self._iv_len])

    @property
    def overrun(self) -> bool:
        """True if the token wrote past the IV it was given."""
        return bytes(self._iv.raw[self._iv_len :]) != self._guard


class TokenIvCheck:
    """Refuses a token-generated IV that cannot be trusted to be a fresh 96-bit value.

    The token is expected to overwrite an all-zero buffer (AWS CloudHSM ignores what it
    is given; Thales ProtectServer generates when given zeros). Still zero means the token
    used the zero IV and kept it (SoftHSM does): the ciphertext is discarded. An IV seen
    in the last ``remember`` encryptions of this process means a broken generator.
    """

    def __init__(self, remember: int = 65536) -> None:
        self._remember = remember
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def accept(self, params: GcmParams) -> bytes:
        iv = params.iv
        if params.overrun:
            raise BadGateway(
                f"hsm: the token wrote a GCM IV longer than {_NONCE_BYTES} bytes; refused", backend=BACKEND
            )
        if len(iv) != _NONCE_BYTES or iv == bytes(_NONCE_BYTES):
            raise BadGateway(
                'hsm: hsm.gcm_iv is "token" but the token did not write a GCM IV back; '
                'this token takes the host\'s IV: set hsm.gcm_iv = "host"',
                backend=BACKEND,
            )
        with self._lock:
            if iv in self._seen:
                raise BadGateway(
                    "hsm: the token returned a GCM IV it returned before; refused", backend=BACKEND
                )
            self._seen[iv] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        return iv


class HsmKeys(PerItemBatches):
    """Keys as PKCS#11 token objects: one object (or key pair) per version.

    The material reference is the hex CKA_ID of the version's objects; all objects of
    a key share the label ``kb:<name>``. Keys are generated inside the token as
    sensitive, non-extractable objects. AES-GCM uses a fresh 96-bit IV per message
    and the canonical context as AAD; the payload is ``iv || ciphertext || tag`` in
    both ``hsm.gcm_iv`` modes, so either mode decrypts what the other wrote.

    ``host``: the IV is ``os.urandom`` (the kernel CSPRNG): it need only be unique, not
    secret, and drawing it here saves a token round trip under the process-wide PKCS#11
    lock. The token must use it unchanged. ``token``: the token generates it and writes
    it back into the parameter buffer; :class:`TokenIvCheck` decides whether to trust it.
    """

    name = Backend.HSM
    key_types = frozenset({KeyType.AES256_GCM, KeyType.ECDSA_P256})
    material_takes_name = False  # each version is an object with its own random id

    def __init__(self, client: HsmClient) -> None:
        self._hsm = client
        self._token_iv = client.config.gcm_iv == "token"
        self._iv_check = TokenIvCheck()

    async def create_key(self, key: KeyRef) -> str:
        # Every version is fresh material under a new id: nothing to adopt by name.
        return await self.create_version(key)

    async def finish_create(self, key: KeyRef, since: datetime) -> str:
        # Material made late for a lost creation cannot be told from anyone's: make new (the
        # late one, if any, stays unused; it holds no version of any key).
        return await self.create_version(key)

    async def create_version(self, key: KeyRef) -> str:
        object_id = os.urandom(16)
        label = object_label(key.name)

        def generate(session: Any) -> None:
            if key.type is KeyType.AES256_GCM:
                session.generate_key(
                    KeyType_.AES, 256, label=label, id=object_id, store=True, template=_AES_TEMPLATE
                )
                return
            generate_p256(session, label, object_id)

        await self._hsm.run(generate, what="generate key", repeatable=False)
        return object_id.hex()

    @staticmethod
    def _find(session: Any, key: KeyRef, ref: str, cls: ObjectClass) -> Any:
        try:
            object_id = bytes.fromhex(ref)
        except ValueError:
            raise NotFound(f"hsm: malformed object reference for key {key.name}") from None
        return HsmClient.find_key(session, object_label(key.name), object_id, cls)

    def _seal(self, session: Any, key: KeyRef, ref: str, plaintext: bytes, aad: bytes) -> bytes:
        secret = self._find(session, key, ref, ObjectClass.SECRET_KEY)
        host_iv = bytes(_NONCE_BYTES) if self._token_iv else os.urandom(_NONCE_BYTES)
        params = GcmParams(host_iv, aad, _TAG_BITS)  # kept until the token has written into it
        sealed = bytes(secret.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params.raw))
        if self._token_iv:
            return self._iv_check.accept(params) + sealed
        if params.iv != host_iv or params.overrun:
            # The token used an IV of its own; storing ours would make the ciphertext undecryptable.
            raise BadGateway(
                'hsm: hsm.gcm_iv is "host" but the token replaced the IV; this token generates '
                'its own: set hsm.gcm_iv = "token"',
                backend=BACKEND,
            )
        return host_iv + sealed

    async def encrypt(self, key: KeyRef, ref: str, plaintext: bytes, context: Context) -> bytes:
        aad = canonical_context(context)
        return await self._hsm.run(lambda s: self._seal(s, key, ref, plaintext, aad), what="aes-gcm encrypt")

    def _open(self, session: Any, key: KeyRef, ref: str, payload: bytes, aad: bytes) -> bytes:
        if len(payload) < _NONCE_BYTES + _TAG_BITS // 8:
            raise DecryptionFailed()
        secret = self._find(session, key, ref, ObjectClass.SECRET_KEY)
        nonce, sealed = payload[:_NONCE_BYTES], payload[_NONCE_BYTES:]
        # A name, not a temporary: its ctypes buffers must outlive the call that points at them.
        params = GcmParams(nonce, aad, _TAG_BITS)
        try:
            return bytes(secret.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params.raw))
        except (p11err.GeneralError, p11err.EncryptedDataInvalid, p11err.EncryptedDataLenRange) as exc:
            # SoftHSM reports a failed GCM tag as a general error; real HSMs as invalid data.
            raise DecryptionFailed() from exc

    async def decrypt(self, key: KeyRef, ref: str, payload: bytes, context: Context) -> bytes:
        aad = canonical_context(context)
        return await self._hsm.run(lambda s: self._open(s, key, ref, payload, aad), what="aes-gcm decrypt")

    async def reencrypt(
        self, key: KeyRef, src_ref: str, dst_ref: str, payload: bytes, context: Context
    ) -> bytes:
        aad = canonical_context(context)

        def run(session: Any) -> bytes:
            plaintext = self._open(session, key, src_ref, payload, aad)
            return self._seal(session, key, dst_ref, plaintext, aad)

        return await self._hsm.run(run, what="aes-gcm rewrap")

    async def data_key(self, key: KeyRef, ref: str, nbytes: int, context: Context) -> tuple[bytes, bytes]:
        aad = canonical_context(context)

        def run(session: Any) -> tuple[bytes, bytes]:
            # The token's own RNG draws the data key; it leaves the HSM only in this response.
            plaintext = bytes(session.generate_random(nbytes * 8))
            return plaintext, self._seal(session, key, ref, plaintext, aad)

        return await self._hsm.run(run, what="generate data key")

    async def sign(self, key: KeyRef, ref: str, digest: bytes) -> bytes:
        def run(session: Any) -> bytes:
            private = self._find(session, key, ref, ObjectClass.PRIVATE_KEY)
            return encode_ecdsa_signature(private.sign(digest, mechanism=Mechanism.ECDSA))

        return await self._hsm.run(run, what="ecdsa sign")

    async def verify(self, key: KeyRef, ref: str, digest: bytes, signature: bytes) -> bool:
        def run(session: Any) -> bool:
            public = self._find(session, key, ref, ObjectClass.PUBLIC_KEY)
            try:
                raw = decode_ecdsa_signature(signature)
            except (ValueError, TypeError):
                return False
            try:
                return bool(public.verify(digest, raw, mechanism=Mechanism.ECDSA))
            except (p11err.SignatureInvalid, p11err.SignatureLenRange):
                return False

        return await self._hsm.run(run, what="ecdsa verify")

    async def set_enabled(self, key: KeyRef, refs: Sequence[str], enabled: bool) -> None:
        # PKCS#11 has no portable disable; the broker refuses operations on a suspended key.
        return None

    async def set_min_decryption(self, key: KeyRef, refs: Sequence[str]) -> None:
        return None

    async def schedule_destruction(self, key: KeyRef, refs: Sequence[str], pending_days: int) -> None:
        return None

    async def cancel_destruction(self, key: KeyRef, refs: Sequence[str]) -> None:
        return None

    async def destroy(self, key: KeyRef, refs: Sequence[str]) -> None:
        wanted = {bytes.fromhex(r) for r in refs}

        def run(session: Any) -> int:
            doomed = [
                obj
                for obj in session.get_objects({Attribute.LABEL: object_label(key.name)})
                if bytes(obj[Attribute.ID]) in wanted
            ]
            for obj in doomed:
                obj.destroy()
            return len(doomed)

        try:
            await self._hsm.run(run, what="destroy objects")
        finally:
            self._hsm.forget_objects()


AUDIT_KEY_LABEL = "kb-audit:checkpoint"


def audit_key_label(node: str) -> str:
    """Each node signs with its own key: one writer per key, so replicas never race to create one."""
    return f"{AUDIT_KEY_LABEL}:{node}"


class HsmAuditSigner:
    """Signs audit checkpoints with this node's P-256 key pair, made in the token on first use.

    Creation is race-free without a lock: a creator generates a pair with a random CKA_ID
    under the node's label, then looks at every pair with that label, and every writer
    picks the same one (the smallest CKA_ID). So two processes that both found no key end
    up signing with one key, and a lookup never fails on "more than one object".
    """

    def __init__(self, client: HsmClient, node: str = "broker") -> None:
        self._hsm = client
        self._label = audit_key_label(node)

    def _pair(self, session: Any) -> tuple[Any, Any]:
        pairs = self._pairs(session)
        if not pairs:
            generate_p256(session, self._label, os.urandom(16))
            pairs = self._pairs(session)
        if not pairs:
            raise Unavailable("hsm: the audit checkpoint key could not be created", backend=BACKEND)
        return pairs[min(pairs)]

    def _pairs(self, session: Any, label: str | None = None) -> dict[bytes, tuple[Any, Any]]:
        """Every complete (private, public) pair under this node's label (or ``label``), by CKA_ID."""

        def by_id(kind: ObjectClass) -> dict[bytes, Any]:
            found = session.get_objects({Attribute.LABEL: label or self._label, Attribute.CLASS: kind})
            return {bytes(o[Attribute.ID]): o for o in found}

        privates, publics = by_id(ObjectClass.PRIVATE_KEY), by_id(ObjectClass.PUBLIC_KEY)
        return {i: (privates[i], publics[i]) for i in privates.keys() & publics.keys()}

    async def sign_digest(self, digest: bytes) -> bytes:
        def run(session: Any) -> bytes:
            private, _ = self._pair(session)
            return bytes(private.sign(digest, mechanism=Mechanism.ECDSA))

        return await self._hsm.run(run, what="sign audit checkpoint")

    async def public_key_der(self) -> bytes:
        def run(session: Any) -> bytes:
            _, public = self._pair(session)
            return bytes(encode_ec_public_key(public))

        return await self._hsm.run(run, what="read audit public key")

    async def retired_public_keys_der(self) -> list[bytes]:
        """Keys older logs were signed with: before per-node keys every node shared one label."""

        def run(session: Any) -> list[bytes]:
            pairs = self._pairs(session, AUDIT_KEY_LABEL)
            return [bytes(encode_ec_public_key(pairs[i][1])) for i in sorted(pairs)]

        return await self._hsm.run(run, what="read retired audit public keys")
