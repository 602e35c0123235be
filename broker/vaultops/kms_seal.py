"""The KMS key OpenBao's awskms seal unseals with, behind an alias (for a KMS stand-in: compose)."""

from __future__ import annotations


def ensure_unseal_key(endpoint: str, alias: str, region: str) -> str:
    """The KMS stand-in's unseal key behind ``alias``, made on first use; its key id."""
    import boto3

    kms = boto3.client("kms", endpoint_url=endpoint, region_name=region)
    for page in kms.get_paginator("list_aliases").paginate():
        for entry in page["Aliases"]:
            if entry.get("AliasName") == alias and entry.get("TargetKeyId"):
                return str(entry["TargetKeyId"])
    key_id = str(kms.create_key(Description="OpenBao unseal key (keybroker compose)")["KeyMetadata"]["KeyId"])
    kms.create_alias(AliasName=alias, TargetKeyId=key_id)
    return key_id
