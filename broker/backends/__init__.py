"""The key backends behind one seam; SDK types and SDK errors stop here.

boto3/botocore and pkcs11 are imported here and, for operator and dev tooling only,
in ``broker.vaultops`` and ``broker.devstack`` (hvac); nowhere else
(``tests/unit/test_import_boundaries.py`` checks it). Vault is reached over its
HTTP API with aiohttp.
"""
