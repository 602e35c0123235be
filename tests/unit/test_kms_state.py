"""The dev KMS stand-in keeps keys (and their material) across a restart."""

from __future__ import annotations

import stat
from pathlib import Path

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.kms.models import kms_backends

from broker.devstack.kms_server import KmsState


def test_state_round_trip_keeps_material_and_state(tmp_path: Path) -> None:
    """Saved keys come back with the same id, material, state and tags; the file is 0600."""
    backend = kms_backends[DEFAULT_ACCOUNT_ID]["eu-central-1"]
    sym = backend.create_key(
        None, "ENCRYPT_DECRYPT", "SYMMETRIC_DEFAULT", "sym", [{"TagKey": "t", "TagValue": "v"}]
    )
    ecc = backend.create_key(None, "SIGN_VERIFY", "ECC_NIST_P256", "ecc", None)
    backend.disable_key(ecc.id)
    material = sym.key_material
    state = KmsState(tmp_path / "kms.state")

    state.save()
    backend.keys.clear()
    restored = state.load()

    again = kms_backends[DEFAULT_ACCOUNT_ID]["eu-central-1"]
    assert restored >= 2
    assert again.keys[sym.id].key_material == material
    assert again.keys[ecc.id].key_state == "Disabled"
    assert again.tagger.list_tags_for_resource(sym.id)["Tags"] == [{"TagKey": "t", "TagValue": "v"}]
    assert stat.S_IMODE((tmp_path / "kms.state").stat().st_mode) == 0o600


def test_missing_state_file_loads_nothing(tmp_path: Path) -> None:
    """A first start has no state to restore."""
    assert KmsState(tmp_path / "absent").load() == 0
