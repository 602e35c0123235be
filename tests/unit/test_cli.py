"""The command line: readable errors with exit 2 for bad configuration, help that teaches."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.cli import main


def test_serve_with_invalid_config_exits_2_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No traceback: one line with the file, the key and the expectation."""
    config = tmp_path / "broker.toml"
    config.write_text('[server]\nport = "x"\n')

    code = main(["serve", "--config", str(config)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("keybroker: error: ")
    assert str(config) in err
    assert "server." in err
    assert "Traceback" not in err


def test_health_without_connection_settings_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Missing address and certificates are listed, with where to find them."""
    for name in ("KEYBROKER_ADDR", "KEYBROKER_CACERT", "KEYBROKER_CLIENT_CERT", "KEYBROKER_CLIENT_KEY"):
        monkeypatch.delenv(name, raising=False)

    code = main(["health"])

    err = capsys.readouterr().err
    assert code == 2
    assert "--addr/KEYBROKER_ADDR" in err
    assert "source its env file" in err


def test_help_lists_the_common_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    """`keybroker --help` teaches what to run first."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])

    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "keybroker dev" in out
    assert "keybroker vault bootstrap" in out
