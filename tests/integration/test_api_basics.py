"""API conventions every endpoint shares: problem+json, request ids, principal, metrics."""

from __future__ import annotations

import uuid

from broker.devstack.stack import DevStack
from tests.integration.conftest import https


def test_unknown_path_is_problem_json_404(stack: DevStack) -> None:
    """404 answers are RFC 9457 documents carrying the request id."""
    reply = https(stack, "/v1/no-such-thing")

    body = reply.json()
    assert reply.status == 404
    assert reply.headers["Content-Type"].startswith("application/problem+json")
    assert set(body) == {"type", "title", "status", "detail", "code", "request_id"}
    assert body["status"] == 404
    assert body["code"] == "not_found"
    # The client's path is not echoed: the detail also lands in the audit record and the log.
    assert "no-such-thing" not in body["detail"]
    assert body["request_id"] == reply.headers["X-Request-Id"]


def test_wrong_method_is_problem_json_405(stack: DevStack) -> None:
    """Method errors are problem documents with an Allow header."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(stack.broker_url + "/v1/sys/health", method="DELETE")
    try:
        urllib.request.urlopen(req, context=stack.client_ssl(), timeout=10)
    except urllib.error.HTTPError as exc:
        status, ctype, allow = exc.code, exc.headers["Content-Type"], exc.headers["Allow"]
    assert (status, ctype.split(";")[0], "GET" in allow) == (405, "application/problem+json", True)


def test_well_formed_request_id_is_echoed(stack: DevStack) -> None:
    """A caller's well-formed X-Request-Id is kept and echoed."""
    rid = f"caller-{uuid.uuid4()}"

    reply = https(stack, "/v1/sys/health", headers={"X-Request-Id": rid})

    assert reply.headers["X-Request-Id"] == rid


def test_malformed_request_id_is_replaced(stack: DevStack) -> None:
    """A hostile request id never reaches logs or Vault: a fresh UUID replaces it."""
    reply = https(stack, "/v1/sys/health", headers={"X-Request-Id": "bad id; DROP"})

    echoed = reply.headers["X-Request-Id"]
    assert echoed != "bad id; DROP"
    assert str(uuid.UUID(echoed)) == echoed


def test_request_id_reaches_vault_audit_log(stack: DevStack) -> None:
    """The broker's own request id appears in Vault's audit log as the audited header; the caller's
    X-Request-Id never reaches Vault (so no caller can choose the id that joins Vault's log to a record)."""
    rid = f"join-{uuid.uuid4()}"

    reply = https(stack, "/v1/sys/health", headers={"X-Request-Id": rid})

    audit = stack.layout.vault_audit_log.read_text().replace(" ", "")
    broker_id = reply.headers["X-Broker-Request-Id"]
    assert reply.status == 200
    assert reply.headers["X-Request-Id"] == rid
    assert f'"x-request-id":["{broker_id}"]' in audit
    assert rid not in audit


def test_principal_is_logged_from_the_certificate(stack: DevStack) -> None:
    """Requests are attributed to the SPIFFE ID in the client certificate."""
    rid = f"who-{uuid.uuid4()}"

    https(stack, "/v1/sys/health", who="app", headers={"X-Request-Id": rid})

    lines = [line for line in (stack.layout.logs / "broker.log").read_text().splitlines() if rid in line]
    assert any('"principal": "spiffe://keybroker.dev/app/app"' in line for line in lines)


def test_metrics_are_prometheus_text(stack: DevStack) -> None:
    """GET /metrics and /v1/metrics expose request counters in the text format."""
    https(stack, "/v1/sys/health")

    for path in ("/metrics", "/v1/metrics"):
        reply = https(stack, path)
        text = reply.body.decode()
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        assert 'keybroker_http_requests_total{method="GET",route="/v1/sys/health",status="200"}' in text
        assert 'keybroker_component_up{component="vault"} 1.0' in text
