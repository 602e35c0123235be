"""The policy document: YAML for people, JSON over the API, one validated shape.

A document has ``roles`` (name → description and rules), ``bindings`` (principal id
or glob → role names) and ``settings``. ``parse_document`` checks all of it and
collects every problem before failing, so one ``keybroker policy apply`` run shows
them all; each problem names the path (``roles.developer.rules[1].keys.environment``),
the line when the document came from YAML, and what was expected. Unknown fields
are errors: a misspelt ``enviroment`` must not silently widen a rule.

Example (one rule)::

    roles:
      tenant-app:
        description: an application that may touch only its own tenant's data
        rules:
          - operations: [crypto.encrypt, crypto.decrypt]
            keys: {environment: [prod], tags: {app: "{principal.name}"}}
            context: {equals: {tenant: "{principal.name}"}}
    bindings:
      "spiffe://bank.example/app/*": [tenant-app]
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import yaml

from broker.policy.model import (
    OPERATIONS,
    ContextCondition,
    KeySelector,
    PolicySet,
    PolicySettings,
    Role,
    Rule,
)
from broker.timeutil import parse_duration
from broker.vocab import ENVIRONMENTS, Backend

Path = tuple[str | int, ...]
# Role names and rule names follow one rule.
ROLE_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
NAME_RULE = "1-63 characters of a-z, 0-9 and '-', starting with a letter"
RULE_FIELDS = ("name", "id", "description", "effect", "operations", "keys", "context")
_BRACES = re.compile(r"\{[^}]*\}")
_TEMPLATES = {"{principal.name}", "{principal.kind}", "{principal.id}"}
_BACKENDS = tuple(str(b) for b in Backend)
# Builds plain values (str, int, bool, None) from scalar nodes, with YAML's safe types only.
_SCALARS = yaml.constructor.SafeConstructor()


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.path or '(document)'}: {self.message}"


class PolicyInvalid(Exception):
    """The document has problems; nothing was applied."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(p) for p in problems))


def show_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Checker:
    def __init__(self, lines: Mapping[Path, int] | None) -> None:
        self.lines = lines or {}
        self.problems: list[Problem] = []

    def fail(self, path: Path, message: str) -> None:
        line = None
        for n in range(len(path), -1, -1):  # the nearest enclosing node that has a line
            line = self.lines.get(path[:n])
            if line is not None:
                break
        self.problems.append(Problem(show_path(path), message, line))

    def mapping(self, value: Any, path: Path, allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, "expected a mapping")
            return {}
        if allowed is not None:
            for name in value:
                if name not in allowed:
                    self.fail((*path, str(name)), f"unknown field (expected one of: {', '.join(allowed)})")
        return value

    def strings(self, value: Any, path: Path, *, one_ok: bool = False) -> tuple[str, ...]:
        if one_ok and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(path, "expected a list of non-empty strings")
            return ()
        return tuple(value)

    def string_map(self, value: Any, path: Path) -> tuple[tuple[str, str], ...]:
        data = self.mapping(value, path)
        out = []
        for k, v in data.items():
            if not isinstance(v, str):
                self.fail((*path, str(k)), "expected a string value")
                continue
            out.append((str(k), v))
        return tuple(sorted(out))

    def templates(self, value: str, path: Path) -> None:
        for found in _BRACES.findall(value):
            if found not in _TEMPLATES:
                self.fail(path, f"unknown template {found} (use {', '.join(sorted(_TEMPLATES))})")

    def choices(self, values: tuple[str, ...], options: tuple[str, ...], path: Path) -> None:
        for v in values:
            if v not in options:
                self.fail(path, f"{v!r} is not one of {', '.join(options)}")


def parse_document(data: Any, *, lines: Mapping[Path, int] | None = None, source: str = "") -> PolicySet:
    """Validate a whole document; raise :class:`PolicyInvalid` listing every problem."""
    c = _Checker(lines)
    doc = c.mapping(data, (), ("version", "roles", "bindings", "settings"))
    if isinstance(data, dict) and "version" in doc and doc["version"] != 1:
        c.fail(("version",), "only format version 1 exists")
    roles = {}
    role_map = c.mapping(doc.get("roles"), ("roles",))
    if isinstance(data, dict) and not role_map:
        c.fail(("roles",), "at least one role is required")
    for name, body in role_map.items():
        role = parse_role(str(name), body, c, ("roles", str(name)))
        if role is not None:
            roles[role.name] = role
    bindings = _bindings(doc.get("bindings"), c, set(role_map))
    settings = _settings(doc.get("settings"), c)
    if c.problems:
        raise PolicyInvalid(c.problems, source)
    return PolicySet(roles=roles, bindings=bindings, settings=settings)


