"""The broker's durable state in Vault KV v2: documents written with check-and-set."""
