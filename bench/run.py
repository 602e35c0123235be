"""Broker vs direct Vault, KMS and HSM, side by side, in one run on this machine.

    make bench                       # the full matrix, the soak and the event-loop check
    .venv/bin/python -m bench.run --quick

Starts the real local stack on loopback (OpenBao with a TLS listener that both
the broker and the direct client use, the moto KMS server, SoftHSM2, the broker
with fail-closed audit ON), then for each backend, operation (encrypt, decrypt)
and concurrency (1, 16, 64, 256; 64 B payload, 4 KiB at c64; context of two
fields) measures the direct call and the broker's. HTTP cells (the broker, direct
Vault) are driven by the compiled generator (bench/loadgen, Go); direct KMS (boto3)
and the direct HSM (an in-process PKCS#11 call) by bench/loadgen.py. Every cell
reports the generator's share of the box's CPU and the box's idle share
(/proc/stat), so a cell limited by its generator shows as one.

Then: one request's latency broken down by stage at concurrency 1 (the broker's
KEYBROKER_SPANS_FILE profiling, switched on only for that phase), a memory soak
(broker encrypts on all three backends at concurrency 256, RSS peak and final),
and a second broker with asyncio debug on to show no callback blocks the loop 10 ms.
Prints the tables, writes JSON and a PNG chart to bench/results/.
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import gogen
from bench.loadgen import Result, Target, http_body, run_worker
from broker.devstack.stack import DevStack, find_softhsm_library, free_port

CONTEXT = {"tenant": "acme", "purpose": "bench"}
RESULTS = Path(__file__).parent / "results"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    backend: str
    op: str
    payload: int
    concurrency: int
    mode: str  # direct | broker
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str
    generator_cpu_pct: float
    idle_pct: float = 0.0
    generator: str = "python"
    p90_ms: float = 0.0
    max_ms: float = 0.0
    errors_by_kind: dict[str, int] | None = None
    broker_cpu_s_per_1k: float | None = None
    broker_rss_mb: float | None = None
    ratio: float | None = None


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (VmRSS) or at its peak so far (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def box_ticks() -> tuple[int, int]:
    """(idle, total) CPU ticks of the whole machine since boot, from /proc/stat; idle counts iowait."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def idle_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Percent of the machine's CPU time left idle between two box_ticks() readings."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0