def parse_role_json(name: str, body: Any) -> Role:
    c = _Checker(None)
    role = parse_role(name, body, c, ("roles", name))
    if c.problems or role is None:
        raise PolicyInvalid(c.problems)
    return role


def parse_bindings_json(body: Any, roles: Mapping[str, Role]) -> dict[str, tuple[str, ...]]:
    c = _Checker(None)
    bindings = _bindings(body, c, set(roles))
    if c.problems:
        raise PolicyInvalid(c.problems)
    return bindings


def parse_role(name: str, body: Any, c: _Checker, path: Path) -> Role | None:
    if not ROLE_NAME_RE.fullmatch(name):
        c.fail(path, f"a role name is {NAME_RULE}")
    data = c.mapping(body, path, ("description", "rules"))
    description = data.get("description", "")
    if not isinstance(description, str):
        c.fail((*path, "description"), "expected a string")
        description = ""
    rules_raw = data.get("rules")
    if not isinstance(rules_raw, list) or not rules_raw:
        c.fail((*path, "rules"), "expected a non-empty list of rules")
        return None
    rules = []
    ids: set[str] = set()
    for i, raw in enumerate(rules_raw):
        rule = _rule(raw, c, (*path, "rules", i), role=name, index=i)
        if rule.id in ids:
            field_ = "name" if rule.name else "id"
            c.fail((*path, "rules", i, field_), f"rule {field_} {rule.id!r} is used twice in this role")
        ids.add(rule.id)
        rules.append(rule)
    return Role(name=name, rules=tuple(rules), description=description)


def rule_label(role: str, name: str, index: int) -> str:
    """How a rule is called in decisions, explanations and diffs: ``role/name``, or ``role[index]``."""
    return f"{role}/{name}" if name else f"{role}[{index}]"


def _rule(raw: Any, c: _Checker, path: Path, *, role: str, index: int) -> Rule:
    data = c.mapping(raw, path, RULE_FIELDS)
    name = data.get("name", "")
    if "name" in data and (not isinstance(name, str) or not ROLE_NAME_RE.fullmatch(name)):
        c.fail((*path, "name"), f"a rule name is {NAME_RULE}")
        name = ""
    default_id = rule_label(role, name, index)
    # ``id`` predates ``name`` (a free label kept so stored documents stay valid); one or the other.
    rule_id = data.get("id", default_id)
    if "id" in data and "name" in data:
        c.fail((*path, "id"), "give the rule a name or an id, not both (name is preferred)")
    elif not isinstance(rule_id, str) or not rule_id:
        c.fail((*path, "id"), "expected a non-empty string")
        rule_id = default_id
    effect = data.get("effect", "allow")
    if effect not in ("allow", "deny"):
        c.fail((*path, "effect"), "expected allow or deny")
    ops: tuple[str, ...] = ()
    if "operations" not in data:
        c.fail((*path, "operations"), "required: the operations this rule allows or denies")
    else:
        ops = c.strings(data["operations"], (*path, "operations"))
    for i, op in enumerate(ops):
        if not any(fnmatchcase(known, op) for known in OPERATIONS):
            c.fail(
                (*path, "operations", i),
                f"{op!r} names no operation (known: {', '.join(sorted(OPERATIONS))}; globs like crypto.*)",
            )
    description = data.get("description", "")
    if not isinstance(description, str):
        c.fail((*path, "description"), "expected a string")
        description = ""
    return Rule(
        id=rule_id,
        operations=ops,
        effect=str(effect),
        keys=_keys(data.get("keys"), c, (*path, "keys")),
        context=_context(data.get("context"), c, (*path, "context")),
        description=description,
        name=name if isinstance(name, str) else "",
    )


def _keys(raw: Any, c: _Checker, path: Path) -> KeySelector:
    data = c.mapping(raw, path, ("name", "backend", "environment", "tags"))
    names = c.strings(data["name"], (*path, "name"), one_ok=True) if "name" in data else ()
    backends = c.strings(data["backend"], (*path, "backend"), one_ok=True) if "backend" in data else ()
    envs = (
        c.strings(data["environment"], (*path, "environment"), one_ok=True) if "environment" in data else ()
    )
    c.choices(backends, _BACKENDS, (*path, "backend"))
    c.choices(envs, ENVIRONMENTS, (*path, "environment"))
    tags = c.string_map(data.get("tags"), (*path, "tags"))
    for n in names:
        c.templates(n, (*path, "name"))
    for k, v in tags:
        c.templates(v, (*path, "tags", k))
    return KeySelector(names=names, backends=backends, environments=envs, tags=tags)


