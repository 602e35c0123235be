"""Initialise a PKCS#11 token from PINs held in memory, never on a command line.

``softhsm2-util --init-token`` takes the PINs only as arguments (visible to every user of the
host in ``ps`` and ``/proc/*/cmdline``) or from a terminal, and python-pkcs11 0.10 has no
``C_InitToken``; so the few calls needed (pkcs11f.h: C_InitToken, then C_InitPIN in a security
officer session) are made here through ctypes on the module's exported functions. Used by
``keybroker deploy hsm-token`` (the compose file's ``hsm-init``) and by the dev stack.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

# pkcs11t.h (PKCS#11 2.40).
CKR_OK = 0x000
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_USER_NOT_LOGGED_IN = 0x101
CKF_TOKEN_INITIALIZED = 0x400
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKU_SO = 0
CKU_USER = 1
_RV_NAMES = {
    0x003: "CKR_SLOT_ID_INVALID",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x007: "CKR_ARGUMENTS_BAD",
    0x030: "CKR_DEVICE_ERROR",
    0x054: "CKR_FUNCTION_NOT_SUPPORTED",
    0x0A0: "CKR_PIN_INCORRECT",
    0x0A1: "CKR_PIN_INVALID",
    0x0A2: "CKR_PIN_LEN_RANGE",
    0x0A4: "CKR_PIN_LOCKED",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E2: "CKR_TOKEN_WRITE_PROTECTED",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x103: "CKR_USER_TYPE_INVALID",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
}
LABEL_BYTES = 32


class TokenError(Exception):
    """The token could not be found, initialised or opened; the message names no PIN."""


class _TokenInfo(ctypes.Structure):
    """CK_TOKEN_INFO: only ``label`` and ``flags`` are read, the rest sizes the buffer."""

    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", ctypes.c_ulong),
        ("counts", ctypes.c_ulong * 10),
        ("hardwareVersion", ctypes.c_ubyte * 2),
        ("firmwareVersion", ctypes.c_ubyte * 2),
        ("utcTime", ctypes.c_char * 16),
    ]


@dataclass(frozen=True)
class TokenState:
    """What :func:`ensure_token` did: ``initialised`` a new token, or found one its PIN opened."""

    label: str
    slot: int
    initialised: bool


def _name(rv: int) -> str:
    return _RV_NAMES.get(rv, f"CK_RV 0x{rv:x}")


def padded_label(label: str) -> bytes:
    """The 32-byte blank-padded CK_TOKEN_INFO form of ``label``; TokenError when it does not fit."""
    raw = label.encode("utf-8")
    if not raw or len(raw) > LABEL_BYTES or raw != raw.strip():
        raise TokenError(f"token label {label!r} must be 1-32 bytes without leading or trailing blanks")
    return raw.ljust(LABEL_BYTES, b" ")


class _Module:
    """The exported C_* functions of one PKCS#11 module, each call's CK_RV checked."""

    def __init__(self, path: str) -> None:
        try:
            self._lib = ctypes.CDLL(path)
        except OSError as exc:
            raise TokenError(f"cannot load the PKCS#11 module {path}: {exc}") from None
        self.path = path

    def call(self, function: str, *args: object, ok: tuple[int, ...] = (CKR_OK,)) -> int:
        try:
            fn = getattr(self._lib, function)
        except AttributeError:
            raise TokenError(f"{self.path} does not export {function}") from None
        fn.restype = ctypes.c_ulong
        rv = int(fn(*args))
        if rv not in ok:
            raise TokenError(f"{function} failed: {_name(rv)}")
        return rv


def _slots(module: _Module) -> list[int]:
    count = ctypes.c_ulong(0)
    module.call("C_GetSlotList", ctypes.c_ubyte(1), None, ctypes.byref(count))
    slots = (ctypes.c_ulong * max(count.value, 1))()
    module.call("C_GetSlotList", ctypes.c_ubyte(1), slots, ctypes.byref(count))
    return [int(slots[i]) for i in range(count.value)]


def _token_info(module: _Module, slot: int) -> _TokenInfo:
    info = _TokenInfo()
    module.call("C_GetTokenInfo", ctypes.c_ulong(slot), ctypes.byref(info))
    return info


def _login(module: _Module, slot: int, user_type: int, pin: bytes, *, rw: bool) -> ctypes.c_ulong:
    """An open session on ``slot`` logged in as ``user_type``; the caller closes it."""
    session = ctypes.c_ulong(0)
    flags = CKF_SERIAL_SESSION | (CKF_RW_SESSION if rw else 0)
    module.call(
        "C_OpenSession", ctypes.c_ulong(slot), ctypes.c_ulong(flags), None, None, ctypes.byref(session)
    )
    try:
        module.call(
            "C_Login",
            session,
            ctypes.c_ulong(user_type),
            ctypes.c_char_p(pin),
            ctypes.c_ulong(len(pin)),
            ok=(CKR_OK, CKR_USER_ALREADY_LOGGED_IN),
        )
    except TokenError:
        module.call("C_CloseSession", session)
        raise
    return session


def _close(module: _Module, session: ctypes.c_ulong) -> None:
    module.call("C_Logout", session, ok=(CKR_OK, CKR_USER_NOT_LOGGED_IN))
    module.call("C_CloseSession", session)


def ensure_token(library: str, label: str, *, user_pin: str, so_pin: str) -> TokenState:
    """Make sure ``library`` has an initialised token ``label`` that ``user_pin`` opens.

    A token with that label already there is only checked (a user login with ``user_pin``):
    running this twice is harmless, and a PIN file that does not match the token fails here
    rather than in the brokers. Otherwise the first uninitialised token is initialised with
    ``so_pin`` and ``label``, and its user PIN set to ``user_pin``.
    """
    wanted = padded_label(label)
    user, so = user_pin.encode("utf-8"), so_pin.encode("utf-8")
    module = _Module(library)
    # Initialised here, so finalised here; a process that already holds the module initialised
    # keeps it (finalising would close its sessions).
    started = module.call("C_Initialize", None, ok=(CKR_OK, CKR_CRYPTOKI_ALREADY_INITIALIZED)) == CKR_OK
    try:
        infos = {slot: _token_info(module, slot) for slot in _slots(module)}
        for slot, info in infos.items():
            if info.flags & CKF_TOKEN_INITIALIZED and bytes(info.label).ljust(LABEL_BYTES, b" ") == wanted:
                try:
                    _close(module, _login(module, slot, CKU_USER, user, rw=False))
                except TokenError as exc:
                    raise TokenError(f"token {label!r} exists, but its user PIN was refused: {exc}") from None
                return TokenState(label=label, slot=slot, initialised=False)
        free = [slot for slot, info in infos.items() if not info.flags & CKF_TOKEN_INITIALIZED]
        if not free:
            raise TokenError(f"no token {label!r} and no uninitialised token to make it from in {library}")
        slot = free[0]
        module.call("C_InitToken", ctypes.c_ulong(slot), ctypes.c_char_p(so), ctypes.c_ulong(len(so)), wanted)
        session = _login(module, slot, CKU_SO, so, rw=True)
        try:
            module.call("C_InitPIN", session, ctypes.c_char_p(user), ctypes.c_ulong(len(user)))
        finally:
            _close(module, session)
        return TokenState(label=label, slot=slot, initialised=True)
    finally:
        if started:
            # Its CK_RV would only hide the error (or result) above: nothing is left to undo.
            module.call("C_Finalize", None, ok=tuple(range(0x200)))
