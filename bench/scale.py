"""Scale of state, before and after, side by side: policy decisions, keys list, audit verify, timeline.

    .venv/bin/python -m bench.scale                 # everything (1M audit records, 10,000 keys)
    .venv/bin/python -m bench.scale --quick         # 100k records, 1,000 keys
    .venv/bin/python -m bench.scale --only policy,audit

"before" is the algorithm as it was at commit BASE, run on the same data in the same run:
the old policy binding scan and Vault read loop are reproduced here, the old audit chain
module is loaded from git (``git show BASE:broker/audit/chain.py``); the timeline's "before" is
the in-memory merge the events route used (``read_timeline``, still in the tree). Audit memory is each
run's peak RSS (VmHWM) in a fresh child process, so one run cannot inflate another.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

BASE = "9ebf52c"  # the last commit before the scale work: the "before" column
TD = "spiffe://bank.example"
REPO = Path(__file__).resolve().parent.parent


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


# -- policy ------------------------------------------------------------------------------


def policy_bench() -> None:
    from broker.policy.engine import decide
    from broker.policy.model import (
        AccessRequest,
        KeyFacts,
        KeySelector,
        PolicySet,
        Role,
        Rule,
        principal_from_id,
    )

    roles = {
        f"r{n}": Role(f"r{n}", (Rule(f"r{n}[0]", ("key.read",), keys=KeySelector(names=(f"k{n}-*",))),))
        for n in range(1000)
    }
    bindings: dict[str, tuple[str, ...]] = {}
    for n in range(10_000):
        if n % 10:
            bindings[f"{TD}/app/svc{n}"] = (f"r{n % 1000}",)  # 9,000 by exact id
        else:
            bindings[f"{TD}/team{n}/*"] = (f"r{(n + 1) % 1000}",)  # 1,000 globs

    class Before(PolicySet):
        def roles_of(self, principal: Any) -> tuple[str, ...]:
            found: set[str] = set()
            for pattern, names in self.bindings.items():
                if pattern == principal.id or (
                    any(c in pattern for c in "*?[") and fnmatchcase(principal.id, pattern)
                ):
                    found.update(names)
            return tuple(sorted(found))

    now = datetime.now(UTC)
    cases = {
        "exact binding": AccessRequest(
            principal_from_id(f"{TD}/app/svc11"), "key.read", KeyFacts("k11-a", "vault", "dev", {})
        ),
        "glob binding": AccessRequest(
            principal_from_id(f"{TD}/team20/alice"), "key.read", KeyFacts("k21-a", "vault", "dev", {})
        ),
        "unbound": AccessRequest(
            principal_from_id(f"{TD}/app/nobody"), "key.read", KeyFacts("k1-a", "vault", "dev", {})
        ),
    }
    rows = []
    for label, ask in cases.items():
        timings = []
        for policy in (Before(roles, bindings), PolicySet(roles, bindings)):
            decide(policy, ask, now=now)  # the index is built once per document, on first use
            n = 200 if isinstance(policy, Before) else 20_000
            start = time.perf_counter()
            for _ in range(n):
                decide(policy, ask, now=now)
            timings.append((time.perf_counter() - start) / n * 1e6)
        rows.append([label, f"{timings[0]:.1f}", f"{timings[1]:.1f}", f"{timings[0] / timings[1]:.0f}x"])
    table(
        "Policy decision, 1,000 roles and 10,000 bindings (9,000 exact, 1,000 globs)",
        ["caller", "before µs", "after µs", "speed-up"],
        rows,
    )


# -- audit -------------------------------------------------------------------------------


def _in_child(*args: str) -> dict[str, Any]:
    """Run ``python -m bench.scale ARGS`` in a fresh process (its peak RSS is its own) and return
    the JSON object its last output line holds."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.scale", *args],
        capture_output=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=3600,
    ).stdout
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def old_chain_module() -> Any | None:
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{BASE}:broker/audit/chain.py"],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(tempfile.mkdtemp(prefix="kb-scale-")) / "old_chain.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("old_chain", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_chain"] = module
    spec.loader.exec_module(module)
    return module


def generate_log(
    directory: Path, records: int, *, per_file: int = 250_000, checkpoint_every: int = 1000
) -> str:
    """``records`` chained records made with the real chain code, a signed checkpoint every
    ``checkpoint_every``; returns the public key (PEM) that verifies them."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

    from broker.audit.chain import GENESIS, canonical, checkpoint_digest, file_name, line_hash

    key = ec.generate_private_key(ec.SECP256R1())
    head, fh = GENESIS, None
    stamp = "2026-11-29T10:00:00.000000Z"
    for seq in range(1, records + 1):
        if (seq - 1) % per_file == 0:
            if fh is not None:
                fh.close()
            fh = (directory / file_name(seq)).open("wb")
        assert fh is not None
        if seq % checkpoint_every == 0:
            body: dict[str, Any] = {
                "type": "checkpoint",
                "node": "bench",
                "time": stamp,
                "seq": seq,
                "prev": head,
                "head": head,
            }
            der = key.sign(checkpoint_digest(body), ec.ECDSA(Prehashed(hashes.SHA256())))
            r, s = decode_dss_signature(der)
            body["signature"] = base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode()
            line = canonical(body)
        else:
            line = canonical(
                {
                    "type": "event",
                    "time": stamp,
                    "seq": seq,
                    "prev": head,
                    "request_id": f"req-{seq:012d}",
                    "principal": f"{TD}/app/payments",
                    "operation": "key.encrypt",
                    "key": "payments",
                    "outcome": "allowed",
                    "status": 200,
                    "latency_ms": 1.25,
                    "context": {"tenant": hashlib.sha256(str(seq % 97).encode()).hexdigest()[:32]},
                }
            )
        head = line_hash(line)
        fh.write(line + b"\n")
    if fh is not None:
        fh.close()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def verify_child(mode: str, directory: str, public_key: str) -> None:
    """In a fresh process: verify the log the old way or the new one, print seconds and peak RSS."""
    from broker.audit.signing import load_public_key, signature_checker

    check = signature_checker(load_public_key(public_key.encode()))
    paths = sorted(Path(directory).glob("audit-*.jsonl"))
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    if mode == "before":
        module = old_chain_module()
        assert module is not None
        files = [(p.name, p.read_bytes()) for p in paths]  # what the callers did before
        report = module.verify(files, check).to_json()
    else:
        from broker.audit.chain import verify
        from broker.audit.segments import segment_sources

        report = verify(segment_sources(paths), check).to_json()
    elapsed = time.perf_counter() - start
    print(
        json.dumps(
            {
                "records": report["records"],
                "ok": report["ok"],
                "seconds": elapsed,
                "peak_mb": _peak_rss_mb(),
                "start_mb": baseline,
            }
        )
    )


def _mib(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.iterdir()) / 2**20


def audit_bench(sizes: list[int]) -> None:
    have_old = old_chain_module() is not None
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="kb-scale-audit-") as tmp:
            t0 = time.perf_counter()
            pem = generate_log(Path(tmp), size)
            made = time.perf_counter() - t0
            print(
                f"  {size:,} records generated in {made:.0f}s ({_mib(Path(tmp)):.0f} MiB)",
                flush=True,
            )
            got: dict[str, dict[str, Any]] = {}
            for mode in ("before", "after") if have_old else ("after",):
                got[mode] = _in_child("_verify", mode, tmp, pem)
                assert got[mode]["ok"], got[mode]
                assert got[mode]["records"] == size, got[mode]
            before = got.get("before")
            rows.append(
                [
                    f"{size:,}",
                    f"{before['peak_mb']:.0f}" if before else "n/a",
                    f"{got['after']['peak_mb']:.0f}",
                    f"{before['seconds']:.1f}" if before else "n/a",
                    f"{got['after']['seconds']:.1f}",
                ]
            )
    table(
        "audit verify (signed checkpoint every 1,000 records), peak RSS of the verifying process",
        ["records", "before MB", "after MB", "before s", "after s"],
        rows,
    )


def generate_timeline_log(directory: Path, records: int, *, spacing_ms: int = 20) -> Path:
    """``records`` broker records ``spacing_ms`` apart (half of them claiming one Vault call by its
    id, one in twenty an unnumbered one) and Vault's log for them: a request and a response line
    each (about 1 KiB, as Vault writes them), one root bypass per hundred records. Returns the
    Vault log's path; the segments are ``directory/chain``."""
    from broker.audit.chain import file_name

    chain = directory / "chain"
    chain.mkdir()
    vault_path = directory / "vault-audit.log"
    start = datetime(2026, 11, 29, 10, 0, tzinfo=UTC).timestamp()
    auth = {
        "display_name": "approle",
        "entity_id": "5d1c3f0e-0000-4000-8000-000000000001",
        "policies": ["default", "keybroker-broker"],
        "token_policies": ["default", "keybroker-broker"],
        "accessor": "hmac-sha256:" + "a" * 64,
        "client_token": "hmac-sha256:" + "b" * 64,
        "metadata": {"role_name": "keybroker"},
    }

    def at(ms: float, nanos: int = 0) -> str:
        moment = datetime.fromtimestamp(start + ms / 1000, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + (f"{nanos:03d}Z" if nanos else "Z")

    def vault_pair(vid: str, ms: float, sent: str, who: dict[str, Any], path: str) -> bytes:
        request = {
            "id": vid,
            "operation": "update",
            "path": path,
            "headers": {"x-request-id": [sent]},
            "remote_address": "127.0.0.1",
            "mount_type": "transit",
            "namespace": {"id": "root"},
            "data": {"plaintext": "hmac-sha256:" + "c" * 64, "context": "hmac-sha256:" + "d" * 64},
        }
        first = {"time": at(ms, 101), "type": "request", "auth": who, "request": request}
        second = {
            "time": at(ms + 1, 202),
            "type": "response",
            "auth": who,
            "request": request,
            "response": {"data": {"ciphertext": "hmac-sha256:" + "e" * 64, "key_version": 1}},
        }
        return json.dumps(first).encode() + b"\n" + json.dumps(second).encode() + b"\n"

    fh = None
    with vault_path.open("wb") as vault:
        for seq in range(1, records + 1):
            if (seq - 1) % 250_000 == 0:
                if fh is not None:
                    fh.close()
                fh = (chain / file_name(seq)).open("wb")
            assert fh is not None
            ms = seq * spacing_ms
            rid = f"req-{seq:012d}"
            calls: list[dict[str, Any]] = []
            if seq % 2 == 0:
                vid = f"{seq:08x}-0000-4000-8000-{seq:012x}"
                vault.write(vault_pair(vid, ms - 3, rid, auth, "kb-transit/encrypt/payments"))
                calls.append({"backend": "vault", "operation": "transit encrypt", "id": vid})
            elif seq % 20 == 1:
                vid = f"{seq:08x}-0000-4000-9000-{seq:012x}"
                vault.write(vault_pair(vid, ms - 3, rid, auth, "kb-kv/data/keys/payments"))
                calls.append(
                    {
                        "backend": "vault",
                        "operation": "kv read",
                        "id": None,
                        "status": 404,
                        "sent_request_id": rid,
                        "path": "kb-kv/data/keys/payments",
                    }
                )
            if seq % 100 == 0:
                vid = f"{seq:08x}-0000-4000-a000-{seq:012x}"
                vault.write(vault_pair(vid, ms - 7, "root-call-0001", {"display_name": "root"}, "sys/mounts"))
            record = {
                "type": "event",
                "time": at(ms),
                "seq": seq,
                "prev": "0" * 64,
                "request_id": rid,
                "principal": f"{TD}/app/payments",
                "operation": "key.encrypt",
                "key": "payments",
                "outcome": "allowed",
                "status": 200,
                "latency_ms": 4.5,
                "backend_calls": calls,
                "context": {"tenant": hashlib.sha256(str(seq % 97).encode()).hexdigest()[:32]},
            }
            fh.write(json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    if fh is not None:
        fh.close()
    return vault_path


def timeline_child(mode: str, directory: str) -> None:
    """In a fresh process: what GET /v1/audit/events (no cursor: the newest 1,000 rows) computes,
    the old way (the whole timeline in memory) or streamed; print seconds, peak RSS and a digest."""
    from broker.api.audit_routes import read_timeline
    from broker.audit import merge, timeline
    from broker.audit.segments import segment_sources

    paths = sorted((Path(directory) / "chain").glob("audit-*.jsonl"))
    vault_log = Path(directory) / "vault-audit.log"
    baseline = _peak_rss_mb()
    start = time.perf_counter()
    if mode == "before":
        rows = merge.query(read_timeline(segment_sources(paths), vault_log), merge.Filters())
        page, matched = rows[-1000:], len(rows)
    else:
        page, matched = timeline.newest([timeline.Chain(paths)], vault_log, merge.Filters(), 1000)
    elapsed = time.perf_counter() - start
    digest = hashlib.sha256(json.dumps(page, sort_keys=True).encode()).hexdigest()
    flagged = sum(1 for r in page if r.get("bypass") or r.get("unexplained"))
    print(
        json.dumps(
            {
                "matched": matched,
                "digest": digest,
                "flagged": flagged,
                "seconds": elapsed,
                "peak_mb": _peak_rss_mb(),
                "start_mb": baseline,
            }
        )
    )


def timeline_bench(sizes: list[int]) -> None:
    rows = []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="kb-scale-timeline-") as tmp:
            t0 = time.perf_counter()
            vault_log = generate_timeline_log(Path(tmp), size)
            made = time.perf_counter() - t0
            vault_mib = vault_log.stat().st_size / 2**20
            print(
                f"  {size:,} records + Vault log generated in {made:.0f}s "
                f"({_mib(Path(tmp) / 'chain'):.0f} MiB + {vault_mib:.0f} MiB)",
                flush=True,
            )
            got: dict[str, dict[str, Any]] = {}
            for mode in ("before", "after"):
                got[mode] = _in_child("_timeline", mode, tmp)
            # Same answer both ways: the same newest rows (same claims, same flags), same count.
            assert got["before"]["digest"] == got["after"]["digest"], got
            assert got["before"]["matched"] == got["after"]["matched"], got
            before, after = got["before"], got["after"]
            rows.append(
                [
                    f"{size:,} ({vault_mib:.0f} MiB Vault log)",
                    f"{before['peak_mb']:.0f}",
                    f"{after['peak_mb']:.0f}",
                    f"{before['seconds']:.1f}",
                    f"{after['seconds']:.1f}",
                ]
            )
    table(
        "GET /v1/audit/events (newest 1,000 of the whole merged timeline), peak RSS of the reading process",
        ["broker records", "before MB", "after MB", "before s", "after s"],
        rows,
    )


# -- keys list ---------------------------------------------------------------------------


def keys_bench(count: int) -> None:
    from broker.backends.vault import VaultClient
    from broker.config.load import load_config
    from broker.devstack.stack import DevStack, free_port
    from broker.state.registry import Registry

    with tempfile.TemporaryDirectory(prefix="kb-scale-keys-") as tmp:
        stack = DevStack(Path(tmp), broker_port=free_port())
        print("starting the stack for keys list ...", flush=True)
        stack.start()
        try:
            _keys_bench(stack, count, VaultClient, load_config, Registry)
        finally:
            stack.stop()


def _call(stack: Any, path: str, body: Any = None) -> Any:
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - https to our own loopback broker
        stack.broker_url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, context=stack.client_ssl("admin"), timeout=600) as resp:  # noqa: S310
        return json.load(resp)


def _keys_bench(stack: Any, count: int, vault_client: Any, load_config: Any, registry_type: Any) -> None:
    seed = _call(stack, "/v1/keys", {"name": "scale-seed", "backend": "kms", "environment": "dev"})
    hv = stack.vault_client()
    doc = hv.secrets.kv.v2.read_secret_version(
        path="keys/scale-seed", mount_point="kb-kv", raise_on_deleted_version=True
    )["data"]["data"]
    assert doc["name"] == seed["name"]

    def put(n: int) -> None:
        # Registry entries only (the listing reads the registry, never the backends).
        hv.secrets.kv.v2.create_or_update_secret(
            path=f"keys/scale-{n:05d}", mount_point="kb-kv", secret={**doc, "name": f"scale-{n:05d}"}
        )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(count - 1)))
    print(f"  {count:,} registry entries written in {time.perf_counter() - t0:.0f}s", flush=True)

    async def measure() -> tuple[float, float, int]:
        config = load_config(stack.layout.broker_config)
        client = vault_client(config.vault)
        await client.start()
        try:
            registry = registry_type(client, config.vault.kv_mount)
            start = time.perf_counter()
            names = await registry.names()
            old = [await registry.read(n) for n in names]  # before: one read after another
            before = time.perf_counter() - start
            start = time.perf_counter()
            new = await registry.all()  # after: bounded concurrent reads
            after = time.perf_counter() - start
            assert len(new) == len([o for o in old if o is not None])
            return before, after, len(new)
        finally:
            await client.close()

    before, after, listed = asyncio.run(measure())
    pages = []
    for _ in range(5):
        start = time.perf_counter()
        page = _call(stack, "/v1/keys?limit=100&after=scale-04000")
        pages.append(time.perf_counter() - start)
        assert len(page["keys"]) == 100
    start = time.perf_counter()
    whole = _call(stack, "/v1/keys")
    api_all = time.perf_counter() - start
    table(
        f"keys list with {listed:,} keys (OpenBao KV v2 on loopback)",
        ["what", "before s", "after s"],
        [
            ["whole registry, in process (N+1 reads)", f"{before:.2f}", f"{after:.2f}"],
            [
                "GET /v1/keys (every key, policy-filtered)",
                "—",
                f"{api_all:.2f} ({len(whole['keys']):,} keys)",
            ],
            [
                "GET /v1/keys?limit=100 (one page)",
                f"{before:.2f} (no paging)",
                f"{statistics.median(pages):.3f}",
            ],
        ],
    )


