"""The KMS stand-in (``broker.devstack.kms_server``) and the key that auto-unseals OpenBao."""

from __future__ import annotations

import sys
from typing import Any

from broker._files import write_private
from broker.devstack.common import DEV_AWS_ENV, KMS_REGION, Layout, StackError, child_env, port_free
from broker.devstack.processes import Child, spawn, wait_until


class DevKms:
    """The KMS stand-in of one state directory; it keeps its port, which Vault's seal names."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Child:
        port_file = self.layout.kms_port_file
        port = int(port_file.read_text()) if port_file.is_file() else 0
        if port and not port_free(port):
            raise StackError(f"port {port}, which this state directory's KMS stand-in uses, is taken")
        port_file.unlink(missing_ok=True)
        child = spawn(
            "kms",
            [
                sys.executable,
                "-m",
                "broker.devstack.kms_server",
                "--state",
                str(self.layout.kms_state),
                "--port",
                str(port),
                "--port-file",
                str(port_file),
            ],
            log_path=self.layout.logs / "kms.log",
            env=child_env(),
        )
        try:
            wait_until(
                child,
                lambda: port_file.is_file() and port_file.read_text().strip() != "",
                timeout=30,
                what="listening",
            )
            self.port = int(port_file.read_text())
            self._ensure_unseal_key()
        except BaseException:
            child.stop()
            raise
        return child

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=DEV_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DEV_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=KMS_REGION,
        ).client("kms", endpoint_url=self.endpoint)

    def _ensure_unseal_key(self) -> None:
        client = self.client()
        path = self.layout.kms_unseal_key
        if path.is_file():
            key_id = path.read_text().strip()
            state = client.describe_key(KeyId=key_id)["KeyMetadata"]["KeyState"]
            if state != "Enabled":
                raise StackError(f"the Vault unseal key {key_id} is {state} in KMS; Vault cannot unseal")
            return
        key_id = client.create_key(Description="keybroker dev: Vault auto-unseal key")["KeyMetadata"]["KeyId"]
        write_private(path, key_id + "\n")
