"""docker-compose.yml, the Dockerfile and ``keybroker deploy init`` fit together.

No container engine runs here, so nothing is started: the compose file is parsed and every
file it mounts, every secret, port, config key and command it names is checked against what
``deploy init`` writes, the Dockerfile builds and the CLI accepts; each broker config is run
through ``keybroker serve --check-config`` with the container paths mapped to the files
behind them. The AppRole files come from the ``vault-init`` service at run time (a live
Vault), so the check gets stand-ins for those two and says so.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.cli import build_parser
from broker.cli.deploy import init

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DIR_VAR = re.compile(r"\$\{KEYBROKER_DEPLOY_DIR:-([^}]*)\}")


@pytest.fixture(scope="module")
def deploy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deploy") / "state"
    init(out, trust_domain="keybroker.dev")
    return out


@pytest.fixture(scope="module")
def compose(deploy_dir: Path) -> dict[str, Any]:
    """The compose file as `docker compose` reads it, with KEYBROKER_DEPLOY_DIR set to ``deploy_dir``."""
    text = COMPOSE.read_text()
    assert DIR_VAR.search(text), "the compose file should name its files through KEYBROKER_DEPLOY_DIR"
    text = DIR_VAR.sub(str(deploy_dir), text)
    assert "${" not in text.replace("$${", ""), "an interpolation nobody sets"
    loaded: dict[str, Any] = yaml.safe_load(text.replace("$$", "$"))
    return loaded


def mounts(service: dict[str, Any]) -> tuple[dict[str, Path], dict[str, str]]:
    """(container path → host path for bind mounts, container path → named volume)."""
    binds: dict[str, Path] = {}
    named: dict[str, str] = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        if source.startswith(("/", ".")):
            binds[target] = (REPO / source).resolve()
        else:
            named[target] = source
    return binds, named


def services_of(compose: dict[str, Any], image_prefix: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith(image_prefix)}


def brokers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if (s.get("command") or [None])[0] == "serve"}


def dockerfile_stages() -> list[tuple[str, str, list[str]]]:
    """(image, stage name, instruction lines) per FROM, ARGs before the first FROM substituted."""
    lines = [ln.strip() for ln in DOCKERFILE.read_text().replace("\\\n", " ").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    global_args = dict(
        ln.split(None, 1)[1].split("=", 1)
        for ln in lines[: next(i for i, ln in enumerate(lines) if ln.startswith("FROM "))]
        if ln.startswith("ARG ")
    )
    stages: list[tuple[str, str, list[str]]] = []
    for ln in lines:
        if ln.startswith("FROM "):
            parts = ln.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), parts[1])
            stages.append((image, parts[3] if len(parts) > 3 else "", []))
        elif stages:
            stages[-1][2].append(ln)
    return stages


# -- deploy init ---------------------------------------------------------------------------


def test_deploy_init_writes_owner_only_secrets_and_refuses_to_overwrite(tmp_path: Path) -> None:
    """Private keys and secrets 0600, directories 0700; a second run is refused and changes
    nothing; --force replaces every file."""
    target = tmp_path / "d"
    written = init(target, trust_domain="keybroker.dev")
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = path.suffix == ".key" or path.parent.name == "secrets"
        assert mode == (0o600 if secret else 0o644), (path, oct(mode))
    for directory in {p.parent for p in written} | {target}:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    before = {p: p.read_bytes() for p in written}
    with pytest.raises(FileExistsError):
        init(target, trust_domain="keybroker.dev")
    assert {p: p.read_bytes() for p in written} == before
    init(target, trust_domain="keybroker.dev", force=True)
    assert (target / "secrets/audit-hmac-key").read_bytes() != before[target / "secrets/audit-hmac-key"]


def test_deploy_init_cli_refuses_without_force(tmp_path: Path) -> None:
    """The command: exit 0 the first time, 1 with a message naming --force the second."""
    cmd = [sys.executable, "-m", "broker", "deploy", "init", "--dir", str(tmp_path / "x")]
    first = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    second = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 1
    assert "--force" in second.stderr


# -- the compose file ----------------------------------------------------------------------


def test_every_mounted_file_and_secret_is_written_by_deploy_init(
    compose: dict[str, Any], deploy_dir: Path
) -> None:
    """Each bind mount's source is a file deploy init wrote; each named volume is declared (and
    each declared one used); each secret is declared, written and owner-only."""
    declared_volumes = set(compose.get("volumes") or {})
    declared_secrets = compose.get("secrets") or {}
    used_volumes: set[str] = set()
    for name, service in compose["services"].items():
        binds, named = mounts(service)
        for target, source in binds.items():
            assert source.is_file(), f"{name}: {source} (mounted at {target}) is not written by deploy init"
            assert deploy_dir in source.parents, f"{name}: {source} is outside the deploy directory"
            assert source.name != "ca.key", f"{name}: the CA's private key is mounted"
        assert set(named.values()) <= declared_volumes, name
        used_volumes |= set(named.values())
        for secret in service.get("secrets", []):
            assert secret in declared_secrets, f"{name}: secret {secret} is not declared"
    assert used_volumes == declared_volumes
    for secret, spec in declared_secrets.items():
        path = Path(spec["file"])
        assert path.is_file(), secret
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, secret


def test_topology_is_that_of_dev_ha(compose: dict[str, Any]) -> None:
    """Three OpenBao nodes of the pinned version, one KMS stand-in, two broker replicas on their
    own published ports, every service on a shared network with the ones it calls."""
    vaults = services_of(compose, "openbao/openbao:")
    assert sorted(vaults) == ["vault-1", "vault-2", "vault-3"]
    assert {s["image"] for s in vaults.values()} == {"openbao/openbao:2.6.2"}
    assert "kms" in compose["services"]
    replicas = brokers(compose)
    assert sorted(replicas) == ["broker-1", "broker-2"]
    published = [p.split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)) == 2
    for name, service in replicas.items():
        assert "backend" in service["networks"], name
    for service in compose["services"].values():
        assert "backend" in service["networks"]
        for dep in service.get("depends_on", []):
            assert dep in compose["services"]
    assert compose["networks"]["backend"]["internal"] is True


def test_openbao_configs_join_each_other_and_unseal_through_the_kms_service(
    compose: dict[str, Any],
) -> None:
    """Each node's config names itself, retry_joins every node (by its service name) with the
    mounted CA, serves TLS with the mounted certificate, audits into a volume and seals with the
    key kms-init makes, at the KMS service's address."""
    vaults = services_of(compose, "openbao/openbao:")
    kms_port = compose["services"]["kms"]["command"][
        compose["services"]["kms"]["command"].index("--port") + 1
    ]
    init_cmd = compose["services"]["kms-init"]["command"]
    alias = init_cmd[init_cmd.index("--alias") + 1]
    for name, service in vaults.items():
        binds, named = mounts(service)
        config_path = service["command"][1].removeprefix("-config=")
        hcl = binds[config_path].read_text()
        assert f'node_id = "{name}"' in hcl
        assert f'api_addr      = "https://{name}:8200"' in hcl
        assert set(re.findall(r'leader_api_addr\s*=\s*"https://([\w-]+):8200"', hcl)) == set(vaults)
        for path in re.findall(r'(?:tls_cert_file|tls_key_file|leader_ca_cert_file)\s*=\s*"([^"]+)"', hcl):
            assert path in binds, f"{name}: {path} is not mounted"
        assert re.search(rf'kms_key_id\s*=\s*"{re.escape(alias)}"', hcl)
        assert re.search(rf'endpoint\s*=\s*"http://kms:{kms_port}"', hcl)
        audit = re.search(r'file_path\s*=\s*"([^"]+)"', hcl)
        assert audit is not None
        assert any(audit.group(1).startswith(t + "/") for t in named), f"{name}: audit log not on a volume"
        storage = re.search(r'storage "raft" \{\s*path\s*=\s*"([^"]+)"', hcl)
        assert storage is not None
        assert storage.group(1) in named, f"{name}: raft data not on a volume"


