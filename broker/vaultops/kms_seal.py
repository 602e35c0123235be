"""The KMS key OpenBao's awskms seal unseals with, behind an alias (for a KMS stand-in: compose).

Idempotent under a race: two runs at once (a restarted init container next to the first) may
both make a key, but only one alias can exist; the run that loses takes the winner's key and
schedules its own, never used, for deletion. Both print the same key id.
"""

from __future__ import annotations

import contextlib
from typing import Any

from broker.errors import BackendError, BadGateway


def _target(kms: Any, alias: str) -> str | None:
    for page in kms.get_paginator("list_aliases").paginate():
        for entry in page["Aliases"]:
            if entry.get("AliasName") == alias and entry.get("TargetKeyId"):
                return str(entry["TargetKeyId"])
    return None


def ensure_unseal_key(endpoint: str, alias: str, region: str) -> str:
    """The KMS stand-in's unseal key behind ``alias``, made on first use; its key id.

    A KMS failure is raised as a broker error (a one-line CLI message, never a traceback)."""
    import boto3

    from broker.backends.kms import map_botocore_errors

    kms = boto3.client("kms", endpoint_url=endpoint, region_name=region)
    with map_botocore_errors("find the unseal key's alias"):
        found = _target(kms, alias)
    if found is not None:
        return found
    with map_botocore_errors("create the unseal key"):
        made = kms.create_key(Description="OpenBao unseal key (keybroker compose)")
    key_id = str(made["KeyMetadata"]["KeyId"])
    failure: BackendError | None = None
    try:
        with map_botocore_errors("name the unseal key"):
            kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    except BackendError as exc:
        failure = exc
    else:
        return key_id
    # The alias may exist all the same: another run named its key first, or our own request
    # reached KMS and only its answer was lost (botocore then resends it and hears
    # AlreadyExists about our own alias). Only what the alias names decides, never the error.
    with map_botocore_errors("find the unseal key's alias"):
        winner = _target(kms, alias)
    if winner == key_id:
        return key_id
    if winner is None:
        if failure.upstream_code == "AlreadyExistsException":
            raise BadGateway(f"kms: {alias} exists but names no key", backend="kms") from failure
        # Nothing names our key: unused, so discarded; the next run makes another.
        _discard(kms, key_id)
        raise failure
    _discard(kms, key_id)
    return winner


def _discard(kms: Any, key_id: str) -> None:
    """Schedule the key this run made but could not name for deletion (best effort: unused either way)."""
    with contextlib.suppress(Exception):
        kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)
