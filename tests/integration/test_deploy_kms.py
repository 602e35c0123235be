"""``keybroker deploy kms-key`` against the real KMS stand-in: the unseal key is made once, then found."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


# Each run waits for the same instant, its boto3 models already loaded, so their listings, key
# creations and alias creations interleave at the KMS stand-in: the race a restarted init
# container next to the first one runs.
# One run of `deploy kms-key`'s function, released at ``start``. Its first look at the alias sees
# none, as when every run looked before any had named its key: on a loaded machine the runs may
# not overlap by themselves, and the test is about what happens when they do.
_RACER = """
import sys, time
import boto3
from broker.vaultops import kms_seal
endpoint, alias, region, start = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
boto3.client("kms", endpoint_url=endpoint, region_name=region)
real, looked = kms_seal._target, []
def first_look_sees_nothing(kms, name):
    if not looked:
        looked.append(name)
        return None
    return real(kms, name)
kms_seal._target = first_look_sees_nothing
time.sleep(max(0.0, start - time.time()))
print(kms_seal.ensure_unseal_key(endpoint, alias, region))
"""


def test_concurrent_runs_agree_on_one_key_and_discard_the_losers(stack: DevStack) -> None:
    """Four runs released at the same instant (and two CLI runs at once): every run succeeds and
    names the same key, the alias points at it, and each key a losing run made is scheduled for
    deletion (each run's first look sees no alias, so all four make a key and three lose)."""
    env = {**os.environ, **DEV_AWS_ENV}
    kms = stack.kms_client()
    before = {k["KeyId"] for k in kms.list_keys()["Keys"]}
    alias = f"alias/kb-test-race-{uuid.uuid4().hex[:8]}"
    start = time.time() + 3.0
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, stack.kms_endpoint, alias, "us-east-1", repr(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0] * 4, [err[-500:] for _, err in outputs]
    key_ids = {out.strip() for out, _ in outputs}
    assert len(key_ids) == 1, key_ids
    (key_id,) = key_ids
    assert kms.describe_key(KeyId=alias)["KeyMetadata"]["KeyId"] == key_id
    assert kms.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    made = {k["KeyId"] for k in kms.list_keys()["Keys"]} - before - {key_id}
    losers = {
        k
        for k in made
        if kms.describe_key(KeyId=k)["KeyMetadata"]["Description"] == "OpenBao unseal key (keybroker compose)"
    }
    assert len(losers) == 3, losers  # every run made a key; one named it, three lost
    for loser in losers:
        assert kms.describe_key(KeyId=loser)["KeyMetadata"]["KeyState"] == "PendingDeletion"

    cli_alias = f"alias/kb-test-race-cli-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "broker", "deploy", "kms-key", "--endpoint", stack.kms_endpoint]
    pair = [
        subprocess.Popen(
            [*cmd, "--alias", cli_alias], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    answers = [run.communicate(timeout=60) for run in pair]
    assert [run.returncode for run in pair] == [0, 0], [err for _, err in answers]
    assert answers[0][0] == answers[1][0]
    assert "Traceback" not in answers[0][1] + answers[1][1]