# -- serve --workers ----------------------------------------------------------------------


async def _hammer(
    url: str, tls: dict[str, str], body: bytes, concurrency: int, seconds: float
) -> tuple[int, int]:
    """Keep ``concurrency`` requests in flight for ``seconds`` (after 1 s of warm-up); count answers."""
    import ssl

    import aiohttp

    ctx = ssl.create_default_context(cafile=tls["ca"])
    ctx.load_cert_chain(tls["cert"], tls["key"])
    ok = errors = 0
    counting = False
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_loop(deadline: float) -> None:
            nonlocal ok, errors
            while time.monotonic() < deadline:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if counting:
                        ok, errors = (ok + 1, errors) if resp.status == 200 else (ok, errors + 1)

        async def switch() -> None:
            nonlocal counting
            await asyncio.sleep(1.0)
            counting = True

        deadline = time.monotonic() + 1.0 + seconds
        await asyncio.gather(switch(), *(one_loop(deadline) for _ in range(concurrency)))
    return ok, errors


def _hammer_process(args: tuple[str, dict[str, str], bytes, int, float]) -> tuple[int, int]:
    return asyncio.run(_hammer(*args))


def workers_bench(seconds: float, concurrency: int) -> None:
    import tomllib
    from multiprocessing import Pool

    from broker.devstack.common import child_env
    from broker.devstack.processes import spawn
    from broker.devstack.stack import DevStack, free_port

    with tempfile.TemporaryDirectory(prefix="kb-scale-workers-") as tmp:
        stack = DevStack(Path(tmp), broker_port=free_port())
        print("starting the stack for serve --workers ...", flush=True)
        stack.start()
        second = None
        try:
            port = free_port()
            config = Path(tmp) / "workers.toml"
            config.write_text(stack.render_broker_config(port=port))
            assert tomllib.loads(config.read_text())["server"]["port"] == port
            second = spawn(
                "broker-workers",
                [sys.executable, "-m", "broker", "serve", "--config", str(config), "--workers", "2"],
                log_path=Path(tmp) / "workers.log",
                env=child_env(SOFTHSM2_CONF=str(stack.layout.softhsm_conf), **stack.broker.env),
            )
            workers_url = f"https://127.0.0.1:{port}"
            stack.wait_healthy(second, workers_url, timeout=90)
            _call(stack, "/v1/keys", {"name": "scale-workers", "backend": "vault", "environment": "dev"})
            tls = {
                k: str(stack.layout.tls / f)
                for k, f in (("ca", "ca.pem"), ("cert", "admin.crt"), ("key", "admin.key"))
            }
            body = json.dumps(
                {"plaintext": base64.b64encode(b"x" * 64).decode(), "context": {"tenant": "acme"}}
            ).encode()
            rows = []
            for label, url in (
                ("1 worker (serve)", stack.broker_url),
                ("2 workers (serve --workers 2)", workers_url),
            ):
                target = f"{url}/v1/keys/scale-workers/encrypt"
                with Pool(2) as pool:  # two generator processes: the generator is not one core
                    parts = pool.map(_hammer_process, [(target, tls, body, concurrency // 2, seconds)] * 2)
                ok, errors = sum(p[0] for p in parts), sum(p[1] for p in parts)
                rows.append([label, f"{ok / seconds:.0f}", str(errors)])
            base = float(rows[0][1]) or 1.0
            for row in rows:
                row.append(f"{float(row[1]) / base:.2f}")
            table(
                f"serve --workers: vault encrypt 64 B, {concurrency} in flight, {seconds:g} s, audit ON",
                ["broker", "rps", "errors", "x 1 worker"],
                rows,
            )
        finally:
            if second is not None:
                second.stop(timeout=30)
            stack.stop()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_verify":
        verify_child(*sys.argv[2:5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "_timeline":
        timeline_child(*sys.argv[2:4])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k audit records and 1,000 keys")
    parser.add_argument(
        "--only", default="policy,keys,audit,workers", help="comma-separated: policy, keys, audit, workers"
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    print(
        f"bench.scale: before = commit {BASE}, after = this tree; {os.cpu_count()} cores "
        "(figures are noisy when the box is shared)"
    )
    if "policy" in parts:
        policy_bench()
    if "keys" in parts:
        keys_bench(1000 if args.quick else 10_000)
    if "audit" in parts:
        audit_bench([100_000] if args.quick else [100_000, 1_000_000])
        timeline_bench([100_000] if args.quick else [100_000, 1_000_000])
    if "workers" in parts:
        workers_bench(5.0 if args.quick else 15.0, 64)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
