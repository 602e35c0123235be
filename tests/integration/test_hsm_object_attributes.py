"""Every PKCS#11 object the broker makes is locked to its one job, read back from the real token."""

from __future__ import annotations

import os
from typing import Any

from pkcs11 import Attribute, ObjectClass

from broker.backends.hsm import object_label
from broker.config.load import load_config
from broker.devstack.stack import HSM_TOKEN_LABEL, DevStack
from tests.integration.keyops import create_key

PRIVATE_OR_SECRET = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.NEVER_EXTRACTABLE: True,
    Attribute.MODIFIABLE: False,
    Attribute.DERIVE: False,
}
EXPECTED: dict[ObjectClass, dict[Attribute, bool]] = {
    ObjectClass.SECRET_KEY: {
        **PRIVATE_OR_SECRET,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
    },
    ObjectClass.PRIVATE_KEY: {**PRIVATE_OR_SECRET, Attribute.SIGN: True, Attribute.UNWRAP: False},
    ObjectClass.PUBLIC_KEY: {
        Attribute.TOKEN: True,
        Attribute.VERIFY: True,
        Attribute.MODIFIABLE: False,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
    },
}


def objects_of(stack: DevStack, key_name: str) -> list[tuple[ObjectClass, dict[Attribute, Any]]]:
    import pkcs11

    os.environ["SOFTHSM2_CONF"] = str(stack.layout.softhsm_conf)
    lib = pkcs11.lib(str(load_config(stack.layout.broker_config).hsm.library))
    token = lib.get_token(token_label=HSM_TOKEN_LABEL)
    with token.open(user_pin=stack.layout.hsm_pin.read_text().strip()) as session:
        found = []
        for obj in session.get_objects({Attribute.LABEL: object_label(key_name)}):
            cls = obj[Attribute.CLASS]
            found.append((cls, {attr: obj[attr] for attr in EXPECTED[cls]}))
        return found


def test_hsm_key_objects_are_sensitive_unmodifiable_and_single_purpose(stack: DevStack) -> None:
    """AES keys only encrypt/decrypt, EC private keys only sign; none exported, derived or relabelled."""
    aes = create_key(stack, "hsm")
    ec = create_key(stack, "hsm", type_="ecdsa-p256")
    seen = set()
    for name in (aes, ec):
        for cls, attrs in objects_of(stack, name):
            seen.add(cls)
            assert attrs == EXPECTED[cls], (name, cls)
    assert seen == set(EXPECTED)
