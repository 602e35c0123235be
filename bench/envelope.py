"""kbe1 envelope encryption vs the AWS Encryption SDK for Python vs ``cat``, side by side in one run.

    .venv/bin/python -m bench.envelope [--skip-1gib] [--dir DIR] [--small 1000]
    .venv/bin/python -m bench.envelope --raw [--skip-1gib]    # the library alone vs cat, no stack

Starts the local stack (``broker.devstack``: moto KMS server, OpenBao, SoftHSM, the broker) in
a temporary directory. kbe1 gets its data key from the broker (a ``kms`` key, over mTLS, audited);
the Encryption SDK (commitment policy REQUIRE_ENCRYPT_REQUIRE_DECRYPT, its default framed suite)
calls the same moto KMS server directly with a key of its own. Each large-file run is a child
process, so its peak RSS (``wait4``) is its own; the growth column is peak minus the child's
RSS right before the operation. Small messages: 1 KiB each, data-key caching on both sides
(max_messages 100, max age 300 s). ``--raw`` times only the kbe1 library with a fixed data
key (no broker, no stack) against ``cat``: where the streaming itself stands. Numbers from a
shared, loaded 2-core box are noisy.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
RAW_KEY = bytes(range(32))  # --raw: a fixed data key, the broker out of the picture
SIZES = {"1 MiB": MIB, "64 MiB": 64 * MIB, "1 GiB": 1024 * MIB}


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc. Not ru_maxrss: Linux carries the
    parent's RSS at fork into a child's ru_maxrss, across exec."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


# -- child processes ------------------------------------------------------------------------------


def _esdk(kms_key: str) -> tuple[Any, Any, list[int]]:
    import aws_encryption_sdk
    import botocore.session
    from aws_encryption_sdk.identifiers import CommitmentPolicy

    calls = [0]
    session = botocore.session.Session()

    def count(**_: Any) -> None:
        calls[0] += 1

    session.register("before-call.kms", count)
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(key_ids=[kms_key], botocore_session=session)
    return client, provider, calls


def _keybroker(cfg: dict[str, Any]) -> Any:
    from broker.cli.client import BrokerClient
    from broker.config.tls import client_ssl_context
    from broker.envelope import CountingKeySource

    tls = Path(cfg["tls"])
    ctx = client_ssl_context(tls / "ca.pem", tls / "admin.crt", tls / "admin.key")
    return CountingKeySource(BrokerClient(cfg["url"], ctx))


def child(tool: str, op: str, src: str, dst: str, cfg: dict[str, Any]) -> None:
    """One large-file operation; prints {"seconds", "cpu_seconds", "baseline_mib", "peak_mib"}."""
    context = {"tenant": "bench"}
    if tool == "raw":
        from broker.envelope import open_with_data_key, seal_with_data_key

        base = _status_mib("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            if op == "encrypt":
                seal_with_data_key(RAW_KEY, ["kb1:bench:1:AAAA"], fin, fout, context)
            else:
                open_with_data_key(RAW_KEY, fin, fout, context)
    elif tool == "kbe1":
        from broker.envelope import Envelope

        env = Envelope(_keybroker(cfg))
        base = _status_mib("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            if op == "encrypt":
                env.encrypt(cfg["key"], fin, fout, context)
            else:
                env.decrypt(fin, fout, context)
    else:
        client, provider, _ = _esdk(cfg["kms_key"])
        base = _status_mib("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            mode = "e" if op == "encrypt" else "d"
            kw = {"encryption_context": context} if op == "encrypt" else {}
            with client.stream(mode=mode, source=fin, key_provider=provider, **kw) as stream:
                for chunk in stream:
                    fout.write(chunk)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # user + system, every thread
    print(
        json.dumps(
            {"seconds": seconds, "cpu_seconds": cpu, "baseline_mib": base, "peak_mib": _status_mib("VmHWM")}
        )
    )


def _run(
    argv: list[str], stdout: Any = subprocess.PIPE, stdin: Any = None
) -> tuple[float, float, str, float]:
    """Run a child; return (wall seconds, peak RSS MiB, its stdout, its CPU seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stdin=stdin, env=os.environ)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out = proc.stdout.read().decode() if proc.stdout is not None else ""
    if status != 0:
        raise SystemExit(f"{argv} failed with status {status}")
    return wall, usage.ru_maxrss / 1024, out, usage.ru_utime + usage.ru_stime


# -- the run --------------------------------------------------------------------------------------


