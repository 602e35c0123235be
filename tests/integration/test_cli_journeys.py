"""The users' journeys of issue 16 by command, against the running stack: nothing dropped silently,
every error said plainly (with the file, the key, the status it is about)."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import stat
import subprocess
from pathlib import Path

import pytest

from broker.devstack.localca import loopback_tls
from broker.devstack.stack import DevStack
from tests.integration.cliops import keybroker as cli
from tests.integration.conftest import https
from tests.integration.keyops import b64, create_key, unique
from tests.integration.policyops import fresh, identity


def no_traceback(*done: subprocess.CompletedProcess[bytes]) -> bool:
    return all(b"Traceback" not in p.stderr + p.stdout for p in done)


# -- item 2: audit exports are complete --------------------------------------------------------


def _key_with_records(stack: DevStack, requests: int) -> tuple[str, list[str]]:
    """A fresh key and the broker's request ids of ``requests`` audited encryptions (after its create)."""
    name = create_key(stack, "vault")
    ids = []
    for i in range(requests):
        rid = f"journey-{name}-{i:04d}"
        reply = https(
            stack,
            f"/v1/keys/{name}/encrypt",
            body={"plaintext": b64(b"row %d" % i)},
            headers={"X-Request-Id": rid},
        )
        assert reply.status == 200, reply.body
        assert reply.headers["X-Request-Id"] == rid  # the caller's id is echoed; the record has the broker's
        ids.append(reply.headers["X-Broker-Request-Id"])
    return name, ids


def test_audit_query_exports_every_matching_row_page_by_page(stack: DevStack) -> None:
    """query reads every matching row through small pages (CSV, JSON lines, table); --limit says it cut."""
    name, ids = _key_with_records(stack, 23)

    as_csv = cli(stack, "audit", "query", "--key", name, "--operation", "crypto.*", "--format", "csv",
                 "--page-size", "5")  # fmt: skip
    as_jsonl = cli(stack, "audit", "query", "--key", name, "--json", "--page-size", "4")
    as_table = cli(stack, "audit", "query", "--key", name, "--operation", "crypto.*", "--page-size", "6")
    newest = cli(stack, "audit", "query", "--key", name, "--operation", "crypto.*", "--format", "csv",
                 "--limit", "3")  # fmt: skip

    assert as_csv.returncode == 0, as_csv.stderr
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout.decode())))
    assert [r["request_id"] for r in rows] == ids  # all 23 over 5 pages, oldest first, once each
    assert as_csv.stdout.decode().count("time,source,kind") == 1  # one header for all pages
    jsonl = [json.loads(line) for line in as_jsonl.stdout.decode().splitlines()]
    assert [r["request_id"] for r in jsonl if r["operation"] == "crypto.encrypt"] == ids
    assert jsonl[0]["operation"] == "key.create"  # the oldest record is kept, not cut
    assert as_table.stdout.decode().rstrip().endswith("(23 rows)")
    assert as_table.stdout.decode().count("TIME ") == 1
    assert [r["request_id"] for r in csv.DictReader(io.StringIO(newest.stdout.decode()))] == ids[-3:]
    assert b"showing the newest 3 of 23 matching rows" in newest.stderr
    assert no_traceback(as_csv, as_jsonl, as_table, newest)


def test_audit_events_cursor_walks_the_timeline_once(stack: DevStack) -> None:
    """GET /v1/audit/events?cursor=start then next...: every row once, in order; a forged cursor is a 400."""
    name, ids = _key_with_records(stack, 7)
    seen: list[str] = []
    cursor = "start"
    answers = []
    for _ in range(20):
        query = f"key={name}&operation=crypto.*&limit=3&cursor={cursor}"
        answer = https(stack, f"/v1/audit/events?{query}").json()
        answers.append(answer)
        seen += [r["request_id"] for r in answer["events"]]
        if answer["next"] is None:
            break
        cursor = answer["next"]
    newest = https(stack, f"/v1/audit/events?key={name}&operation=crypto.*&limit=2").json()
    forged = https(stack, "/v1/audit/events?cursor=bm90LWEtY3Vyc29y")

    assert seen == ids
    assert [a["count"] for a in answers] == [3, 3, 1]
    assert [a["truncated"] for a in answers] == [True, True, False]
    assert ([r["request_id"] for r in newest["events"]], newest["matched"], newest["truncated"]) == (
        ids[-2:],
        7,
        True,
    )
    assert newest["next"] is None
    assert (forged.status, forged.json()["code"]) == (400, "bad_request")
    assert "'cursor' must be 'start'" in forged.json()["detail"]


