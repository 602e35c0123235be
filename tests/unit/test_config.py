"""Config loading: every error names the file, the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config.load import load_config
from broker.errors import ConfigError

VALID = """\
[server]
cert_file = "tls/server.crt"
key_file = "/abs/server.key"
client_ca_file = "tls/ca.pem"
port = 9443

[vault]
address = "https://vault.internal:8200"
role_id_file = "approle/role-id"
secret_id_file = "approle/secret-id"

[hsm]
library = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "keybroker"
pin_env = "KB_PIN"

[audit]
directory = "audit"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_valid_file_loads_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    """Relative paths resolve against the file's directory; unset keys take safe defaults."""
    config = load_config(write(tmp_path, VALID), environ={})

    assert config.server.port == 9443
    assert config.server.cert_file == tmp_path.resolve() / "tls/server.crt"
    assert config.server.key_file == Path("/abs/server.key")
    assert config.server.host == "127.0.0.1"
    assert config.kms.endpoint == ""
    assert config.source == str(tmp_path / "broker.toml")


def test_missing_key_names_file_key_and_expectation(tmp_path: Path) -> None:
    """A missing required key is reported with its dotted path and expected type."""
    path = write(tmp_path, VALID.replace('address = "https://vault.internal:8200"\n', ""))

    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})

    assert str(path) in str(info.value)
    assert "vault.address" in str(info.value)
    assert "a string" in str(info.value)


def test_wrong_type_is_refused(tmp_path: Path) -> None:
    """A string where an integer belongs is an error, not a silent conversion."""
    path = write(tmp_path, VALID.replace("port = 9443", 'port = "9443"'))

    with pytest.raises(ConfigError, match=r"server\.port: expected an integer, got '9443'"):
        load_config(path, environ={})


def test_unknown_key_is_refused_with_known_keys(tmp_path: Path) -> None:
    """A typo does not pass silently."""
    path = write(tmp_path, VALID.replace("port = 9443", "prot = 9443"))

    with pytest.raises(ConfigError, match=r"server\.prot: unknown key \(known here: .*port"):
        load_config(path, environ={})


@pytest.mark.parametrize("line", ['pin = "1234"', 'token = "s.abc"', 'secret_id = "x"'])
def test_secrets_in_the_file_are_refused(tmp_path: Path, line: str) -> None:
    """The HSM PIN and Vault credentials may never be written into the config file."""
    section = "[hsm]" if line.startswith("pin") else "[vault]"
    path = write(tmp_path, VALID.replace(section, f"{section}\n{line}"))

    with pytest.raises(ConfigError, match="secrets are not accepted in the config file"):
        load_config(path, environ={})


def test_environment_overrides_and_converts(tmp_path: Path) -> None:
    """KEYBROKER__SECTION__KEY overrides the file, converted to the field's type."""
    config = load_config(
        write(tmp_path, VALID),
        environ={
            "KEYBROKER__SERVER__PORT": "10443",
            "KEYBROKER__KMS__ENDPOINT": "http://127.0.0.1:1",
            "KEYBROKER__KMS__ALLOW_INSECURE_HTTP": "true",
        },
    )

    assert (config.server.port, config.kms.endpoint) == (10443, "http://127.0.0.1:1")
    assert config.kms.allow_insecure_http is True


def test_bad_environment_value_names_the_environment(tmp_path: Path) -> None:
    """An unparsable override says it came from the environment."""
    with pytest.raises(ConfigError, match=r"environment: server\.port: expected an integer"):
        load_config(write(tmp_path, VALID), environ={"KEYBROKER__SERVER__PORT": "many"})


def test_pin_source_must_be_exactly_one(tmp_path: Path) -> None:
    """Naming neither or both PIN sources is refused."""
    both = VALID.replace('pin_env = "KB_PIN"', 'pin_env = "KB_PIN"\npin_file = "pin"')

    with pytest.raises(ConfigError, match=r"exactly one of hsm\.pin_file or hsm\.pin_env"):
        load_config(write(tmp_path, both), environ={})


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    """Unreadable input is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[server"), environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml", environ={})


def test_vault_address_must_be_a_url(tmp_path: Path) -> None:
    """A bare host is refused with the expected form."""
    path = write(tmp_path, VALID.replace("https://vault.internal:8200", "vault.internal:8200"))

    with pytest.raises(ConfigError, match=r"vault\.address: expected an https:// URL"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (VALID.replace("https://vault.internal:8200", "http://vault.internal:8200"), "vault.address"),
        (VALID + '\n[kms]\nendpoint = "http://kms.internal"\n', "kms.endpoint"),
    ],
)
def test_plain_http_backends_are_refused_without_the_explicit_flag(
    tmp_path: Path, text: str, key: str
) -> None:
    """http:// to Vault or KMS would carry secrets in the clear: refused, naming the key and the flag."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})

    message = str(info.value)
    assert f"{key}: refusing plain http" in message
    assert f"{key.split('.')[0]}.allow_insecure_http = true" in message

    section = key.split(".")[0].upper()
    allowed = load_config(
        write(tmp_path, text), environ={f"KEYBROKER__{section}__ALLOW_INSECURE_HTTP": "true"}
    )
    assert getattr(allowed, section.lower()).allow_insecure_http is True


def test_transport_limits_have_bounded_defaults_and_are_checked(tmp_path: Path) -> None:
    """Every transport limit has a finite default, and a value that disables it is refused."""
    server = load_config(write(tmp_path, VALID), environ={}).server
    assert (server.max_connections, server.idle_timeout_seconds, server.header_timeout_seconds) == (
        1000,
        30.0,
        10.0,
    )
    assert (server.max_headers, server.max_header_bytes, server.max_request_line_bytes) == (64, 8190, 8190)
    assert (server.body_timeout_seconds, server.tls_handshake_timeout_seconds) == (30.0, 5.0)
    assert (server.max_handshakes, server.max_handshakes_per_peer) == (512, 256)

    for key, value in [
        ("MAX_CONNECTIONS", "0"),
        ("IDLE_TIMEOUT_SECONDS", "0"),
        ("MAX_HEADERS", "100000"),
        ("MAX_HANDSHAKES", "0"),
        ("MAX_HANDSHAKES_PER_PEER", "1000"),
        ("CRL_MAX_AGE_SECONDS", "30"),
    ]:
        with pytest.raises(ConfigError, match=f"server\\.{key.lower()}: expected"):
            load_config(write(tmp_path, VALID), environ={f"KEYBROKER__SERVER__{key}": value})


def test_example_config_in_the_repository_loads(tmp_path: Path) -> None:
    """config/broker.example.toml stays valid."""
    example = Path(__file__).parents[2] / "config" / "broker.example.toml"

    config = load_config(example, environ={"KB_HSM_PIN": "unused"})

    assert config.server.port == 8443