def large(
    workdir: Path, sizes: dict[str, int], cfg: dict[str, Any], tools: tuple[str, ...] = ("kbe1", "esdk")
) -> list[list[str]]:
    rows: list[list[str]] = []
    for label, size in sizes.items():
        plain = workdir / "plain.bin"
        with open(plain, "wb") as fh:
            # Fresh random bytes for every MiB, like real data: one block written over and over
            # gives the machine thousands of identical pages, which a host may treat specially.
            for _ in range(size // MIB):
                fh.write(os.urandom(MIB))
        # Every timed run starts with no dirty pages left by the one before, so that it does not
        # compete with the kernel flushing the previous gigabyte (the order of runs would count).
        os.sync()
        with open(plain, "rb") as fin, open(workdir / "copy.bin", "wb") as fout:
            wall, _, _, cat_cpu = _run(["cat"], stdout=fout, stdin=fin)
        cat_speed, cat_per_cpu = size / MIB / wall, size / MIB / max(cat_cpu, 1e-3)
        rows.append(
            [label, "cat", "copy", f"{cat_speed:,.0f}", "1.00", f"{cat_per_cpu:,.0f}", "1.00", "-", "-"]
        )
        for tool in tools:
            sealed, back = workdir / f"{tool}.sealed", workdir / f"{tool}.back"
            for op, src, dst in (("encrypt", plain, sealed), ("decrypt", sealed, back)):
                argv = [
                    sys.executable,
                    "-m",
                    "bench.envelope",
                    "--child",
                    tool,
                    op,
                    str(src),
                    str(dst),
                    json.dumps(cfg),
                ]
                os.sync()
                _, _, out, _ = _run(argv)
                doc = json.loads(out)
                peak = doc["peak_mib"]
                speed = size / MIB / doc["seconds"]
                per_cpu = size / MIB / max(doc["cpu_seconds"], 1e-3)
                growth = peak - doc["baseline_mib"]
                rows.append(
                    [
                        label,
                        tool,
                        op,
                        f"{speed:,.0f}",
                        f"{speed / cat_speed:.2f}",
                        f"{per_cpu:,.0f}",
                        f"{per_cpu / cat_per_cpu:.2f}",
                        f"{peak:,.0f}",
                        f"{growth:,.1f}",
                    ]
                )
            if not filecmp.cmp(back, plain, shallow=False):
                raise SystemExit(f"{tool}: the decrypted file differs from the original")
            sealed.unlink()
            back.unlink()
    return rows


def small(count: int, cfg: dict[str, Any]) -> list[list[str]]:
    import aws_encryption_sdk

    from broker.envelope import DataKeyCache, Envelope

    record, context = os.urandom(1024), {"tenant": "bench"}
    rows = []

    keys = _keybroker(cfg)
    cache = DataKeyCache(300, max_messages=100)
    env = Envelope(keys, cache=cache)
    start = time.perf_counter()
    sealed = [env.encrypt_bytes(cfg["key"], record, context) for _ in range(count)]
    enc = count / (time.perf_counter() - start)
    enc_calls = keys.calls
    start = time.perf_counter()
    for message in sealed:
        env.decrypt_bytes(message, context)
    dec = count / (time.perf_counter() - start)
    rows.append(
        ["kbe1 + DataKeyCache", f"{enc_calls}", f"{keys.calls - enc_calls}", f"{enc:,.0f}", f"{dec:,.0f}"]
    )

    client, provider, calls = _esdk(cfg["kms_key"])
    cmm = aws_encryption_sdk.CachingCryptoMaterialsManager(
        master_key_provider=provider,
        cache=aws_encryption_sdk.LocalCryptoMaterialsCache(capacity=100),
        max_age=300.0,
        max_messages_encrypted=100,
    )
    start = time.perf_counter()
    esdk_sealed = [
        client.encrypt(source=record, materials_manager=cmm, encryption_context=context)[0]
        for _ in range(count)
    ]
    enc = count / (time.perf_counter() - start)
    enc_calls = calls[0]
    start = time.perf_counter()
    for message in esdk_sealed:
        client.decrypt(source=message, materials_manager=cmm)
    dec = count / (time.perf_counter() - start)
    rows.append(
        ["ESDK + caching CMM", f"{enc_calls}", f"{calls[0] - enc_calls}", f"{enc:,.0f}", f"{dec:,.0f}"]
    )
    return rows


HEADERS = ["size", "tool", "op", "MiB/s", "x cat", "MiB per CPU-s", "x cat (CPU)", "peak RSS", "RSS growth"]


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], json.loads(sys.argv[6]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-1gib", action="store_true", help="leave out the 1 GiB row")
    parser.add_argument("--dir", help="where the test files go (default: a temporary directory)")
    parser.add_argument("--small", type=int, default=1000, help="how many 1 KiB messages")
    parser.add_argument("--raw", action="store_true", help="only the kbe1 library with a fixed data key")
    args = parser.parse_args()
    sizes = {k: v for k, v in SIZES.items() if not (args.skip_1gib and v > 64 * MIB)}
    if args.raw:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            rows = large(Path(tmp), sizes, {}, tools=("raw",))
        print("\nkbe1 library, fixed data key (MiB/s of plaintext; x cat; RSS in MiB)\n")
        print(table(HEADERS, rows))
        return

    from broker.devstack.common import DEV_AWS_ENV
    from broker.devstack.stack import DevStack, free_port
    from tests.integration.conftest import https

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        stack = DevStack(workdir / "stack", broker_port=free_port())
        stack.start()
        try:
            name = f"bench-{os.urandom(4).hex()}"
            reply = https(
                stack,
                "/v1/keys",
                body={"name": name, "backend": "kms", "type": "aes256-gcm", "environment": "dev"},
            )
            assert reply.status == 201, reply.body
            for var, value in DEV_AWS_ENV.items():
                os.environ.setdefault(var, value)
            os.environ["AWS_ENDPOINT_URL_KMS"] = stack.kms_endpoint
            kms_key = stack.kms.client().create_key(Description="bench: Encryption SDK")["KeyMetadata"]["Arn"]
            cfg = {"url": stack.broker_url, "tls": str(stack.layout.tls), "key": name, "kms_key": kms_key}
            big = large(workdir, sizes, cfg)
            few = small(args.small, cfg)
        finally:
            stack.stop()
    print(
        "\nLarge files (MiB/s of plaintext; x cat = fraction of cat's copy speed; MiB per CPU-s = "
        "plaintext per second of CPU, user + system, all threads: steadier on a loaded box; RSS in MiB)\n"
    )
    print(table(HEADERS, big))
    print(f"\n{args.small} messages of 1 KiB, caching on (max_messages 100, max_age 300 s)\n")
    print(
        table(
            ["", "data-key calls (encrypt)", "unwrap calls (decrypt)", "encrypt msg/s", "decrypt msg/s"], few
        )
    )
    print("\nMeasured on a shared, loaded 2-core machine (other processes compete for the CPU): noisy.")


if __name__ == "__main__":
    main()