def _context(raw: Any, c: _Checker, path: Path) -> ContextCondition:
    data = c.mapping(raw, path, ("required", "equals", "allowed"))
    required = c.strings(data["required"], (*path, "required")) if "required" in data else ()
    equals = c.string_map(data.get("equals"), (*path, "equals"))
    for k, v in equals:
        c.templates(v, (*path, "equals", k))
    allowed = []
    for k, v in c.mapping(data.get("allowed"), (*path, "allowed")).items():
        options = c.strings(v, (*path, "allowed", str(k)))
        if not options and isinstance(v, list):
            c.fail((*path, "allowed", str(k)), "an empty list would match nothing; remove the rule instead")
        for o in options:
            c.templates(o, (*path, "allowed", str(k)))
        allowed.append((str(k), options))
    return ContextCondition(required=required, equals=equals, allowed=tuple(sorted(allowed)))


def _bindings(raw: Any, c: _Checker, role_names: set[str]) -> dict[str, tuple[str, ...]]:
    out = {}
    for principal, roles in c.mapping(raw, ("bindings",)).items():
        path: Path = ("bindings", str(principal))
        if not isinstance(principal, str) or not principal or principal.strip() != principal:
            c.fail(path, "a principal is a SPIFFE ID, cn:<name>, or a glob of either")
            continue
        if principal in ("*", "**"):
            c.fail(path, "binding every principal to a role is refused; name a trust domain or kind")
        names = c.strings(roles, path)
        for i, name in enumerate(names):
            if name not in role_names:
                c.fail((*path, i), f"role {name!r} is not defined")
        out[principal] = tuple(sorted(set(names)))
    return out


def _settings(raw: Any, c: _Checker) -> PolicySettings:
    data = c.mapping(raw, ("settings",), ("grant_max_expires_in",))
    if "grant_max_expires_in" not in data:
        return PolicySettings()
    seconds = parse_duration(data["grant_max_expires_in"])
    if seconds is None or seconds < 1:
        c.fail(("settings", "grant_max_expires_in"), "expected a duration like 3600, 90m, 24h or 7d")
        return PolicySettings()
    return PolicySettings(grant_max_seconds=seconds)


# -- back to a document ---------------------------------------------------------------


def role_to_json(role: Role) -> dict[str, Any]:
    rules = []
    for i, rule in enumerate(role.rules):
        out: dict[str, Any] = {}
        if rule.name:
            out["name"] = rule.name
        elif rule.id != rule_label(role.name, "", i):
            out["id"] = rule.id
        if rule.description:
            out["description"] = rule.description
        if rule.effect != "allow":
            out["effect"] = rule.effect
        out["operations"] = list(rule.operations)
        keys: dict[str, Any] = {}
        if rule.keys.names:
            keys["name"] = list(rule.keys.names)
        if rule.keys.backends:
            keys["backend"] = list(rule.keys.backends)
        if rule.keys.environments:
            keys["environment"] = list(rule.keys.environments)
        if rule.keys.tags:
            keys["tags"] = dict(rule.keys.tags)
        if keys:
            out["keys"] = keys
        ctx: dict[str, Any] = {}
        if rule.context.required:
            ctx["required"] = list(rule.context.required)
        if rule.context.equals:
            ctx["equals"] = dict(rule.context.equals)
        if rule.context.allowed:
            ctx["allowed"] = {k: list(v) for k, v in rule.context.allowed}
        if ctx:
            out["context"] = ctx
        rules.append(out)
    body: dict[str, Any] = {"rules": rules}
    if role.description:
        body = {"description": role.description, **body}
    return body


def to_document(policy: PolicySet) -> dict[str, Any]:
    """The canonical JSON form (what Vault stores and the API serves); parses back to ``policy``."""
    return {
        "version": 1,
        "roles": {name: role_to_json(policy.roles[name]) for name in sorted(policy.roles)},
        "bindings": {p: list(policy.bindings[p]) for p in sorted(policy.bindings)},
        "settings": {"grant_max_expires_in": policy.settings.grant_max_seconds},
    }


# -- YAML with line numbers -------------------------------------------------------------


def load_yaml(text: str, source: str) -> tuple[Any, dict[Path, int]]:
    """Parse YAML, keeping the line of every mapping entry and list item; refuse duplicate keys.

    PyYAML's ``safe_load`` keeps the last of two equal keys without a word; in a
    policy file the first one silently disappearing is a security bug.
    """
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyInvalid([Problem("", f"not valid YAML: {problem}", line)], source) from None
    lines: dict[Path, int] = {}
    problems: list[Problem] = []
    data = _convert(node, (), lines, problems) if node is not None else None
    if problems:
        raise PolicyInvalid(problems, source)
    return data, lines


def _convert(node: yaml.Node, path: Path, lines: dict[Path, int], problems: list[Problem]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(_SCALARS.construct_object(key_node, deep=True))
            if key in out:
                problems.append(
                    Problem(
                        show_path((*path, key)), "appears twice in this mapping", key_node.start_mark.line + 1
                    )
                )
                continue
            out[key] = _convert(value_node, (*path, key), lines, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), lines, problems) for i, item in enumerate(node.value)]
    return _SCALARS.construct_object(node, deep=True)


