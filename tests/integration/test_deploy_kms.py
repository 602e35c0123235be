"""``keybroker deploy kms-key`` against the real KMS stand-in: the unseal key is made once, then found."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from broker.devstack.stack import DEV_AWS_ENV, DevStack


def test_kms_key_is_created_once_behind_its_alias(stack: DevStack) -> None:
    """Two runs: the first makes a key and the alias, the second finds the same key (no second key)."""
    alias = f"alias/kb-test-unseal-{uuid.uuid4().hex[:8]}"
    cmd = [
        sys.executable,
        "-m",
        "broker",
        "deploy",
        "kms-key",
        "--endpoint",
        stack.kms_endpoint,
        "--alias",
        alias,
    ]
    env = {**os.environ, **DEV_AWS_ENV}
    first = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60, env=env)
    second = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60, env=env)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout == second.stdout
    key_id = first.stdout.split(" -> ")[1].strip()
    kms = stack.kms_client()
    targets = [a.get("TargetKeyId") for a in kms.list_aliases()["Aliases"] if a["AliasName"] == alias]
    assert targets == [key_id]
    assert kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyState"] == "Enabled"