class Bench:
    def __init__(self, state: Path, *, broker_env: dict[str, str] | None = None) -> None:
        self.stack = DevStack(state, broker_port=free_port(), vault_tls=True, broker_env=broker_env)

    # -- set-up ------------------------------------------------------------------------

    def start(self) -> None:
        print("starting the stack (OpenBao + TLS listener, KMS server, SoftHSM2, broker) ...", flush=True)
        info = self.stack.start()
        print(f"  ready in {info.startup_seconds:.1f}s", flush=True)
        self.keys = {b: self._create_key(b) for b in ("vault", "kms", "hsm")}
        self.vault_token = self.stack.vault_client().auth.token.create(
            policies=["keybroker-broker"], ttl="4h"
        )["auth"]["client_token"]

    @property
    def broker_pid(self) -> int:
        return int(self.stack.children["broker"].process.pid)

    def _call(self, path: str, body: Any, who: str = "admin") -> Any:
        request = urllib.request.Request(  # noqa: S310 - https to our own loopback broker
            self.stack.broker_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, context=self.stack.client_ssl(who), timeout=30) as resp:  # noqa: S310
            return json.load(resp)

    def _create_key(self, backend: str) -> dict[str, str]:
        name = f"bench-{backend}"
        body = {"name": name, "backend": backend, "environment": "dev", "tags": {"app": "app"}}
        key = self._call("/v1/keys", body)
        record = self.stack.vault_client().secrets.kv.v2.read_secret_version(
            path=f"keys/{name}", mount_point="kb-kv", raise_on_deleted_version=True
        )["data"]["data"]
        return {"name": key["name"], "material": str(record["versions"][0]["material"])}

    # -- targets -----------------------------------------------------------------------

    def _broker_sealed(self, name: str, payload: bytes) -> str:
        """A broker ciphertext of ``payload`` under CONTEXT, for decrypt cells to send."""
        body = {"plaintext": base64.b64encode(payload).decode(), "context": CONTEXT}
        return str(self._call(f"/v1/keys/{name}/encrypt", body, who="app")["ciphertext"])

    def target(self, backend: str, mode: str, op: str, payload: bytes) -> Target:
        key = self.keys[backend]
        tls = self.stack.layout.tls
        if mode == "broker":
            t = Target(
                kind="broker",
                op=op,
                payload=payload,
                context=CONTEXT,
                url=f"{self.stack.broker_url}/v1/keys/{key['name']}/{op}",
                ca_file=str(tls / "ca.pem"),
                cert_file=str(tls / "app.crt"),
                key_file=str(tls / "app.key"),
                expect_prefix=f"kb1:{key['name']}:1:",
            )
            if op == "decrypt":
                t = replace(t, ciphertext=self._broker_sealed(key["name"], payload))
            return t
        if backend == "vault":
            t = Target(
                kind="vault-direct",
                op=op,
                payload=payload,
                context=CONTEXT,
                url=f"{self.stack.broker_vault_addr}/v1/kb-transit/{op}/{key['name']}",
                headers={"X-Vault-Token": self.vault_token},
                ca_file=str(self.stack.layout.vault_dir / "tls" / "ca.pem"),
                expect_prefix="vault:v1:",
            )
            if op == "decrypt":
                out = self.stack.vault_client().secrets.transit.encrypt_data(
                    name=key["name"],
                    plaintext=base64.b64encode(payload).decode(),
                    associated_data=base64.b64encode(
                        json.dumps(CONTEXT, sort_keys=True, separators=(",", ":")).encode()
                    ).decode(),
                    mount_point="kb-transit",
                )
                t = replace(t, ciphertext=out["data"]["ciphertext"])
            return t
        if backend == "kms":
            t = Target(
                kind="kms-direct", op=op, payload=payload, context=CONTEXT, key_id=key["material"],
                kms_endpoint=self.stack.kms_endpoint,
            )  # fmt: skip
            if op == "decrypt":
                blob = self.stack.kms_client().encrypt(
                    KeyId=key["material"], Plaintext=payload, EncryptionContext=CONTEXT
                )["CiphertextBlob"]
                t = replace(t, ciphertext=base64.b64encode(blob).decode())
            return t
        t = Target(
            kind="hsm-direct",
            op=op,
            payload=payload,
            context=CONTEXT,
            key_id=key["material"],
            hsm_library=str(find_softhsm_library()),
            hsm_label=f"kb:{key['name']}",
            hsm_pin=self.stack.layout.hsm_pin.read_text().strip(),
            softhsm_conf=str(self.stack.layout.softhsm_conf),
        )
        if op == "decrypt":
            sealed = self._broker_sealed(key["name"], payload)
            t = replace(t, ciphertext=base64.urlsafe_b64encode(_payload_of(sealed)).decode())
        return t

    # -- running -----------------------------------------------------------------------

    def measure(self, target: Target, concurrency: int, warmup: float, duration: float) -> Row:
        if target.kind in ("broker", "vault-direct"):
            return self._measure_go(target, concurrency, warmup, duration)
        return self._measure_python(target, concurrency, warmup, duration)

    def _measure_go(self, target: Target, concurrency: int, warmup: float, duration: float) -> Row:
        broker = target.kind == "broker"
        cell = gogen.HttpCell(
            url=target.url,
            body=json.dumps(http_body(target)).encode(),
            ca_file=target.ca_file,
            cert_file=target.cert_file,
            key_file=target.key_file,
            headers=tuple(target.headers.items()),
            field=("" if broker else "data.") + ("ciphertext" if target.op == "encrypt" else "plaintext"),
            prefix=target.expect_prefix if target.op == "encrypt" else "",
            equals=base64.b64encode(target.payload).decode() if target.op == "decrypt" else "",
        )
        cpu0 = proc_cpu_seconds(self.broker_pid) if broker else 0.0
        ticks0 = box_ticks()
        out = gogen.run(cell, concurrency, warmup, duration)
        idle = idle_share(ticks0, box_ticks())
        broker_cpu = proc_cpu_seconds(self.broker_pid) - cpu0 if broker else 0.0
        ok = int(out["ok"])
        return Row(
            backend="",
            op=target.op,
            payload=len(target.payload),
            concurrency=concurrency,
            mode="broker" if broker else "direct",
            rps=float(out["rps"]),
            p50_ms=float(out["p50_ms"]),
            p90_ms=float(out["p90_ms"]),
            p99_ms=float(out["p99_ms"]),
            max_ms=float(out["max_ms"]),
            errors=int(out["errors"]),
            errors_by_kind=dict(out["errors_by_kind"]),
            first_error=str(out["first_error"]),
            generator="go",
            generator_cpu_pct=100
            * float(out["cpu_seconds"])
            / float(out["wall_seconds"])
            / (os.cpu_count() or 1),
            idle_pct=idle,
            broker_cpu_s_per_1k=(broker_cpu / ok * 1000 * duration / (warmup + duration))
            if broker and ok
            else None,
            broker_rss_mb=proc_rss_mb(self.broker_pid) if broker else None,
        )

    def _measure_python(self, target: Target, concurrency: int, warmup: float, duration: float) -> Row:
        processes = 1 if concurrency == 1 else 2
        shares = [
            concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)
        ]
        broker = target.kind == "broker"
        cpu0 = proc_cpu_seconds(self.broker_pid) if broker else 0.0
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=processes, mp_context=ctx) as pool:
            # The pool's processes start (and import boto3/pkcs11) before the clock: not idle time lost.
            list(pool.map(abs, range(processes)))
            ticks0 = box_ticks()
            futures = [pool.submit(run_worker, target, share, warmup, duration) for share in shares]
            results: list[Result] = [f.result() for f in futures]
            idle = idle_share(ticks0, box_ticks())
        broker_cpu = proc_cpu_seconds(self.broker_pid) - cpu0 if broker else 0.0
        ok = sum(r.ok for r in results)
        latencies = sorted(x for r in results for x in r.latencies)
        errors = sum(r.errors for r in results)
        total_cpu = sum(r.cpu_seconds for r in results)
        return Row(
            backend="",
            op=target.op,
            payload=len(target.payload),
            concurrency=concurrency,
            mode="broker" if broker else "direct",
            rps=ok / duration,
            p50_ms=_pct(latencies, 50) * 1000,
            p90_ms=_pct(latencies, 90) * 1000,
            p99_ms=_pct(latencies, 99) * 1000,
            max_ms=(latencies[-1] * 1000) if latencies else 0.0,
            idle_pct=idle,
            errors=errors,
            first_error=next((r.first_error for r in results if r.first_error), ""),
            generator_cpu_pct=100 * total_cpu / (warmup + duration) / (os.cpu_count() or 1),
            # The broker's CPU over warm-up and measurement, per request completed in the window.
            broker_cpu_s_per_1k=(broker_cpu / ok * 1000 * duration / (warmup + duration))
            if broker and ok
            else None,
            broker_rss_mb=proc_rss_mb(self.broker_pid) if broker else None,
        )


