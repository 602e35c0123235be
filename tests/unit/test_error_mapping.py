"""SDK errors become broker errors at the seam; a new SDK exception cannot slip through."""

from __future__ import annotations

import inspect
from typing import Any

import aiohttp
import botocore.exceptions
import pkcs11.exceptions as p11err
import pytest

from broker.backends.hsm import map_pkcs11_errors
from broker.backends.kms import map_botocore_errors
from broker.backends.vault import VaultHTTPError, map_vault_errors
from broker.errors import BackendTimeout, BadGateway, BrokerError, NotFound, Unavailable


def constructible_errors(module: object, base: type[Exception]) -> list[Exception]:
    """One instance of every ``base`` subclass in ``module`` that can be built without arguments."""
    found = []
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if not issubclass(cls, base):
            continue
        try:
            exc = cls.__new__(cls)
            Exception.__init__(exc, "x")
        except TypeError:
            continue
        found.append(exc)
    return found


def client_error(code: str) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError({"Error": {"Code": code, "Message": "m"}}, "Encrypt")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("NotFoundException", NotFound),
        ("KMSInternalException", Unavailable),
        ("ThrottlingException", Unavailable),
        ("AccessDeniedException", Unavailable),
        ("SomethingNewException", BadGateway),
    ],
)
def test_botocore_client_errors(code: str, expected: type[BrokerError]) -> None:
    """KMS error codes map by meaning; an unknown code is a 502, never a raw botocore error."""
    with pytest.raises(expected), map_botocore_errors("encrypt"):
        raise client_error(code)


def test_every_botocore_error_class_is_mapped() -> None:
    """Every BotoCoreError subclass that can be built becomes a BrokerError."""
    instances = constructible_errors(botocore.exceptions, botocore.exceptions.BotoCoreError)

    assert len(instances) > 20
    for exc in instances:
        with pytest.raises(BrokerError), map_botocore_errors("op"):
            raise exc


def test_botocore_timeouts_and_connection_errors() -> None:
    """Timeouts and unreachable endpoints alike are 503 backend_unavailable with Retry-After."""
    with pytest.raises(BackendTimeout) as timed_out, map_botocore_errors("op"):
        raise botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:1")
    assert (timed_out.value.status, timed_out.value.code) == (503, "backend_unavailable")
    assert timed_out.value.retry_after
    with pytest.raises(Unavailable), map_botocore_errors("op"):
        raise botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")


def test_every_pkcs11_error_is_mapped() -> None:
    """Each python-pkcs11 exception maps; device and session loss mean 503."""
    instances = constructible_errors(p11err, p11err.PKCS11Error)

    assert len(instances) > 50
    for exc in instances:
        with pytest.raises(BrokerError), map_pkcs11_errors("op"):
            raise exc
    for cls in (
        p11err.DeviceRemoved,
        p11err.TokenNotPresent,
        p11err.SessionHandleInvalid,
        p11err.PinIncorrect,
    ):
        with pytest.raises(Unavailable), map_pkcs11_errors("op"):
            raise cls()
    with pytest.raises(NotFound), map_pkcs11_errors("op"):
        raise p11err.NoSuchKey()


def test_every_aiohttp_client_error_is_mapped() -> None:
    """Every aiohttp client error talking to Vault becomes a BrokerError."""
    instances = constructible_errors(aiohttp, aiohttp.ClientError)

    assert len(instances) > 10
    for exc in instances:
        with pytest.raises(BrokerError), map_vault_errors("op"):
            raise exc


@pytest.mark.parametrize(
    ("status", "expected"),
    [(404, NotFound), (503, Unavailable), (429, Unavailable), (500, BadGateway), (400, BadGateway)],
)
def test_vault_http_statuses(status: int, expected: type[BrokerError]) -> None:
    """Vault's sealed (503) and rate-limited (429) answers mean unavailable."""
    with pytest.raises(expected), map_vault_errors("op"):
        raise VaultHTTPError(status, ["e"])


def test_vault_error_keeps_status_and_reasons() -> None:
    """A mapped Vault error carries the upstream status and Vault's messages as fields."""
    with pytest.raises(BadGateway) as caught, map_vault_errors("kv write"):
        raise VaultHTTPError(400, ["check-and-set parameter did not match the current version"])

    assert (
        caught.value.upstream_status,
        caught.value.reasons,
    ) == (400, ("check-and-set parameter did not match the current version",))
    assert caught.value.says(400, "check-and-set")
    assert not caught.value.says(500, "check-and-set")
    assert not caught.value.says(400, "transaction commit failed")


def test_kms_error_keeps_code_and_status() -> None:
    """A mapped KMS error carries the KMS error code and HTTP status as fields."""
    response: Any = {
        "Error": {"Code": "InvalidCiphertextException", "Message": "m"},
        "ResponseMetadata": {"HTTPStatusCode": 400},
    }
    error = botocore.exceptions.ClientError(response, "Decrypt")
    with pytest.raises(BadGateway) as caught, map_botocore_errors("decrypt"):
        raise error

    assert (
        caught.value.upstream_code,
        caught.value.upstream_status,
        caught.value.reasons,
    ) == ("InvalidCiphertextException", 400, ("m",))


def test_pkcs11_error_keeps_exception_name() -> None:
    """A mapped PKCS#11 error names the library's exception class, which decides session reuse."""
    with pytest.raises(Unavailable) as caught, map_pkcs11_errors("sign"):
        raise p11err.SessionClosed()

    assert caught.value.upstream_code == "SessionClosed"
