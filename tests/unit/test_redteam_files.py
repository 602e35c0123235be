"""Red-team checks of secret-file writing: a symbolic link planted where the writer puts its
temporary file (a predictable name beside the target) is never followed."""

from __future__ import annotations

import stat
from pathlib import Path

from broker._files import write_private
from broker.cli import deploy


def test_write_private_does_not_follow_a_link_planted_at_its_temporary_name(tmp_path: Path) -> None:
    """A link at ``.<name>.tmp`` pointing at another file: that file is neither truncated nor
    given the secret, and the target ends up a regular 0600 file holding it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    target = tmp_path / "out" / "init.json"
    target.parent.mkdir()
    (target.parent / ".init.json.tmp").symlink_to(victim)

    write_private(target, "root-token-and-unseal-keys\n")

    assert victim.read_text() == "keep me\n"
    info = target.lstat()
    assert stat.S_ISREG(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert target.read_text() == "root-token-and-unseal-keys\n"


def test_deploy_init_does_not_write_a_secret_through_a_planted_link(tmp_path: Path) -> None:
    """``deploy init`` into a directory where ``secrets/.hsm-pin.tmp`` is a link to a file
    elsewhere: the HSM PIN does not land in that file, and ``secrets/hsm-pin`` is a real file."""
    outside = tmp_path / "attacker-readable"
    outside.write_text("")
    outside.chmod(0o644)
    where = tmp_path / "deploy"
    (where / "secrets").mkdir(parents=True)
    (where / "secrets" / ".hsm-pin.tmp").symlink_to(outside)

    deploy.init(where, trust_domain="bank.example")

    assert outside.read_text() == ""
    pin = where / "secrets" / "hsm-pin"
    assert stat.S_ISREG(pin.lstat().st_mode)
    assert stat.S_IMODE(pin.lstat().st_mode) == 0o600
    assert len(pin.read_text().strip()) == 32
    assert not any(p.name.endswith(".tmp") and not p.is_symlink() for p in (where / "secrets").iterdir())
