"""The broker's words for things, imported by every layer and importing nothing of the broker.

Backend and key-type names appear in configuration, the registry, ciphertexts, policy
rules and the API; the environments are the ones a key may belong to and a rule may
select.
"""

from __future__ import annotations

from enum import StrEnum


class Backend(StrEnum):
    VAULT = "vault"
    KMS = "kms"
    HSM = "hsm"


class KeyType(StrEnum):
    AES256_GCM = "aes256-gcm"
    ECDSA_P256 = "ecdsa-p256"

    @property
    def symmetric(self) -> bool:
        return self is KeyType.AES256_GCM


ENVIRONMENTS = ("dev", "staging", "prod")
