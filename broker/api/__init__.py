"""The HTTP API (aiohttp over mTLS)."""
