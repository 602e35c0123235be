"""Operator-side Vault work (hvac, synchronous): bootstrap, PKI issuance."""
