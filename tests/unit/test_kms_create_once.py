"""A KMS call that creates a key: retried only when KMS answered that it did not do it, never
after a request that may have reached it (CreateKey has no client token). KMS is faked: the
failures are botocore's own exception types, the loop is the broker's."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import botocore.exceptions
import pytest

from broker.backends.kms import KmsClient
from broker.config.model import KmsConfig
from broker.errors import BadGateway, OutcomeUnknown


def _client() -> KmsClient:
    kms = KmsClient(KmsConfig(region="us-east-1", timeout_seconds=1.0, max_attempts=3, deadline_seconds=5.0))
    kms._client = kms._once = cast(Any, object())  # the fakes below never use it
    return kms


def _answered(status: int, code: str) -> botocore.exceptions.ClientError:
    response: Any = {"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return botocore.exceptions.ClientError(response, "CreateKey")


def _script(*steps: BaseException | dict[str, Any]) -> tuple[list[int], Any]:
    calls: list[int] = []

    def fn(_client: object) -> dict[str, Any]:
        calls.append(1)
        step = steps[len(calls) - 1]
        if isinstance(step, BaseException):
            raise step
        return step

    return calls, fn


def test_a_refusal_kms_answered_is_tried_again_within_the_attempts() -> None:
    """Throttled, then KMS's internal error, then made: one key, three requests."""
    made = {"KeyMetadata": {"KeyId": "k-1"}}
    calls, fn = _script(_answered(400, "ThrottlingException"), _answered(500, "KMSInternalException"), made)
    out = asyncio.run(_client().call("create key", fn, repeatable=False))
    assert out == made
    assert len(calls) == 3


def test_a_request_that_may_have_reached_kms_is_never_sent_again() -> None:
    """A read timeout: KMS may have made the key; one request, and the outcome is unknown (504)."""
    calls, fn = _script(botocore.exceptions.ReadTimeoutError(endpoint_url="https://kms"), {})
    with pytest.raises(OutcomeUnknown) as unknown:
        asyncio.run(_client().call("create key", fn, repeatable=False))
    assert len(calls) == 1
    assert (unknown.value.status, unknown.value.code) == (504, "outcome_unknown")


def test_a_refusal_that_says_something_is_wrong_is_not_retried() -> None:
    """A 400 other than throttling (a bad request, a quota) is the answer, after one request."""
    calls, fn = _script(_answered(400, "LimitExceededException"), {})
    with pytest.raises(BadGateway):
        asyncio.run(_client().call("create key", fn, repeatable=False))
    assert len(calls) == 1
