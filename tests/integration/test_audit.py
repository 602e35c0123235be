"""The audit trail on the real stack: one record per request, fail closed, tamper evidence, merge, report."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker
from tests.integration.conftest import Reply, https
from tests.integration.keyops import b64, create_key, encrypt, registry_record, unique
from tests.integration.test_redteam_edge import raw_tls

BACKENDS = ["vault", "kms", "hsm"]


def records(stack: DevStack) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(stack.layout.audit_dir.glob("audit-*.jsonl")):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines())
    return out


def rid() -> str:
    return f"audit-test-{uuid.uuid4().hex}"


def send(stack: DevStack, path: str, request_id: str, **kw: Any) -> Reply:
    return https(stack, path, headers={"X-Request-Id": request_id, **kw.pop("headers", {})}, **kw)


def test_every_kind_of_request_yields_exactly_one_record(stack: DevStack) -> None:
    """Allowed, denied, failed at the backend, bad input, no such endpoint: one record each, outcome right."""
    name = create_key(stack, "kms")
    sealed = encrypt(stack, name, b"x", {"t": "1"}).json()["ciphertext"]
    ids = {kind: rid() for kind in ("allowed", "denied", "backend", "bad-input", "no-endpoint")}
    replies = {
        "allowed": send(stack, f"/v1/keys/{name}/encrypt", ids["allowed"], body={"plaintext": b64(b"y")}),
        "denied": send(stack, f"/v1/keys/{name}/rotate", ids["denied"], who="app", body={}),
        "backend": send(
            stack,
            f"/v1/keys/{name}/decrypt",
            ids["backend"],
            body={"ciphertext": sealed, "context": {"t": "2"}},
        ),
        "bad-input": send(stack, f"/v1/keys/{name}/encrypt", ids["bad-input"], body={"plaintext": 7}),
        "no-endpoint": send(stack, "/v1/nothing-here", ids["no-endpoint"]),
    }
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records(stack):
        by_id.setdefault(str(record.get("client_request_id")), []).append(record)

    got = {
        kind: [(r["status"], r["outcome"], r["operation"]) for r in by_id.get(ids[kind], [])] for kind in ids
    }

    assert {k: r.status for k, r in replies.items()} == {
        "allowed": 200,
        "denied": 403,
        "backend": 400,
        "bad-input": 400,
        "no-endpoint": 404,
    }
    assert got == {
        "allowed": [(200, "success", "crypto.encrypt")],
        "denied": [(403, "denied", "key.rotate")],
        "backend": [(400, "failed", "crypto.decrypt")],
        "bad-input": [(400, "failed", "crypto.encrypt")],
        "no-endpoint": [(404, "failed", "GET unmatched")],
    }
    calls = {c["backend"]: c["id"] for c in by_id[ids["allowed"]][0]["backend_calls"]}
    assert calls["kms"]  # the KMS request id of the Encrypt call
    assert list(by_id[ids["backend"]][0]["context"]) == ["t"]
    assert by_id[ids["backend"]][0]["context"]["t"].startswith("hmac-sha256:")


def test_request_count_equals_record_count_under_32_way_concurrency(stack: DevStack) -> None:
    """128 requests from 32 threads, on all three backends: 128 records, one per request id."""
    names = [create_key(stack, b) for b in BACKENDS]
    ids = [rid() for _ in range(128)]

    def one(i: int) -> int:
        body = {"plaintext": b64(b"c"), "context": {"n": str(i)}}
        return send(stack, f"/v1/keys/{names[i % 3]}/encrypt", ids[i], body=body).status

    with ThreadPoolExecutor(max_workers=32) as pool:
        statuses = list(pool.map(one, range(128)))
    wanted = set(ids)
    counted = [r["client_request_id"] for r in records(stack) if r.get("client_request_id") in wanted]

    assert statuses == [200] * 128
    assert sorted(counted) == sorted(ids)


def test_an_unwritable_audit_log_refuses_work_and_nothing_happens(stack: DevStack) -> None:
    """chattr +i on the active file and its directory: rotations get 503 and the key keeps one
    version (in the registry and in transit itself); once writable again service resumes and the
    chain still verifies."""
    name = create_key(stack, "vault")
    active = sorted(stack.layout.audit_dir.glob("audit-*.jsonl"))[-1]
    # The directory too: a segment that fills up mid-test would otherwise roll over to a new,
    # writable file (seen under load: a rotation answered 200).
    frozen = [str(active), str(stack.layout.audit_dir)]
    subprocess.run(["chattr", "+i", *frozen], check=True)
    try:
        refused = [https(stack, f"/v1/keys/{name}/rotate", body={}) for _ in range(3)]
        refused.append(encrypt(stack, name, b"not now"))
        # A request the edge answers itself (aiohttp's parser refuses it before any middleware).
        edge_head = raw_tls(stack, b"GET /v1/keys HTTP/1.1\r\nno colon here\r\n\r\n", who="admin").partition(
            b"\r\n\r\n"
        )[0]
        versions_during = len(registry_record(stack, name)["versions"])
        transit_during = stack.vault_client().secrets.transit.read_key(name=name, mount_point="kb-transit")
    finally:
        subprocess.run(["chattr", "-i", *frozen], check=True)
    time.sleep(0.6)
    resumed = https(stack, f"/v1/keys/{name}/rotate", body={})
    verified = https(stack, "/v1/audit/verify").json()

    assert [r.status for r in refused] == [503] * 4
    assert [r.headers.get("Retry-After") for r in refused] == ["2"] * 4
    assert edge_head.split(b"\r\n")[0].split(b" ")[1] == b"503", edge_head
    assert b"\r\nretry-after: 2" in edge_head.lower(), edge_head
    assert refused[0].json()["detail"].startswith("audit log unavailable: Operation not permitted")
    assert versions_during == 1
    assert transit_during["data"]["latest_version"] == 1
    assert resumed.status == 200
    assert resumed.json()["latest_version"] == 2
    assert verified["ok"] is True, verified


def _wait_for_checkpoint(stack: DevStack) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    report: dict[str, Any] = https(stack, "/v1/audit/verify").json()
    while report["checkpoints"] == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        https(stack, "/v1/sys/health")
        report = https(stack, "/v1/audit/verify").json()
    return report


def test_verify_online_and_offline_names_the_tampered_record(stack: DevStack, tmp_path: Path) -> None:
    """The live log verifies (HSM-signed checkpoints, Vault anchor); a copy with one record edited does not,
    and the offline verifier names that record."""
    report = _wait_for_checkpoint(stack)
    pem = tmp_path / "audit-key.pem"
    pem.write_text(https(stack, "/v1/audit/public-key").body.decode())
    copy = tmp_path / "copy"
    shutil.copytree(stack.layout.audit_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    # A copy's tail after its last checkpoint is unsigned: accepted explicitly (test_audit_integrity
    # checks that without the flag the verdict is "unverified").
    loose = "--allow-unanchored"
    clean = keybroker(stack, "audit", "verify", "--dir", str(copy), "--public-key", str(pem), loose)
    first = sorted(copy.glob("audit-*.jsonl"))[0]
    lines = first.read_bytes().splitlines()
    record = json.loads(lines[1])
    record["principal"] = "spiffe://keybroker.dev/user/someone-else"
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    first.write_bytes(b"\n".join(lines) + b"\n")
    tampered = keybroker(
        stack, "audit", "verify", "--dir", str(copy), "--public-key", str(pem), "--json", loose
    )
    online = keybroker(stack, "audit", "verify")

    assert report["ok"] is True, report
    assert report["checkpoints"] >= 1
    assert report["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert tampered.returncode == 1
    problem = json.loads(tampered.stdout)["first_problem"]
    assert (problem["kind"], problem["seq"], problem["line"], problem["file"]) == ("edited", 2, 2, first.name)
    assert online.returncode == 0
    assert online.stdout.decode().startswith("audit log intact: ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_joins_vault_evidence_on_request_id(stack: DevStack, backend: str) -> None:
    """A broker record carries the Vault entries made for it (its broker request id, sent as X-Request-Id),
    and its KMS/HSM call ids; the caller's own X-Request-Id is kept as client_request_id."""
    name = create_key(stack, backend)
    encrypt_id, rotate_id = rid(), rid()
    assert send(stack, f"/v1/keys/{name}/encrypt", encrypt_id, body={"plaintext": b64(b"m")}).status == 200
    assert send(stack, f"/v1/keys/{name}/rotate", rotate_id, body={}).status == 200

    events = https(stack, f"/v1/audit/events?key={name}").json()["events"]
    rows = {r.get("client_request_id"): r for r in events}
    encrypted, rotated = rows[encrypt_id], rows[rotate_id]
    rotate_paths = {v["path"] for v in rotated["vault"]}
    calls = {c["backend"]: c["id"] for c in [*encrypted["backend_calls"], *rotated["backend_calls"]]}

    assert f"kb-kv/data/keys/{name}" in rotate_paths  # registry read and write, joined from Vault's own log
    assert all(v["vault_request_id"] for v in rotated["vault"])
    if backend == "vault":
        assert f"kb-transit/encrypt/{name}" in {v["path"] for v in encrypted["vault"]}
        assert f"kb-transit/keys/{name}/rotate" in rotate_paths
    else:
        assert calls[backend]  # the KMS request id / the HSM session that did the work