def load_file_text(text: str, source: str) -> PolicySet:
    """A policy file (YAML, or JSON, which YAML reads too) to a validated policy set."""
    data, lines = load_yaml(text, source)
    return parse_document(data, lines=lines, source=source)


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def diff_documents(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What applying ``new`` over ``old`` changes: roles, each of their rules, bindings, settings.

    Rules are matched by name (``role/name``), unnamed ones by position (``role[i]``), so a
    diff says ``+ rule billing-app/read-invoices`` and shows that rule's fields. ``old`` may
    be a stored document that does not validate: anything unreadable in it is shown as is.
    """
    lines: list[str] = []
    old_roles, new_roles = _as_map(old.get("roles")), _as_map(new.get("roles"))
    for name in sorted(set(old_roles) | set(new_roles)):
        was, now = _as_map(old_roles.get(name)), _as_map(new_roles.get(name))
        if name not in new_roles:
            lines.append(f"- role {name} (removed)")
            for label, rule in _rules_of(name, was).items():
                lines.extend(_rule_block("-", label, rule))
        elif name not in old_roles:
            rules = _rules_of(name, now)
            lines.append(f"+ role {name} (added, {len(rules)} rules)")
            if now.get("description"):
                lines.append(f"    + description: {now['description']}")
            for label, rule in rules.items():
                lines.extend(_rule_block("+", label, rule))
        elif canonical_json(was) != canonical_json(now):
            lines.append(f"~ role {name} (changed)")
            lines.extend(_role_changes(name, was, now))
    old_b, new_b = _as_map(old.get("bindings")), _as_map(new.get("bindings"))
    for principal in sorted(set(old_b) | set(new_b)):
        before, after = _names(old_b.get(principal)), _names(new_b.get(principal))
        if before != after:
            mark = "+" if not before else "-" if not after else "~"
            lines.append(f"{mark} binding {principal}: [{', '.join(before)}] -> [{', '.join(after)}]")
    old_s, new_s = _as_map(old.get("settings")), _as_map(new.get("settings"))
    for setting in sorted(set(old_s) | set(new_s)):
        if old_s.get(setting) != new_s.get(setting):
            lines.append(f"~ setting {setting}: {old_s.get(setting)} -> {new_s.get(setting)}")
    return lines


def _as_map(value: Any) -> dict[str, Any]:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _rules_of(role: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A role's rules by label (``role/name`` or ``role[i]``), in document order."""
    raw = body.get("rules")
    out: dict[str, Any] = {}
    for i, rule in enumerate(raw if isinstance(raw, list) else []):
        fields = rule if isinstance(rule, dict) else {}
        name, legacy_id = fields.get("name"), fields.get("id")
        if isinstance(name, str) and name:
            label = rule_label(role, name, i)
        elif isinstance(legacy_id, str) and legacy_id:
            label = legacy_id
        else:
            label = rule_label(role, "", i)
        while label in out:  # a stored (invalid) document may repeat a name: keep both
            label += "'"
        out[label] = rule
    return out


def _rule_yaml(rule: Any) -> list[str]:
    body = {k: v for k, v in rule.items() if k != "name"} if isinstance(rule, dict) else rule
    text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=None)
    return str(text).splitlines()


def _rule_block(mark: str, label: str, rule: Any) -> list[str]:
    return [f"    {mark} rule {label}", *(f"    {mark}     {row}" for row in _rule_yaml(rule))]


def _role_changes(name: str, was: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    import difflib

    lines: list[str] = []
    if was.get("description") != now.get("description"):
        lines.append(f"    ~ description: {was.get('description', '')!r} -> {now.get('description', '')!r}")
    before, after = _rules_of(name, was), _rules_of(name, now)
    for label, rule in after.items():
        if label not in before:
            lines.extend(_rule_block("+", label, rule))
        elif canonical_json(before[label]) != canonical_json(rule):
            lines.append(f"    ~ rule {label}")
            # The whole rule with its changed lines marked; no ---/+++/@@ headers (the label says it).
            diff = difflib.unified_diff(_rule_yaml(before[label]), _rule_yaml(rule), lineterm="", n=1000)
            rows = [row for row in diff if not row.startswith(("---", "+++", "@@"))]
            lines.extend(f"    {row[0]}     {row[1:]}" for row in rows)
    for label, rule in before.items():
        if label not in after:
            lines.extend(_rule_block("-", label, rule))
    common = [label for label in after if label in before]
    if not lines and common != [label for label in before if label in after]:
        lines.append(f"    ~ rule order: {', '.join(common)}")
    return lines
