"""keybroker: key-management middleware over Vault transit, AWS KMS and a PKCS#11 HSM."""

__version__ = "0.1.0"
