"""The only package that imports hvac, boto3/botocore or pkcs11: SDK types stop here."""
