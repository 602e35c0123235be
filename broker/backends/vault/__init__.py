"""Vault (OpenBao): the authenticated HTTP client apart from the transit key backend."""

from broker.backends.vault.client import VaultClient, VaultHTTPError, map_vault_errors, vault_path
from broker.backends.vault.transit import VaultTransit

__all__ = ["VaultClient", "VaultHTTPError", "VaultTransit", "map_vault_errors", "vault_path"]
