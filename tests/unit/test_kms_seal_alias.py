"""deploy kms-key (the compose unseal key): what the alias names decides who won, never the error.

KMS is faked here: the cases are answers lost in flight, which the real stand-in cannot be made to
lose on demand (the concurrent-runs case runs against the real moto server in
tests/integration/test_deploy_kms.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import ClientError

from broker.errors import BackendError
from broker.vaultops import kms_seal

ALIAS = "alias/openbao-unseal"


class FakeKms:
    """Aliases and deletions in memory; ``create_alias`` behaves as the case says."""

    def __init__(self, on_alias: str, other: str = "key-of-another-run") -> None:
        self.aliases: dict[str, str] = {}
        self.pending_deletion: list[str] = []
        self._on_alias = on_alias
        self._other = other

    def get_paginator(self, _name: str) -> Any:
        rows = [{"AliasName": a, "TargetKeyId": k} for a, k in self.aliases.items()]
        return SimpleNamespace(paginate=lambda: [{"Aliases": rows}])

    def create_key(self, **_: Any) -> dict[str, Any]:
        return {"KeyMetadata": {"KeyId": "key-made-by-this-run"}}

    def create_alias(self, AliasName: str, TargetKeyId: str) -> None:
        exists: Any = {"Error": {"Code": "AlreadyExistsException", "Message": "exists"}}
        if self._on_alias == "ours-applied-answer-lost":
            self.aliases[AliasName] = TargetKeyId  # applied; botocore's resend meets it
            raise ClientError(exists, "CreateAlias")
        if self._on_alias == "another-run-won":
            self.aliases[AliasName] = self._other
            raise ClientError(exists, "CreateAlias")
        if self._on_alias == "refused":
            raise ClientError({"Error": {"Code": "KMSInternalException", "Message": "x"}}, "CreateAlias")
        self.aliases[AliasName] = TargetKeyId

    def schedule_key_deletion(self, KeyId: str, PendingWindowInDays: int) -> None:
        self.pending_deletion.append(KeyId)


def _run(monkeypatch: pytest.MonkeyPatch, fake: FakeKms) -> str:
    import boto3

    monkeypatch.setattr(boto3, "client", lambda *a, **k: fake)
    return kms_seal.ensure_unseal_key("http://127.0.0.1:1", ALIAS, "us-east-1")


def test_our_alias_applied_but_its_answer_lost_keeps_our_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """AlreadyExists about the alias this very run made: our key is the unseal key, never deleted
    (it was: OpenBao could not unseal once the 7-day window ended)."""
    fake = FakeKms("ours-applied-answer-lost")
    assert _run(monkeypatch, fake) == "key-made-by-this-run"
    assert fake.pending_deletion == []


def test_a_run_that_lost_takes_the_winners_key_and_discards_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeKms("another-run-won")
    assert _run(monkeypatch, fake) == "key-of-another-run"
    assert fake.pending_deletion == ["key-made-by-this-run"]


def test_a_refused_alias_naming_nothing_discards_the_unnamed_key_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeKms("refused")
    with pytest.raises(BackendError):
        _run(monkeypatch, fake)
    assert fake.pending_deletion == ["key-made-by-this-run"]
    assert fake.aliases == {}