def test_audit_merge_offline_keeps_more_than_a_thousand_rows(tmp_path: Path) -> None:
    """merge on copied files writes every matching row (the oldest too), not the newest 1,000."""
    audit = tmp_path / "audit"
    audit.mkdir()
    lines = [
        json.dumps(
            {
                "type": "event",
                "seq": i + 1,
                "time": f"2026-11-2{1 + i // 1000}T10:{(i // 60) % 60:02d}:{i % 60:02d}.000000Z",
                "request_id": f"r-{i:05d}",
                "principal": "spiffe://keybroker.dev/app/app",
                "operation": "crypto.encrypt",
                "key": "payments",
                "outcome": "success",
                "status": 200,
            }
        )
        for i in range(1205)
    ]
    (audit / "audit-000000000001.jsonl").write_text("\n".join(lines) + "\n")

    merged = cli(None, "audit", "merge", "--dir", str(audit), "--format", "csv")
    cut = cli(None, "audit", "merge", "--dir", str(audit), "--format", "jsonl", "--limit", "10")

    rows = list(csv.DictReader(io.StringIO(merged.stdout.decode())))
    assert merged.returncode == 0, merged.stderr
    assert len(rows) == 1205
    assert (rows[0]["request_id"], rows[-1]["request_id"]) == ("r-00000", "r-01204")
    assert len(cut.stdout.decode().splitlines()) == 10
    assert b"showing the newest 10 of 1205 matching rows" in cut.stderr


# -- item 3: datakey never drops the plaintext -------------------------------------------------


def test_datakey_with_plaintext_prints_it_or_writes_it_0600(stack: DevStack, tmp_path: Path) -> None:
    """--with-plaintext prints the data key (second line); --plaintext-out writes it to a new 0600 file."""
    name = create_key(stack, "kms")
    printed = cli(stack, "keys", "datakey", name, "--with-plaintext")
    target = tmp_path / "dek.bin"
    written = cli(stack, "keys", "datakey", name, "--plaintext-out", str(target), "--bytes", "16")
    again = cli(stack, "keys", "datakey", name, "--plaintext-out", str(target))
    as_json = cli(stack, "keys", "datakey", name, "--plaintext-out", str(tmp_path / "j.bin"), "--json")

    assert printed.returncode == 0, printed.stderr
    sealed, key_b64 = printed.stdout.decode().splitlines()
    opened = cli(stack, "keys", "decrypt", name, stdin=sealed.encode())
    assert opened.stdout == base64.b64decode(key_b64)
    assert len(base64.b64decode(key_b64)) == 32

    assert written.returncode == 0, written.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    data = target.read_bytes()
    assert len(data) == 16
    assert cli(stack, "keys", "decrypt", stdin=written.stdout).stdout == data
    assert (again.returncode, b"already exists; refusing to overwrite it" in again.stderr) == (2, True)
    assert target.read_bytes() == data
    doc = json.loads(as_json.stdout)
    assert "plaintext" not in doc
    assert doc["plaintext_out"] == str(tmp_path / "j.bin")
    assert no_traceback(printed, written, again, as_json)


# -- item 5: health says why it cannot answer --------------------------------------------------


def test_health_with_a_certificate_lacking_sys_health_says_403(stack: DevStack) -> None:
    """A principal bound to no role is told its certificate may not read health, not five blank FAILs."""
    stem, _ = identity(stack, fresh("nohealth"))
    table = cli(stack, "health", who=stem)
    as_json = cli(stack, "health", "--json", who=stem)

    assert table.returncode == 1
    assert b"FAIL" not in table.stdout
    assert table.stderr.decode().startswith(
        "keybroker: error: 403 forbidden: this certificate may not read health"
    )
    assert as_json.stdout == b""
    error = json.loads(as_json.stderr)["error"]
    assert (error["status"], error["code"]) == (403, "forbidden")
    assert "may not read health" in error["detail"]
    assert no_traceback(table, as_json)


# -- item 6: the key a ciphertext names, files named, --json errors ----------------------------


