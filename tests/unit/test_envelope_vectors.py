"""The checked-in kbe1 test vectors (docs/vectors/) open with their raw data key, and sealing the
same inputs reproduces them byte for byte (so the doc, the vectors and the code agree)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from broker.envelope import TamperedMessage, open_with_data_key, read_header, seal_with_data_key
from broker.envelope.format import derive

VECTORS = sorted((Path(__file__).resolve().parents[2] / "docs" / "vectors").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def test_there_are_vectors() -> None:
    assert len(VECTORS) >= 4


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_vector_opens_with_its_data_key(path: Path) -> None:
    """The message decrypts to the plaintext with the raw data key (no broker)."""
    v = load(path)
    out = io.BytesIO()
    header = open_with_data_key(
        bytes.fromhex(v["data_key_hex"]), io.BytesIO(bytes.fromhex(v["message_hex"])), out, v["context"]
    )
    assert out.getvalue() == bytes.fromhex(v["plaintext_hex"])
    assert list(header.wrapped) == v["wrapped_keys"]
    assert header.frame_size == v["frame_size"]
    assert header.message_id.hex() == v["message_id_hex"]


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_sealing_the_fixed_inputs_reproduces_the_vector(path: Path) -> None:
    """Same data key, message id, frame size, context and wrapped keys: the same bytes, and the
    documented intermediate values (commitment, header key, frame key)."""
    v = load(path)
    data_key, message_id = bytes.fromhex(v["data_key_hex"]), bytes.fromhex(v["message_id_hex"])
    out = io.BytesIO()
    seal_with_data_key(
        data_key,
        v["wrapped_keys"],
        io.BytesIO(bytes.fromhex(v["plaintext_hex"])),
        out,
        v["context"],
        frame_size=v["frame_size"],
        message_id=message_id,
    )
    assert out.getvalue().hex() == v["message_hex"]
    labels = {
        "commitment_hex": b"kbe1 key commitment",
        "header_key_hex": b"kbe1 header key",
        "frame_key_hex": b"kbe1 frame key",
    }
    assert {name: derive(data_key, message_id, label).hex() for name, label in labels.items()} == v["derived"]
    assert read_header(io.BytesIO(out.getvalue())).commitment.hex() == v["derived"]["commitment_hex"]


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.stem)
def test_vector_refuses_another_data_key(path: Path) -> None:
    v = load(path)
    with pytest.raises(TamperedMessage):
        open_with_data_key(bytes(32), io.BytesIO(bytes.fromhex(v["message_hex"])), io.BytesIO(), v["context"])