def _payload_of(sealed: str) -> bytes:
    text = sealed.rsplit(":", 1)[1]
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(len(values) * pct / 100))]


def print_table(rows: list[Row]) -> None:
    """Direct (A) beside broker (B) per cell; gen/idle: the generators' and the box's CPU share (A/B)."""
    head = (
        f"{'backend':<7} {'op':<8} {'bytes':>5} {'conc':>4}  "
        f"{'A rps':>7} {'B rps':>7} {'B/A':>5}  "
        f"{'p50 A':>7} {'p50 B':>7} {'p99 A':>7} {'p99 B':>7} {'max B':>7}  {'err':>3}  "
        f"{'B cpu s/1k':>10} {'B RSS MB':>8}  {'gen% A/B':>9} {'idle% A/B':>9}"
    )
    print(head + "   (latencies in ms)")
    print("-" * len(head))
    pairs: dict[tuple[str, str, int, int], dict[str, Row]] = {}
    for row in rows:
        pairs.setdefault((row.backend, row.op, row.payload, row.concurrency), {})[row.mode] = row
    for (backend, op, size, conc), pair in pairs.items():
        a, b = pair.get("direct"), pair.get("broker")
        if a is None or b is None:
            continue
        print(
            f"{backend:<7} {op:<8} {size:>5} {conc:>4}  "
            f"{a.rps:>7.0f} {b.rps:>7.0f} {b.rps / a.rps if a.rps else 0:>5.2f}  "
            f"{a.p50_ms:>7.2f} {b.p50_ms:>7.2f} {a.p99_ms:>7.2f} {b.p99_ms:>7.2f} {b.max_ms:>7.1f}  "
            f"{a.errors + b.errors:>3}  "
            f"{b.broker_cpu_s_per_1k or 0:>10.3f} {b.broker_rss_mb or 0:>8.1f}  "
            f"{a.generator_cpu_pct:>4.0f}/{b.generator_cpu_pct:<4.0f} {a.idle_pct:>4.0f}/{b.idle_pct:<4.0f}"
        )
    print(
        "A: direct (Vault over TLS with the Go generator; KMS via boto3 and the HSM in-process via "
        "bench/loadgen.py); B: the broker over mTLS with the Go generator."
    )