def test_decrypt_and_rewrap_take_the_key_the_ciphertext_names(stack: DevStack) -> None:
    """A ciphertext made by another key is refused before sending, naming that key; NAME is optional."""
    vault_key, kms_key = create_key(stack, "vault"), create_key(stack, "kms")
    sealed = cli(stack, "keys", "encrypt", vault_key, "--context", "tenant=acme", stdin=b"order 7").stdout

    wrong = cli(stack, "keys", "decrypt", kms_key, "--context", "tenant=acme", stdin=sealed)
    wrong_json = cli(stack, "keys", "decrypt", kms_key, "--json", stdin=sealed)
    opened = cli(stack, "keys", "decrypt", "--context", "tenant=acme", stdin=sealed)
    moved = cli(stack, "keys", "rewrap", "--to-key", kms_key, "--context", "tenant=acme", stdin=sealed)
    back = cli(stack, "keys", "decrypt", "--context", "tenant=acme", stdin=moved.stdout)
    garbage = cli(stack, "keys", "decrypt", stdin=b"not a ciphertext")

    assert wrong.returncode == 2
    assert wrong.stderr.decode() == (
        f"keybroker: error: the ciphertext was made by key {vault_key!r} (version 1), not {kms_key!r}: "
        f"run the command with {vault_key} (or without a key name: the ciphertext names it)\n"
    )
    assert json.loads(wrong_json.stderr)["error"]["code"] == "usage"
    assert (opened.returncode, opened.stdout) == (0, b"order 7")
    assert moved.stdout.startswith(f"kb1:{kms_key}:1:".encode())
    assert back.stdout == b"order 7"
    assert (garbage.returncode, b"this is not a kb1 ciphertext" in garbage.stderr) == (2, True)
    assert no_traceback(wrong, wrong_json, opened, moved, back, garbage)


def test_a_wrong_certificate_path_names_the_file_and_its_setting(stack: DevStack, tmp_path: Path) -> None:
    """[Errno 2] alone is not an answer: the message names the file and the flag or variable it came from."""
    missing = tmp_path / "dana.crt"
    from_env = cli(stack, "keys", "list", env={"KEYBROKER_CLIENT_CERT": str(missing)})
    from_flag = cli(stack, "health", "--client-key", str(tmp_path / "dana.key"))
    as_json = cli(stack, "keys", "list", "--json", env={"KEYBROKER_CACERT": str(tmp_path / "ca.pem")})

    assert from_env.returncode == 2
    assert from_env.stderr.decode() == (
        f"keybroker: error: cannot read your certificate {missing} (from KEYBROKER_CLIENT_CERT): "
        "No such file or directory\n"
    )
    assert f"your private key {tmp_path / 'dana.key'} (from --client-key)" in from_flag.stderr.decode()
    error = json.loads(as_json.stderr)["error"]
    assert (error["code"], error["exit_status"]) == ("usage", 2)
    assert f"{tmp_path / 'ca.pem'} (from KEYBROKER_CACERT)" in error["message"]
    assert no_traceback(from_env, from_flag, as_json)


def test_json_applies_to_errors_from_the_broker(stack: DevStack) -> None:
    """With --json a broker error is one JSON object on stderr (status, code, detail, request id); exit 1."""
    absent = unique("absent")
    shown = cli(stack, "keys", "show", absent, "--json")
    text = cli(stack, "keys", "show", absent)

    assert (shown.returncode, shown.stdout) == (1, b"")
    error = json.loads(shown.stderr)["error"]
    assert (error["status"], error["code"], error["exit_status"]) == (404, "not_found", 1)
    assert error["request_id"]
    assert error["message"].startswith(f"404 not_found: {error['detail']} (request ")
    assert text.stderr.decode().startswith(f"keybroker: error: 404 not_found: {error['detail']} (request ")


# -- item 7: cancel-destruction says the real rule ---------------------------------------------


def test_cancel_destruction_help_states_what_a_key_comes_back_as(stack: DevStack) -> None:
    """A retired key comes back deactivated, an active one suspended, and --help says exactly that."""
    retired, active = create_key(stack, "vault"), create_key(stack, "vault")
    for name in (retired, active):
        assert cli(stack, "keys", "update", name, "--deletion-protection", "off").returncode == 0
    assert cli(stack, "keys", "revoke", retired, "--reason", "retired").returncode == 0
    for name in (retired, active):
        assert cli(stack, "keys", "schedule-destruction", name, "--pending-days", "7").returncode == 0

    states = {n: json.loads(cli(stack, "keys", "cancel-destruction", n, "--json").stdout)["state"]
              for n in (retired, active)}  # fmt: skip
    helped = cli(None, "keys", "cancel-destruction", "--help").stdout.decode()
    listed = cli(None, "keys", "--help").stdout.decode()

    assert states == {retired: "deactivated", active: "suspended"}
    flat = " ".join(helped.split()).lower()
    assert "a key that was active or suspended when destruction was scheduled comes back suspended" in flat
    assert "a revoked key comes back as it was: deactivated (decrypt and verify only) or compromised" in flat
    assert "revoked keys stay revoked" in " ".join(listed.split())


