"""docs/openapi.yaml describes exactly the routes the application serves."""

from __future__ import annotations

from pathlib import Path

import yaml

from broker.api.app import create_app
from broker.config.model import AuditConfig, Config, HsmConfig, ServerConfig, VaultConfig

SPEC = Path(__file__).parents[2] / "docs" / "openapi.yaml"


def _config(tmp: Path) -> Config:
    return Config(
        server=ServerConfig(cert_file=tmp / "c", key_file=tmp / "k", client_ca_file=tmp / "ca"),
        vault=VaultConfig(address="http://127.0.0.1:1", role_id_file=tmp / "r", secret_id_file=tmp / "s"),
        hsm=HsmConfig(library=tmp / "lib.so", token_label="t", pin_env="PIN"),
        audit=AuditConfig(directory=tmp),
    )


def test_every_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    """Each (method, path) the router knows appears in the spec, and the spec documents no other."""
    app = create_app(_config(tmp_path))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    spec = yaml.safe_load(SPEC.read_text())
    documented = {
        (method, path)
        for path, item in spec["paths"].items()
        for method in item
        if method in {"get", "post", "put", "patch", "delete"}
    }

    assert served == documented