def chart(rows: list[Row], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no chart; `pip install -e '.[bench]'`)")
        return False
    backends = sorted({r.backend for r in rows})
    fig, axes = plt.subplots(2, len(backends), figsize=(5 * len(backends), 8), squeeze=False)
    for col, backend in enumerate(backends):
        for mode, style in (("direct", "--"), ("broker", "-")):
            for op, color in (("encrypt", "tab:blue"), ("decrypt", "tab:orange")):
                picked = sorted(
                    (r for r in rows if (r.backend, r.mode, r.op, r.payload) == (backend, mode, op, 64)),
                    key=lambda r: r.concurrency,
                )
                if not picked:
                    continue
                xs = [r.concurrency for r in picked]
                label = f"{mode} {op}"
                axes[0][col].plot(xs, [r.rps for r in picked], style, color=color, marker="o", label=label)
                axes[1][col].plot(xs, [r.p99_ms for r in picked], style, color=color, marker="o", label=label)
        axes[0][col].set_title(f"{backend}: throughput (64 B)")
        axes[0][col].set_ylabel("requests/s")
        axes[1][col].set_title(f"{backend}: p99 latency (64 B)")
        axes[1][col].set_ylabel("ms")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle("keybroker (solid) vs direct (dashed), audit on, one 2-core machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def soak(bench: Bench, total: int, concurrency: int) -> tuple[list[tuple[int, float, str]], int]:
    """Drive ``total`` broker encrypts in slices across Vault, KMS and the HSM; RSS after each slice.

    Each backend gets a third of the requests (KMS is the slowest: its slices are longer). The
    samples are (requests so far, RSS MB, backend of the slice); the peak is the kernel's VmHWM.
    """
    backends = ("vault", "kms", "hsm")
    targets = {b: bench.target(b, "broker", "encrypt", os.urandom(64)) for b in backends}
    rates = dict.fromkeys(backends, 500.0)
    samples: list[tuple[int, float, str]] = []
    done, slices, errors = 0, 0, 0
    print(
        f"soak: {total} broker encrypts at concurrency {concurrency} over {', '.join(backends)}, "
        "RSS after every slice",
        flush=True,
    )
    while done < total:
        backend = backends[slices % len(backends)]
        slices += 1
        seconds = min(30.0, max(1.0, min(total - done, total / 15) / rates[backend]))
        row = bench.measure(targets[backend], concurrency, 0.2, seconds)
        if row.errors:
            errors += row.errors
            print(f"  errors during soak: {row.errors} ({row.first_error})")
        rates[backend] = max(row.rps, 1.0)
        done += max(1, round(row.rps * seconds))
        samples.append((done, proc_rss_mb(bench.broker_pid), backend))
        print(
            f"  {done:>7} requests: broker RSS {samples[-1][1]:.1f} MB after {backend} ({row.rps:.0f} rps)",
            flush=True,
        )
    return samples, errors


# The stages of one request, in the order it passes them (broker/spans.py names them).
STAGES = (
    ("parse", "HTTP parse and dispatch (first byte to the middlewares)"),
    ("identity", "identity: certificate to principal, CRL check"),
    ("own", "handler: body, JSON, policy decision, key cache"),
    ("backend", "backend round trip (Vault: incl. the batching turn)"),
    ("audit_build", "audit record built (HMACs, canonical fields)"),
    ("audit_handoff", "audit hand-off to the writer and back"),
    ("audit_write_fsync", "audit write + fsync (the writer thread)"),
    ("log", "log line and metrics"),
    ("respond", "response written (headers, JSON, TLS)"),
)


def profile(bench: Bench, spans_file: Path, duration: float) -> dict[str, Any]:
    """One request at a time, broken down by stage from the broker's spans, per backend (median ms)."""
    out: dict[str, Any] = {}
    for backend in ("vault", "hsm"):
        payload = os.urandom(64)
        direct = bench.measure(bench.target(backend, "direct", "encrypt", payload), 1, 0.5, duration)
        offset = spans_file.stat().st_size if spans_file.exists() else 0
        os.kill(bench.broker_pid, signal.SIGUSR1)  # recording on
        try:
            broker = bench.measure(bench.target(backend, "broker", "encrypt", payload), 1, 0.5, duration)
        finally:
            os.kill(bench.broker_pid, signal.SIGUSR1)  # off: the broker flushes the file
        deadline = time.monotonic() + 10
        records: list[dict[str, int]] = []
        while time.monotonic() < deadline:
            if spans_file.exists():
                with spans_file.open() as fh:
                    fh.seek(offset)
                    records = [json.loads(line) for line in fh if line.endswith("\n")]
                if len(records) >= broker.rps * duration * 0.5:
                    break
            time.sleep(0.2)
        if not records:
            print(f"profile {backend}: no spans recorded (is KEYBROKER_SPANS_FILE honoured?)")
            continue
        for r in records:
            r["own"] = r.get("inner", 0) - r.get("identity", 0) - r.get("backend", 0)
            r["audit_handoff"] = r.get("audit_append", 0) - r.get("audit_write_fsync", 0)
            r["server"] = (
                r.get("parse", 0) + r.get("inner", 0) + r.get("audit_build", 0) + r.get("audit_append", 0)
                + r.get("log", 0) + r.get("respond", 0)
            )  # fmt: skip
        medians = {
            name: statistics.median(r.get(name, 0) for r in records) / 1e6
            for name, _ in (*STAGES, ("server", ""))
        }
        out[backend] = {
            "requests": len(records),
            "stages_ms": medians,
            "client_p50_ms": broker.p50_ms,
            "direct_p50_ms": direct.p50_ms,
            "added_p50_ms": broker.p50_ms - direct.p50_ms,
        }
    return out


def print_breakdown(breakdown: dict[str, Any]) -> None:
    for backend, facts in breakdown.items():
        stages = facts["stages_ms"]
        print(
            f"one {backend} encrypt at concurrency 1, median of {facts['requests']} requests "
            "(broker spans, KEYBROKER_SPANS_FILE):"
        )
        for name, label in STAGES:
            print(f"  {label:<58} {stages[name]:>7.3f} ms")
        rest = facts["client_p50_ms"] - stages["server"]
        print(f"  {'sum inside the broker':<58} {stages['server']:>7.3f} ms")
        print(f"  {'TLS records, sockets, loop wake-ups, the client (rest)':<58} {rest:>7.3f} ms")
        print(
            f"  client p50 {facts['client_p50_ms']:.3f} ms; direct p50 {facts['direct_p50_ms']:.3f} ms; "
            f"added by the broker {facts['added_p50_ms']:+.3f} ms"
        )


def loop_check(duration: float) -> int:
    """A second stack whose broker runs asyncio in debug mode (slow callback = 10 ms) under load."""
    with tempfile.TemporaryDirectory(prefix="kb-bench-debug-") as tmp:
        bench = Bench(Path(tmp), broker_env={"KEYBROKER_ASYNCIO_DEBUG_MS": "10"})
        bench.start()
        try:
            for backend in ("vault", "kms", "hsm"):
                bench.measure(bench.target(backend, "broker", "encrypt", os.urandom(64)), 64, 0.5, duration)
            log = (bench.stack.layout.logs / "broker.log").read_text()
        finally:
            bench.stack.stop()
    slow = re.findall(r"Executing .* took [0-9.]+ seconds", log)
    print(f"event loop under load with asyncio debug (slow callback > 10 ms): {len(slow)} warnings")
    for line in slow[:5]:
        print(f"  {line}")
    return len(slow)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64 B only, concurrency 1 and 64, shorter runs")
    parser.add_argument("--duration", type=float, default=None, help="seconds measured per cell (default 3)")
    parser.add_argument(
        "--concurrency", type=int, action="append", help="concurrencies to measure (default 1 16 64 256)"
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=30_000,
        help="broker requests in the memory soak, over all three backends at --soak-concurrency "
        "(0: skip; the issue's check is --soak 200000, about 5 more minutes)",
    )
    parser.add_argument("--soak-concurrency", type=int, default=256)
    parser.add_argument("--no-profile", action="store_true", help="skip the per-stage breakdown at c1")
    parser.add_argument("--no-loop-check", action="store_true", help="skip the asyncio debug run")
    parser.add_argument("--only", choices=["vault", "kms", "hsm"], action="append", help="limit to backends")
    parser.add_argument("--ops", choices=["encrypt", "decrypt"], action="append", help="limit to operations")
    parser.add_argument(
        "--broker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="run the broker with this setting, e.g. KEYBROKER__VAULT__COALESCE=false (A/B runs)",
    )
    args = parser.parse_args()
    gogen.build()  # before the stack starts: a missing toolchain fails in a second, not after minutes
    duration = args.duration or (1.5 if args.quick else 3.0)
    concurrencies = args.concurrency or ([1, 64] if args.quick else [1, 16, 64, 256])
    # 4 KiB payloads only at one concurrency: what a payload's size costs, without doubling the run.
    big = [] if args.quick else [(4096, 64)]
    backends = args.only or ["vault", "kms", "hsm"]
    ops = args.ops or ["encrypt", "decrypt"]
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[Row] = []
    soak_samples: list[tuple[int, float, str]] = []
    soak_errors = 0
    peak_rss = 0.0
    breakdown: dict[str, Any] = {}
    broker_env = dict(pair.split("=", 1) for pair in args.broker_env)
    if broker_env:
        print(f"broker settings: {broker_env}")
    with tempfile.TemporaryDirectory(prefix="kb-bench-") as tmp:
        spans_file = Path(tmp) / "spans.jsonl"
        bench = Bench(Path(tmp), broker_env={"KEYBROKER_SPANS_FILE": str(spans_file), **broker_env})
        bench.start()
        try:
            for backend in backends:
                for op in ops:
                    cells = [(64, c) for c in concurrencies] + big
                    for size, conc in cells:
                        payload = os.urandom(size)
                        for mode in ("direct", "broker"):
                            row = bench.measure(bench.target(backend, mode, op, payload), conc, 0.5, duration)
                            row.backend = backend
                            rows.append(row)
                        a, b = rows[-2], rows[-1]
                        b.ratio = b.rps / a.rps if a.rps else None
                        print(
                            f"  {backend} {op} {size}B c{conc}: direct {a.rps:.0f} rps, "
                            f"broker {b.rps:.0f} rps (x{b.ratio or 0:.2f}), "
                            f"p50 {a.p50_ms:.2f}/{b.p50_ms:.2f} ms, errors {a.errors + b.errors}",
                            flush=True,
                        )
            if not args.no_profile:
                breakdown = profile(bench, spans_file, duration)
            if args.soak:
                soak_samples, soak_errors = soak(bench, args.soak, args.soak_concurrency)
            peak_rss = proc_rss_mb(bench.broker_pid, "VmHWM")
        finally:
            bench.stack.stop()
    print()
    print_table(rows)
    if breakdown:
        print()
        print_breakdown(breakdown)
    errors = sum(r.errors for r in rows) + soak_errors
    slow = 0 if args.no_loop_check else loop_check(duration)
    out = RESULTS / f"bench-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "rows": [asdict(r) for r in rows],
                "breakdown_c1": breakdown,
                "soak_rss_mb": soak_samples,
                "soak_errors": soak_errors,
                "peak_rss_mb": peak_rss,
                "slow_callbacks": slow,
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            },
            indent=2,
        )
    )
    png = RESULTS / f"bench-{stamp}.png"
    drew = chart(rows, png)
    print(f"\nresults: {out}" + (f", chart: {png}" if drew else ""))
    if soak_samples:
        half = [rss for n, rss, _ in soak_samples if n >= soak_samples[-1][0] / 2]
        print(
            f"soak: RSS {soak_samples[0][1]:.1f} MB after {soak_samples[0][0]} requests, final "
            f"{soak_samples[-1][1]:.1f} MB after {soak_samples[-1][0]}, peak {peak_rss:.1f} MB (VmHWM, "
            f"whole run); growth over the last half {max(half) - min(half):.1f} MB "
            f"(median {statistics.median(half):.1f} MB)"
        )
    print(f"errors in all cells and the soak: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