def test_vault_access_with_a_root_token_is_flagged_as_bypass(stack: DevStack) -> None:
    """Someone reads a transit key with the root token, not through the broker: the timeline flags it."""
    name = create_key(stack, "vault")
    direct = stack.vault_client().secrets.transit.read_key(name=name, mount_point="kb-transit")

    rows = https(stack, "/v1/audit/events?source=bypass").json()["events"]
    cli = keybroker(stack, "audit", "query", "--source", "bypass", "--format", "csv")

    match = [r for r in rows if r["vault_request_id"] == direct["request_id"]]
    assert len(match) == 1
    assert (match[0]["principal"], match[0]["key"], match[0]["bypass"]) == ("vault:root", name, True)
    assert direct["request_id"] in cli.stdout.decode()


def test_the_report_renders_in_a_real_browser(stack: DevStack, tmp_path: Path) -> None:
    """keybroker audit report writes one self-contained page; headless Chromium renders every section."""
    name = create_key(stack, "hsm")
    encrypt(stack, name, b"for the report")
    https(stack, f"/v1/keys/{unique('hidden')}/encrypt", who="app", body={"plaintext": b64(b"x")})
    out = tmp_path / "report.html"
    made = keybroker(stack, "audit", "report", "--out", str(out))
    html = out.read_text()
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run(
        [*chromium, "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120, check=False
    )
    shot = tmp_path / "report.png"
    subprocess.run(
        [*chromium, f"--screenshot={shot}", "--window-size=1200,2400", out.as_uri()],
        capture_output=True,
        timeout=120,
        check=False,
    )

    assert made.returncode == 0, made.stderr
    assert "<script" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    for section in (
        "Chain verification",
        "Key inventory",
        "Keys overdue for rotation",
        "Denials",
        "bypassed",
    ):
        assert section in dom.stdout
    assert 'class="ok">intact' in dom.stdout
    assert name in dom.stdout
    assert "<svg" in dom.stdout
    assert shot.stat().st_size > 20_000
