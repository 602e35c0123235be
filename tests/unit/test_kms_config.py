"""``kms.deadline_seconds``: defaulted like Vault's, overridable, and refused when one attempt
(``kms.timeout_seconds``) cannot fit in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config.load import load_config
from broker.errors import ConfigError
from tests.unit.test_config import VALID, write


def test_kms_deadline_defaults_to_eight_seconds_and_is_overridden(tmp_path: Path) -> None:
    """The default bounds a KMS call like vault.deadline_seconds; the environment can lower it."""
    path = write(tmp_path, VALID)
    assert load_config(path, environ={}).kms.deadline_seconds == 8.0
    lowered = load_config(
        path, environ={"KEYBROKER__KMS__DEADLINE_SECONDS": "2", "KEYBROKER__KMS__TIMEOUT_SECONDS": "1"}
    )
    assert (lowered.kms.deadline_seconds, lowered.kms.timeout_seconds) == (2.0, 1.0)


@pytest.mark.parametrize("deadline", ["4.9", "0", "-1"])
def test_kms_deadline_shorter_than_one_attempt_is_refused(tmp_path: Path, deadline: str) -> None:
    """A deadline below kms.timeout_seconds (5 s) is a config error naming the key."""
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, VALID), environ={"KEYBROKER__KMS__DEADLINE_SECONDS": deadline})
    assert refused.value.key == "kms.deadline_seconds"


@pytest.mark.parametrize("attempts", ["0", "-1", "11"])
def test_kms_attempts_outside_one_to_ten_are_refused(tmp_path: Path, attempts: str) -> None:
    """0 would make botocore refuse at start-up with its own traceback; a config error names the key."""
    with pytest.raises(ConfigError) as refused:
        load_config(write(tmp_path, VALID), environ={"KEYBROKER__KMS__MAX_ATTEMPTS": attempts})
    assert refused.value.key == "kms.max_attempts"
