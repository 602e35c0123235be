"""The error tree and its problem+json rendering."""

from __future__ import annotations

import json

import pytest

from broker import errors
from broker.api.middleware import valid_request_id
from broker.api.problem import PROBLEM_CONTENT_TYPE, problem_response


def all_error_classes() -> list[type[errors.BrokerError]]:
    found: list[type[errors.BrokerError]] = []
    stack: list[type[errors.BrokerError]] = [errors.BrokerError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_status_matches_family(cls: type[errors.BrokerError]) -> None:
    """Client errors are 4xx, backend errors 5xx: the tree in errors.py holds."""
    if issubclass(cls, errors.ClientError):
        assert 400 <= cls.status < 500
    elif issubclass(cls, errors.BackendError):
        assert 500 <= cls.status < 600


def test_decryption_failed_never_carries_detail() -> None:
    """Which check failed is not said: that would be an oracle."""
    error = errors.DecryptionFailed("tag mismatch for key payments v3")

    assert error.detail == "Decryption failed"
    assert "payments" not in str(error)


def test_problem_document_shape() -> None:
    """RFC 9457 fields plus our code and request id."""
    response = problem_response(errors.Conflict("key payments is suspended"), "req-12345678")

    body = json.loads(response.body)  # type: ignore[arg-type]
    assert response.content_type == PROBLEM_CONTENT_TYPE
    assert response.status == 409
    assert body == {
        "type": "https://keybroker.dev/problems/conflict",
        "title": "Key state forbids this operation",
        "status": 409,
        "detail": "key payments is suspended",
        "code": "conflict",
        "request_id": "req-12345678",
    }


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("3f1c2a9e-8d4b-4c1a-9f00-1234567890ab", True),
        ("trace:abc.def-123", True),
        ("short", False),
        ("x" * 129, False),
        ("bad id with spaces", False),
        ("inject\nnewline-0000", False),
        ("", False),
        (None, False),
    ],
)
def test_request_id_acceptance(value: str | None, ok: bool) -> None:
    """Only well-formed caller request ids are kept; others are replaced."""
    assert valid_request_id(value) is ok
