"""Plaintext, data keys, context values, PINs and tokens never reach a log line:
the broker's logs, its audit trail, or Vault's audit log."""

from __future__ import annotations

import base64
import uuid

import pytest

from broker.devstack.stack import DevStack
from tests.integration.keyops import b64, call, create_key, decrypt, encrypt


@pytest.mark.parametrize("backend", ["vault", "kms", "hsm"])
def test_no_secret_reaches_the_logs(stack: DevStack, backend: str) -> None:
    """Every crypto operation with marked secrets, then a search of every log for them."""
    marker = uuid.uuid4().hex
    plaintext = f"PLAINTEXT-{marker}".encode()
    context = {"tenant": f"CONTEXTVALUE-{marker}"}
    name = create_key(stack, backend)
    other = create_key(stack, "vault")

    sealed = encrypt(stack, name, plaintext, context).json()["ciphertext"]
    decrypt(stack, name, sealed, context)
    decrypt(stack, name, sealed, {"tenant": "wrong"})
    datakey = call(stack, f"/v1/keys/{name}/datakey", {"context": context}).json()["plaintext"]
    call(stack, f"/v1/keys/{name}/rewrap", {"ciphertext": sealed, "context": context, "to_key": other})
    call(stack, f"/v1/keys/{name}/encrypt", {"batch": [{"plaintext": b64(plaintext), "context": context}]})

    logs = [
        *sorted(stack.layout.logs.glob("*.log")),
        stack.layout.vault_audit_log,
        *sorted(stack.layout.audit_dir.glob("audit-*.jsonl")),
    ]
    text = "\n".join(p.read_text(errors="replace") for p in logs)
    forbidden = {
        "plaintext": plaintext.decode(),
        "plaintext (base64)": b64(plaintext),
        "context value": context["tenant"],
        "data key (base64)": datakey,
        "data key (hex)": base64.b64decode(datakey).hex(),
        "HSM user PIN": stack.layout.hsm_pin.read_text().strip(),
        "Vault root token": stack.root_token(),
        "AppRole secret id": (stack.layout.approle_dir / "secret-id").read_text().strip(),
        "audit HMAC key": stack.layout.audit_hmac_key.read_text().strip(),
    }
    assert "/v1/keys/{name}/encrypt" in text  # the broker did log these requests
    assert f'"key":"{name}"' in text  # and its audit trail recorded them
    assert [label for label, value in forbidden.items() if value in text] == []
