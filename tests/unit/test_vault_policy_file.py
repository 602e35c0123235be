"""The Vault policy kept in vault/policies/ is exactly what bootstrap writes."""

from __future__ import annotations

from pathlib import Path

from broker.vaultops.policy import Mounts, render_broker_policy

REPO = Path(__file__).parents[2]


def test_policy_file_matches_rendered_policy() -> None:
    """Admins review the file; bootstrap writes the rendering: they must not drift."""
    on_disk = (REPO / "vault" / "policies" / "keybroker-broker.hcl").read_text()

    assert on_disk == render_broker_policy(Mounts())


def test_policy_is_least_privilege() -> None:
    """No sys/ paths, no wildcard mounts, no sudo."""
    text = render_broker_policy(Mounts())

    assert 'path "sys/' not in text
    assert 'path "*' not in text
    assert "sudo" not in text


def test_policy_grants_no_pki_and_one_key_segment_in_transit() -> None:
    """The broker mints no certificates, and a transit grant never spans more than one key name."""
    text = render_broker_policy(Mounts())

    assert "kb-pki" not in text
    transit_paths = [line for line in text.splitlines() if line.startswith('path "kb-transit/')]
    assert transit_paths
    assert all("*" not in line for line in transit_paths)
