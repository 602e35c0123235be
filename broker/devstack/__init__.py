"""What ``keybroker dev`` runs: the real local stack (KMS stand-in, OpenBao, SoftHSM2, broker).

Development and test use only; production deploys real AWS KMS, Vault and an HSM.
"""