def test_commands_are_ones_the_images_run(compose: dict[str, Any]) -> None:
    """keybroker commands parse with the CLI's own parser; the KMS stand-in knows every flag it
    is given; the HSM init is `deploy hsm-token` reading the mounted PIN secrets, for the token
    label the brokers log in to."""
    parser = build_parser()
    for name, service in services_of(compose, "keybroker:").items():
        assert "entrypoint" not in service, f"{name}: the image's entrypoint is keybroker"
        parser.parse_args(service["command"])  # SystemExit(2) on anything the CLI does not take
    kms = compose["services"]["kms"]
    assert kms["build"]["target"] in {stage for _, stage, _ in dockerfile_stages()}
    helped = subprocess.run(
        [sys.executable, "-m", "broker.devstack.kms_server", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for flag in (a for a in kms["command"] if a.startswith("--")):
        assert flag in helped, flag
    hsm_init = compose["services"]["hsm-init"]
    args = parser.parse_args(hsm_init["command"])
    assert hsm_init["command"][:2] == ["deploy", "hsm-token"]
    assert args.pin_file == "/run/secrets/hsm_pin"
    assert args.so_pin_file == "/run/secrets/hsm_so_pin"
    assert {"hsm_pin", "hsm_so_pin"} <= set(hsm_init["secrets"])
    for name, service in brokers(compose).items():
        binds, _ = mounts(service)
        config = tomllib.loads(binds["/etc/keybroker/broker.toml"].read_text())
        assert config["hsm"]["token_label"] == args.label, name
        assert config["hsm"]["pin_file"] == args.pin_file, name
    # The library hsm-token defaults to is the image's (Dockerfile ENV KEYBROKER__HSM__LIBRARY).
    assert "KEYBROKER__HSM__LIBRARY=${PKCS11_LIBRARY}" in DOCKERFILE.read_text()


# Option names that take a secret's value; their *-file forms name a file instead.
SECRET_OPTION = re.compile(r"^-{1,2}[\w-]*(pin|password|passwd|token|secret|key)(=|$)", re.IGNORECASE)
SECRET_WORD = re.compile(r"pin|password|passwd|token|secret|hmac|key", re.IGNORECASE)


def _argv(service: dict[str, Any]) -> list[str]:
    """The entrypoint and command words of a service, split at blanks (a shell script's words too)."""
    words: list[str] = []
    for part in ("entrypoint", "command"):
        value = service.get(part) or []
        for item in [value] if isinstance(value, str) else value:
            words += str(item).split()
    return words


def test_no_secret_on_any_command_line(compose: dict[str, Any], deploy_dir: Path) -> None:
    """No command or entrypoint carries a secret (argv is readable by every user of the host in
    ps and /proc/*/cmdline): no secret file's content, no value given to a PIN/password/token/
    key option (only their *-file forms), no shell substitution, no ${...} that could expand to one."""
    raw = yaml.safe_load(COMPOSE.read_text())
    secret_values = {
        Path(spec["file"]).read_text().strip() for spec in (compose.get("secrets") or {}).values()
    }
    assert secret_values, "deploy init wrote no secrets to look for"
    for name, service in compose["services"].items():
        words = _argv(service)
        raw_words = _argv(raw["services"][name])
        for word in words:
            assert not any(value in word for value in secret_values), f"{name}: a secret on its argv"
            assert "$(" not in word, f"{name}: shell substitution in its argv: {word}"
            assert "`" not in word, f"{name}: shell substitution in its argv: {word}"
            option = SECRET_OPTION.match(word)
            assert option is None or "-file" in word, f"{name}: {word} takes a secret's value"
        for word in raw_words:
            for variable in re.findall(r"\$\{([^}:]*)", word):
                assert not SECRET_WORD.search(variable), f"{name}: ${{{variable}}} in its argv"
        assert words[:1] != ["sh"], f"{name}: a shell script as the command"


def test_every_path_a_command_names_is_mounted(compose: dict[str, Any]) -> None:
    """Each absolute path in a command (also as -flag=/path) lies on a bind mount (a file deploy init
    wrote), a named volume or a declared secret of that service: nothing the container lacks."""
    for name, service in compose["services"].items():
        binds, named = mounts(service)
        roots = set(binds) | set(named) | {f"/run/secrets/{s}" for s in service.get("secrets", [])}
        for word in _argv(service):
            path = word.split("=", 1)[1] if word.startswith("-") and "=" in word else word
            if not path.startswith("/"):
                continue
            assert any(path == r or path.startswith(r + "/") for r in roots), f"{name}: {path} is not mounted"
            if path in binds:
                assert binds[path].is_file(), f"{name}: {path} is not written by deploy init"


def test_vault_init_writes_where_the_brokers_read(compose: dict[str, Any]) -> None:
    """vault-init's AppRole directory is the volume every broker mounts where its config reads
    role-id and secret-id; its CA file is mounted; its trust domain is the brokers'."""
    init_service = compose["services"]["vault-init"]
    cmd = init_service["command"]
    approle_dir = cmd[cmd.index("--approle-dir") + 1]
    binds, named = mounts(init_service)
    assert cmd[cmd.index("--ca-file") + 1] in binds
    volume = named[approle_dir]
    trust_domain = cmd[cmd.index("--trust-domain") + 1] if "--trust-domain" in cmd else "keybroker.dev"
    for name, service in brokers(compose).items():
        b_binds, b_named = mounts(service)
        config = tomllib.loads(b_binds["/etc/keybroker/broker.toml"].read_text())
        for key in ("role_id_file", "secret_id_file"):
            path = Path(config["vault"][key])
            assert b_named.get(str(path.parent)) == volume, f"{name}: vault.{key}"
        assert config["server"]["trust_domain"] == trust_domain
        assert cmd[cmd.index("--address") + 1] == config["vault"]["address"]


def _host_config(
    service: dict[str, Any], compose: dict[str, Any], scratch: Path
) -> tuple[Path, dict[str, Any]]:
    """The broker config of ``service`` with every container path replaced by the file behind it."""
    binds, named = mounts(service)
    paths: dict[str, Path] = dict(binds)
    for target, volume in named.items():
        paths[target] = scratch / volume
        paths[target].mkdir(parents=True, exist_ok=True)
    for secret in service.get("secrets", []):
        paths[f"/run/secrets/{secret}"] = Path(compose["secrets"][secret]["file"])
    config_text = binds["/etc/keybroker/broker.toml"].read_text()
    raw = tomllib.loads(config_text)

    def host(match: re.Match[str]) -> str:
        value = match.group(1)
        for target in sorted(paths, key=len, reverse=True):
            if value == target or value.startswith(target + "/"):
                return f'"{paths[target]}{value[len(target) :]}"'
        return match.group(0)

    rewritten = scratch / "broker.toml"
    rewritten.write_text(re.sub(r'"(/[^"]*)"', host, config_text))
    return rewritten, raw


def _check_config(config: Path, environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **environment}
    return subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("replica", ["broker-1", "broker-2"])
def test_each_broker_config_passes_check_config(
    compose: dict[str, Any], tmp_path: Path, replica: str
) -> None:
    """`keybroker serve --check-config` accepts the mounted config with the mounted files (TLS
    pair and client CA, HMAC key, PIN, Vault CA; the image's PKCS#11 library), every path it
    names is mounted, its port is the one published, and it fails once a file is missing."""
    service = compose["services"][replica]
    config, raw = _host_config(service, compose, tmp_path)
    binds, named = mounts(service)
    mounted = set(binds) | set(named) | {f"/run/secrets/{s}" for s in service["secrets"]}
    library = next(ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ARG PKCS11_LIBRARY="))
    image_library = library.split("=", 1)[1]
    for section, key in [
        ("server", "cert_file"),
        ("server", "key_file"),
        ("server", "client_ca_file"),
        ("vault", "role_id_file"),
        ("vault", "secret_id_file"),
        ("vault", "ca_file"),
        ("hsm", "pin_file"),
        ("audit", "directory"),
        ("audit", "hmac_key_file"),
    ]:
        value = raw[section][key]
        assert any(value == m or value.startswith(m + "/") for m in mounted), f"{section}.{key}={value}"
    assert raw["hsm"]["library"] == image_library
    assert [p.split(":")[1] for p in service["ports"]] == [str(raw["server"]["port"])]
    assert raw["vault"]["address"].split("//")[1].split(":")[0] in compose["services"]
    assert raw["kms"]["endpoint"].split("//")[1].split(":")[0] in compose["services"]
    # What vault-init writes into the approle volume at run time: stand-ins here.
    approle = tmp_path / "approle"
    (approle / "role-id").write_text("stand-in-role-id\n")
    (approle / "secret-id").write_text("stand-in-secret-id\n")
    environment = {**dict(service.get("environment") or {}), "KEYBROKER__HSM__LIBRARY": image_library}

    passed = _check_config(config, environment)
    (approle / "secret-id").unlink()
    failed = _check_config(config, environment)

    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "configuration valid" in passed.stdout
    assert failed.returncode == 1
    assert "FAIL Vault AppRole secret-id" in failed.stdout


# -- the Dockerfile ------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_pinned_and_non_root() -> None:
    """Every FROM is an exact version (or an earlier stage), the runtime stages end as a non-root
    user, the PKCS#11 path is a build ARG feeding the broker's config, every COPY source exists
    (and is let through .dockerignore); the lock files are checked in test_deploy_locks.py."""
    stages = dockerfile_stages()
    names = {stage for _, stage, _ in stages}
    assert len(stages) >= 2
    for image, _, _ in stages:
        if image in names:
            continue
        assert re.fullmatch(r"[\w./-]+:\d+(\.\d+)+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image
        assert ":latest" not in image
    for image, stage, body in stages:
        if stage == "build":
            continue
        users = [ln.split()[1] for ln in body if ln.startswith("USER ")]
        if image in names and not users:
            continue
        assert users, f"stage {stage} sets no USER"
        assert users[-1].split(":")[0] not in ("0", "root"), f"stage {stage} runs as root"
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PKCS11_LIBRARY=/\S+$", text, re.MULTILINE)
    assert "KEYBROKER__HSM__LIBRARY=${PKCS11_LIBRARY}" in text
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for _, _, body in stages:
        for ln in body:
            if not ln.startswith("COPY ") or "--from=" in ln:
                continue
            for source in ln.split()[1:-1]:
                assert (REPO / source).exists(), source
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
    apt = re.findall(r"apt-get install[^&]*", text.replace("\\\n", " "))
    for package in (p for chunk in apt for p in chunk.split()[2:] if not p.startswith("-")):
        assert "=" in package, f"apt package {package} is not pinned"


@pytest.mark.parametrize("domain", ['a"b', "x/y", "Bank.example", "", "a..b", "-a.b", "a" * 64])
def test_deploy_init_refuses_a_trust_domain_that_would_break_its_files(domain: str, tmp_path: Path) -> None:
    """The trust domain is written into TOML strings, SPIFFE URIs and certificates: anything but
    lower-case DNS labels is a usage error (exit 2) and nothing is written."""
    from broker.cli import main

    target = tmp_path / "deploy"
    with pytest.raises(SystemExit) as stopped:
        main(["deploy", "init", "--dir", str(target), "--trust-domain", domain])
    assert stopped.value.code == 2
    assert not target.exists()
