"""Which package may import which SDK, checked on the source (ast), so the layout stays true.

The SDKs (hvac, boto3/botocore and their type stubs, python-pkcs11) may be imported only by:

- ``broker.backends``: the seam. Each backend translates its SDK's errors there and no
  SDK type crosses it, so the rest of the broker sees bytes and ``broker.errors``.
- ``broker.vaultops``: the operator's Vault bootstrap and policy commands. hvac is
  synchronous and fine for an admin command; these never run inside the serving broker.
- ``broker.devstack``: what ``keybroker dev`` and the tests start (OpenBao bootstrap with
  hvac, the auto-unseal key in the KMS stand-in with boto3). Development use only.

The ground floor (``broker.vocab``, ``broker.timeutil``, ``broker.errors``) imports no
other broker module, so everything can import it without a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import broker

SDKS = ("hvac", "boto3", "botocore", "mypy_boto3_kms", "pkcs11")
SDK_ALLOWED = ("broker.backends", "broker.vaultops", "broker.devstack")
GROUND_FLOOR = ("broker.vocab", "broker.timeutil", "broker.errors")
PACKAGE = Path(broker.__file__).parent


def modules() -> dict[str, ast.Module]:
    """Every module of the broker package by dotted name, parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imported(tree: ast.Module) -> set[str]:
    """Every absolute module name a module imports, at any depth (functions, TYPE_CHECKING blocks)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_sdks_are_imported_only_where_allowed() -> None:
    """hvac, boto3, botocore and pkcs11 appear only in backends, vaultops and devstack."""
    outside = sorted(
        (name, target)
        for name, tree in modules().items()
        if not within(name, SDK_ALLOWED)
        for target in imported(tree)
        if within(target, SDKS)
    )

    assert outside == []


def test_the_walk_sees_the_sdk_imports_it_guards() -> None:
    """The check can fail: the backends are found importing each SDK."""
    found = {
        target.split(".")[0]
        for name, tree in modules().items()
        if within(name, ("broker.backends",))
        for target in imported(tree)
    }

    assert {"botocore", "boto3", "pkcs11"} <= found
    assert "aiohttp" in found


def test_ground_floor_imports_no_broker_module() -> None:
    """vocab, timeutil and errors import nothing of the broker, so anything may import them."""
    trees = modules()
    upward = sorted(
        (name, target)
        for name in GROUND_FLOOR
        for target in imported(trees[name])
        if within(target, ("broker",))
    )

    assert upward == []
