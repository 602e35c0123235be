"""docs/openapi.yaml describes exactly the routes the application serves, and describes them whole:
a valid OpenAPI 3 document, a request body and success schema for every operation, one problem
document for every error, and the name rules the broker enforces on path parameters.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from openapi_spec_validator import validate

from broker.api.app import create_app
from broker.api.problem import PROBLEM_CONTENT_TYPE, problem_response
from broker.config.model import AuditConfig, Config, HsmConfig, ServerConfig, VaultConfig
from broker.errors import BadRequest, BrokerError, ConfigError
from broker.keys.model import NAME_RE
from broker.policy.document import ROLE_NAME_RE
from broker.state.grants import new_grant_id

SPEC_PATH = Path(__file__).parents[2] / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
METHODS = ("get", "post", "put", "patch", "delete")
PROBLEM_REF = "#/components/responses/Problem"
# Error answers that are not problem documents, on purpose: health's 503 is its full report.
REPORTS = {("get", "/v1/sys/health", "503")}


def _config(tmp: Path) -> Config:
    return Config(
        server=ServerConfig(cert_file=tmp / "c", key_file=tmp / "k", client_ca_file=tmp / "ca"),
        vault=VaultConfig(address="http://127.0.0.1:1", role_id_file=tmp / "r", secret_id_file=tmp / "s"),
        hsm=HsmConfig(library=tmp / "lib.so", token_label="t", pin_env="PIN"),
        audit=AuditConfig(directory=tmp),
    )


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, item[method])
        for path, item in SPEC["paths"].items()
        for method in METHODS
        if method in item
    ]


OPERATIONS = _operations()
IDS = [f"{m.upper()} {p}" for m, p, _ in OPERATIONS]


def _resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def _parameters(path: str, operation: dict[str, Any]) -> list[dict[str, Any]]:
    shared = SPEC["paths"][path].get("parameters", [])
    return [_resolve(p) for p in [*shared, *operation.get("parameters", [])]]


def test_every_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    """Each (method, path) the router knows appears in the spec, and the spec documents no other."""
    app = create_app(_config(tmp_path))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method not in ("HEAD", "*")
    }
    documented = {(method, path) for method, path, _ in OPERATIONS}

    assert served == documented


def test_spec_is_valid_openapi_3() -> None:
    """The document passes the OpenAPI 3 validator (schemas, $refs, parameters of every path)."""
    validate(SPEC)

    assert SPEC["openapi"].startswith("3.")


@pytest.mark.parametrize(("method", "path", "operation"), OPERATIONS, ids=IDS)
def test_operation_documents_its_body_and_success_schemas(
    method: str, path: str, operation: dict[str, Any]
) -> None:
    """A body-taking method documents a JSON body schema; every operation a success answer with a schema."""
    body = operation.get("requestBody")
    if method in ("post", "put", "patch"):
        assert body is not None, "POST/PUT/PATCH bodies are read: document one (optional if ignored)"
        assert "schema" in _resolve(body)["content"]["application/json"]
    else:
        assert body is None, "GET and DELETE bodies are not read: document none"
    successes = {code: _resolve(r) for code, r in operation["responses"].items() if code.startswith("2")}
    assert successes, "no success answer documented"
    for code, answer in successes.items():
        content = answer.get("content", {})
        assert content, f"{code} documents no content"
        assert all("schema" in media for media in content.values()), f"{code} has content without a schema"


@pytest.mark.parametrize(("method", "path", "operation"), OPERATIONS, ids=IDS)
def test_every_error_answer_is_the_problem_document(
    method: str, path: str, operation: dict[str, Any]
) -> None:
    """Any status an operation can fail with is the one shared problem+json response."""
    responses = operation["responses"]
    assert responses.get("default") == {"$ref": PROBLEM_REF}, "errors must default to the problem document"
    for code, answer in responses.items():
        if code[0] in "45" and (method, path, code) not in REPORTS:
            assert answer == {"$ref": PROBLEM_REF}, f"{code} is not the problem document"


# Modules that run outside the server (CLI, its client, Vault bootstrap, the dev stack) raise
# errors of their own that never become an HTTP answer; so does the envelope format (client side).
OFFLINE = ("broker.cli", "broker.client", "broker.vaultops", "broker.devstack", "broker.__main__")
OFFLINE_ENVELOPE = "broker.envelope"


def _server_error_codes() -> set[str]:
    """The code of every error class the server's modules define (all imported, whatever ran before)."""
    import broker

    for info in pkgutil.walk_packages(broker.__path__, "broker."):
        if not info.name.startswith((*OFFLINE, OFFLINE_ENVELOPE)):
            importlib.import_module(info.name)
    codes, todo = set(), [BrokerError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if not cls.__module__.startswith((*OFFLINE, OFFLINE_ENVELOPE)) and not issubclass(cls, ConfigError):
            codes.add(cls.code)
    return codes


def test_problem_document_has_the_fields_the_broker_sends() -> None:
    """The problem schema requires exactly the fields problem_response() writes and lists every code."""
    sent = json.loads(problem_response(BadRequest("x"), "rid-1").body)  # type: ignore[arg-type]
    answer = SPEC["components"]["responses"]["Problem"]
    schema = _resolve(answer["content"][PROBLEM_CONTENT_TYPE]["schema"])

    assert list(answer["content"]) == [PROBLEM_CONTENT_TYPE]
    assert "X-Request-Id" in answer.get("headers", {})
    assert set(schema["required"]) == set(sent) == set(schema["properties"])
    assert set(schema["properties"]["code"]["enum"]) == _server_error_codes()


def _body_fields_naming_keys() -> list[tuple[str, Any]]:
    new_key = SPEC["components"]["schemas"]["NewKey"]["properties"]["name"]
    rewrap = _resolve(SPEC["paths"]["/v1/keys/{name}/rewrap"]["post"]["requestBody"])
    rewrap_schema = rewrap["content"]["application/json"]["schema"]
    to_key = next(
        p["properties"]["to_key"] for p in rewrap_schema["allOf"] if "to_key" in p.get("properties", {})
    )
    explain = _resolve(SPEC["paths"]["/v1/policies/explain"]["post"]["requestBody"])
    key = explain["content"]["application/json"]["schema"]["properties"]["key"]
    return [("NewKey.name", new_key), ("rewrap to_key", to_key), ("explain key", key)]


def anchored(rule: re.Pattern[str]) -> str:
    """A rule the broker applies with fullmatch, as the anchored pattern a JSON Schema needs."""
    return "^" + rule.pattern.removeprefix("^").removesuffix("$") + "$"


def test_names_carry_the_rules_the_broker_enforces() -> None:
    """Key names (path and body), role names and grant ids are documented with the broker's own rules."""
    seen = set()
    for method, path, operation in OPERATIONS:
        for param in _parameters(path, operation):
            if param["in"] != "path":
                continue
            pattern = _resolve(param["schema"]).get("pattern")
            expected = {"name": anchored(NAME_RE), "role": anchored(ROLE_NAME_RE)}.get(param["name"])
            if param["name"] == "grant_id":
                assert pattern is not None
                assert re.fullmatch(pattern, new_grant_id()), f"{method} {path}: grant_id pattern"
            else:
                assert pattern == expected, f"{method} {path}: {{{param['name']}}} lacks the name rule"
            seen.add(param["name"])
    for where, schema in _body_fields_naming_keys():
        assert _resolve(schema).get("pattern") == anchored(NAME_RE), where

    assert seen == {"name", "role", "grant_id"}
