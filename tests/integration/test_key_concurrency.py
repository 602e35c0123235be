"""Two broker replicas on one Vault: concurrent rotations lose nothing, scheduled ones happen once."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from broker.devstack.stack import DevStack
from tests.integration.conftest import Reply, https
from tests.integration.keyops import create_key, decrypt, encrypt, key_service, registry_record, run, unb64

ROTATIONS = 50
KEY_CACHE_SECONDS = 1.0  # keys.cache_seconds, the default the dev stack runs with


@pytest.mark.parametrize("backend", ["vault", "kms", "hsm"])
def test_concurrent_rotations_through_two_replicas_lose_no_version(
    stack: DevStack, second_broker: str, backend: str
) -> None:
    """50 rotations at once, alternating replicas: every rotation answered 200 has its own version
    and material, none lost: versions 1..1+answered. A rotation may instead answer 504
    outcome_unknown when the backend (moto's KMS under a loaded machine) does not confirm in time:
    that answer promises nothing was recorded, and nothing is."""
    name = create_key(stack, backend)
    sealed = encrypt(stack, name, b"before the storm").json()["ciphertext"]
    urls = [stack.broker_url, second_broker]

    def rotate(i: int) -> Reply:
        return https(stack, f"/v1/keys/{name}/rotate", body={}, url=urls[i % 2])

    with ThreadPoolExecutor(max_workers=ROTATIONS) as pool:
        replies = list(pool.map(rotate, range(ROTATIONS)))

    record = registry_record(stack, name)
    numbers = [v["version"] for v in record["versions"]]
    materials = [v["material"] for v in record["versions"]]
    time.sleep(KEY_CACHE_SECONDS)  # a replica may encrypt under the version it saw last, for this long
    after = encrypt(stack, name, b"after", url=second_broker).json()["ciphertext"]
    answered = [r for r in replies if r.status == 200]
    unknown = [r for r in replies if r.status != 200]
    assert all(r.status == 504 and r.json()["code"] == "outcome_unknown" for r in unknown), [
        r.body[:300] for r in unknown
    ]
    assert len(answered) >= ROTATIONS // 2, f"{len(unknown)} of {ROTATIONS} rotations were not confirmed"
    assert sorted(r.json()["latest_version"] for r in answered) == list(range(2, len(answered) + 2))
    assert numbers == list(range(1, len(answered) + 2))
    assert len(set(materials)) == len(answered) + 1
    assert after.startswith(f"kb1:{name}:{len(answered) + 1}:")
    assert unb64(decrypt(stack, name, sealed).json()["plaintext"]) == b"before the storm"


def test_scheduled_rotation_happens_once_across_replicas(stack: DevStack) -> None:
    """When the period has passed, two replicas' schedulers race; exactly one rotates."""
    name = create_key(stack, "vault", rotation_period="1d")
    later = datetime.now(UTC) + timedelta(days=1, seconds=1)

    async def race() -> list[object]:
        async with key_service(stack, lambda: later) as a, key_service(stack, lambda: later) as b:
            return list(await asyncio.gather(a.rotate_if_due(name), b.rotate_if_due(name)))

    results = run(race())
    again = run(_once_more(stack, name, later + timedelta(hours=1)))

    versions = [v["version"] for v in registry_record(stack, name)["versions"]]
    assert sum(r is not None for r in results) == 1
    assert again is None
    assert versions == [1, 2]


async def _once_more(stack: DevStack, name: str, when: datetime) -> object:
    async with key_service(stack, lambda: when) as service:
        return await service.rotate_if_due(name)