# -- item 9: sign and verify -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["vault", "kms", "hsm"])
def test_sign_and_verify_from_the_cli(stack: DevStack, backend: str, tmp_path: Path) -> None:
    """sign prints a kb1 signature; verify exits 0 'valid' for it, 1 'INVALID' for another message or key."""
    name = create_key(stack, backend, type_="ecdsa-p256")
    other = create_key(stack, "vault", type_="ecdsa-p256")
    message = tmp_path / "release.tar"
    message.write_bytes(b"release 1.2.3\n" * 1000)
    digest = hashlib.sha256(message.read_bytes()).hexdigest()

    signed = cli(stack, "keys", "sign", name, "--in", str(message))
    by_digest = cli(stack, "keys", "sign", name, "--digest", digest, "--out", str(tmp_path / "sig"))
    signature = signed.stdout.decode().strip()
    valid = cli(stack, "keys", "verify", "--signature", signature, stdin=message.read_bytes())
    valid_file = cli(stack, "keys", "verify", name, "--signature-file", str(tmp_path / "sig"),
                     "--in", str(message))  # fmt: skip
    tampered = cli(stack, "keys", "verify", "--signature", signature, stdin=b"release 6.6.6\n")
    foreign = cli(stack, "keys", "verify", other, "--signature", signature, "--in", str(message))
    as_json = cli(stack, "keys", "verify", "--signature", signature, "--digest", "00" * 32, "--json")
    foreign_json = cli(stack, "keys", "verify", other, "--json", "--signature", signature, stdin=b"x")
    bad_digest = cli(stack, "keys", "sign", name, "--digest", "abc")

    assert signed.returncode == 0, signed.stderr
    assert signature.startswith(f"kb1:{name}:1:")
    assert (valid.returncode, valid.stdout.decode()) == (0, f"valid: signed by key {name}\n")
    assert valid_file.returncode == 0, valid_file.stdout + valid_file.stderr
    assert tampered.returncode == 1
    assert tampered.stdout.decode().startswith("INVALID")
    assert (foreign.returncode, foreign.stdout.decode()) == (
        1,
        f"INVALID: the signature was made by key {name!r}, not {other!r}\n",
    )
    assert (as_json.returncode, json.loads(as_json.stdout)) == (1, {"valid": False, "key": name})
    assert (foreign_json.returncode, json.loads(foreign_json.stdout)) == (
        1,
        {"valid": False, "key": other, "signed_by": name},
    )
    assert (bad_digest.returncode, b"64 hex digits" in bad_digest.stderr) == (2, True)
    assert no_traceback(signed, by_digest, valid, valid_file, tampered, foreign, as_json, bad_digest)


def test_a_tls_failure_says_which_settings_to_check(stack: DevStack, tmp_path: Path) -> None:
    """A CA that did not sign the broker, or a certificate from another CA, is named as a TLS problem."""
    other_ca, other_cert, other_key = loopback_tls(tmp_path / "other")
    wrong_ca = cli(stack, "keys", "list", env={"KEYBROKER_CACERT": str(other_ca)})
    foreign_cert = cli(
        stack,
        "keys",
        "list",
        env={"KEYBROKER_CLIENT_CERT": str(other_cert), "KEYBROKER_CLIENT_KEY": str(other_key)},
    )

    assert wrong_ca.returncode == 1
    assert wrong_ca.stderr.decode().startswith(
        f"keybroker: error: TLS with the broker at {stack.broker_url} failed (CERTIFICATE_VERIFY_FAILED)"
    )
    assert "--ca-cert/KEYBROKER_CACERT is the CA of the broker's certificate" in wrong_ca.stderr.decode()
    assert foreign_cert.returncode == 1
    assert "check --client-cert/KEYBROKER_CLIENT_CERT" in foreign_cert.stderr.decode()
    assert no_traceback(wrong_ca, foreign_cert)


def test_vault_bootstrap_names_a_missing_ca_file(tmp_path: Path) -> None:
    """A --ca-file that is not there is named with the flag (exit 2), not an 'unexpected OSError'."""
    missing = tmp_path / "vault-ca.pem"
    done = cli(
        None,
        "vault",
        "bootstrap",
        "--address",
        "https://127.0.0.1:1",
        "--ca-file",
        str(missing),
        "--approle-dir",
        str(tmp_path / "approle"),
        env={"VAULT_TOKEN": "unused"},
    )

    assert done.returncode == 2
    assert done.stderr.decode() == f"keybroker: error: --ca-file: No such file or directory: {missing}\n"
