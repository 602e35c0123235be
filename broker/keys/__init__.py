"""Logical keys: their model, registry in Vault KV, lifecycle and scheduled work."""
