"""``keybroker policy|bindings|grants ...``: who may do what, against a running broker over mTLS."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from broker.cli.common import Session, add_command, add_group, context_pairs, key_name_arg, quote
from broker.errors import ConfigError
from broker.policy.document import PolicyInvalid, diff_documents, load_yaml, parse_document, to_document
from broker.policy.model import GRANTABLE, OPERATIONS, parse_grant_token

POLICY_EPILOG = """\
examples:
  keybroker policy apply config/policies.yaml --dry-run   # validate, show what would change
  keybroker policy apply config/policies.yaml             # validate all, then store atomically
  keybroker policy list
  keybroker policy show developer
  keybroker policy explain --principal spiffe://keybroker.dev/user/dana \\
      --operation crypto.encrypt --key payments --context tenant=acme
"""
BINDINGS_EPILOG = """\
examples:
  keybroker bindings set spiffe://keybroker.dev/user/dana developer
  keybroker bindings set 'spiffe://keybroker.dev/app/*' application   # a glob binds many
  keybroker bindings set spiffe://keybroker.dev/user/dana               # no roles: unbind
  keybroker bindings show
"""
GRANTS_EPILOG = """\
examples:
  keybroker grants create payments --grantee spiffe://keybroker.dev/app/batch \\
      --operation crypto.decrypt --context-equals tenant=acme --expires-in 2h
  keybroker grants list payments
  keybroker grants revoke payments g-0123456789abcdef0123        # by a key custodian
  keybroker grants retire --token kbg1.payments.g-0123...        # by the grantee
"""


def _yaml(data: Any) -> str:
    # Lists of plain values on one line (operations: [crypto.encrypt, crypto.decrypt]): easy to edit.
    return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100, default_flow_style=None))


# -- policy -------------------------------------------------------------------------------


def _warn_invalid(out: dict[str, Any]) -> None:
    """Say loudly that the stored document is not in force (reads carry ``invalid`` then)."""
    if not out.get("invalid"):
        return
    print(
        f"keybroker: WARNING: the stored policy document (version {out.get('version')}) is INVALID; "
        "no binding is in force and every application is refused (503 policy_invalid) until a valid "
        "one is stored (`keybroker policy apply FILE`, as a break-glass administrator):",
        file=sys.stderr,
    )
    for problem in out.get("problems", []):
        print(f"  stored {problem}", file=sys.stderr)


def _as_stored(document: Any) -> dict[str, Any]:
    """A stored document (possibly invalid, as stored) in the shape the diff reads; nothing dropped."""
    doc = document if isinstance(document, dict) else {}

    def names(value: Any) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else [str(value)]

    roles = doc.get("roles")
    bindings = doc.get("bindings")
    settings = doc.get("settings")
    return {
        "roles": dict(roles) if isinstance(roles, dict) else {},
        "bindings": {str(p): names(r) for p, r in bindings.items()} if isinstance(bindings, dict) else {},
        "settings": dict(settings) if isinstance(settings, dict) else {},
    }


def _dropped_bindings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for principal, roles in old["bindings"].items():
        gone = sorted(set(roles) - set(new["bindings"].get(principal, [])))
        if gone:
            out.append(f"{principal} loses {', '.join(gone)}")
    return out


def cmd_policy_apply(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    path = Path(args.file)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        data, lines = load_yaml(text, str(path))
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping with roles (and optional bindings, settings)")
        # What Vault holds now (the broker reads it fresh), valid or not: the diff and the
        # bindings kept are relative to that, never to what a replica happens to enforce.
        current = client.call("GET", "/v1/policies")
        _warn_invalid(current)
        raw_bindings = current["document"].get("bindings") if isinstance(current["document"], dict) else None
        if "bindings" not in data and raw_bindings is not None and not isinstance(raw_bindings, dict):
            print(
                f"keybroker: the stored document's bindings cannot be read, so {path} (which has no "
                "bindings section) cannot keep them; nothing was applied. Add a `bindings:` section "
                "with every binding you want (see `keybroker policy show`) and apply again.",
                file=sys.stderr,
            )
            return 2
        stored = _as_stored(current["document"])
        merged = dict(data)
        if "bindings" not in merged:  # the file does not speak of bindings: keep the stored ones
            merged["bindings"] = raw_bindings or {}
        new = to_document(parse_document(merged, lines=lines, source=str(path)))
    except PolicyInvalid as exc:
        print(f"keybroker: {path} is invalid; nothing was applied:", file=sys.stderr)
        for problem in exc.problems:
            if problem.path.startswith("bindings") and "bindings" not in data:
                print(
                    f"  stored {problem.path}: {problem.message} (the file has no bindings section, so "
                    "the stored bindings are kept and must fit its roles: keep the role, change the "
                    "binding first, or put the bindings you want in the file)",
                    file=sys.stderr,
                )
            else:
                print(f"  {path}:{problem}", file=sys.stderr)
        return 2
    changes = diff_documents(stored, new)
    dropped = _dropped_bindings(stored, new)
    if args.json and args.dry_run:
        print(json.dumps({"version": current["version"], "changes": changes, "drops_bindings": dropped}))
        return 0
    if not args.json:
        print("\n".join(changes) if changes else "no changes")
        if dropped:
            print(f"WARNING: this drops {len(dropped)} stored binding(s): {'; '.join(dropped)}")
    if args.dry_run or (not changes and not current.get("invalid")):
        if args.dry_run and not args.json:
            print(f"(dry run: the stored document stays at version {current['version']})")
        return 0
    document = dict(new)
    if "bindings" not in data:
        del document["bindings"]  # the broker keeps the stored ones; no binding.write needed
    out = client.call("PUT", "/v1/policies", {"document": document, "version": current["version"]})
    print(json.dumps(out) if args.json else f"applied: the policy document is now version {out['version']}")
    return 0


def cmd_policy_show(args: argparse.Namespace, session: Session) -> int:
    """The stored document as a policy file: what ``policy apply`` takes back after an edit."""
    client = session.client()
    if args.role:
        out = client.call("GET", f"/v1/policies/{quote(args.role)}")
    else:
        out = client.call("GET", "/v1/policies")
    _warn_invalid(out)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if args.role:
        role = {k: v for k, v in out.items() if k not in ("name", "invalid", "problems")}
        print(f"# role {args.role} as stored in Vault. To change it, edit the whole document")
        print("# (`keybroker policy show > policy.yaml`) and `keybroker policy apply policy.yaml`.")
        print(_yaml(role).rstrip())
        return 0
    # Comments only above the document, so the output is itself a valid policy file.
    print(f"# keybroker policy document, version {out['version']} as stored in Vault (KV policy/document).")
    print("# Edit, then: keybroker policy apply FILE --dry-run   (the changes), and without --dry-run.")
    if out.get("invalid"):
        print("# INVALID as stored: fix the problems printed on stderr before applying.")
    print(_yaml(out["document"]).rstrip())
    return 0


def cmd_policy_list(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    out = client.call("GET", "/v1/policies")
    _warn_invalid(out)
    if args.json:
        print(json.dumps(out))
        return 0
    doc = _as_stored(out["document"])
    bound: dict[str, int] = {}
    for roles in doc["bindings"].values():
        for role in roles:
            bound[role] = bound.get(role, 0) + 1
    print(f"{'ROLE':<22} {'RULES':>5} {'BOUND':>5}  DESCRIPTION")
    for name, role in doc["roles"].items():
        body = role if isinstance(role, dict) else {}
        rules = body.get("rules")
        description = " ".join(str(body.get("description", "")).split())
        if len(description) > 70:
            description = description[:67] + "..."
        count = len(rules) if isinstance(rules, list) else 0
        print(f"{name:<22} {count:>5} {bound.get(name, 0):>5}  {description}")
    state = "; INVALID: not in force" if out.get("invalid") else ""
    limit = doc["settings"].get("grant_max_expires_in")
    print(f"(document version {out['version']}; grants live at most {limit}s{state})")
    return 0


def cmd_policy_explain(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    body: dict[str, Any] = {"principal": args.principal, "operation": args.operation}
    if args.key:
        body["key"] = args.key
    if args.context is not None:
        body["context"] = context_pairs(args.context)
    out = client.call("POST", "/v1/policies/explain", body)
    if args.json:
        print(json.dumps(out))
    else:
        verdict = "ALLOW" if out["allowed"] else "DENY"
        if out.get("policy_invalid"):
            print("WARNING: the stored policy document is INVALID (not a binding problem)", file=sys.stderr)
        print(f"{verdict}  {out['reason']}")
        print(f"  principal  {out['principal']}")
        print(f"  roles      {', '.join(out['roles']) or '(none)'}")
        if out["rule"] or out["grant"]:
            print(f"  decided by {'rule ' + out['rule'] if out['rule'] else 'grant ' + out['grant']}")
        for miss in out["near_misses"]:
            print(f"  not matched: {miss}")
    return 0 if out["allowed"] else 1


# -- bindings -----------------------------------------------------------------------------


def cmd_bindings_show(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    out = client.call("GET", "/v1/bindings")
    _warn_invalid(out)
    if args.json:
        print(json.dumps(out))
        return 0
    width = max([len(p) for p in out["bindings"]] + [9])
    print(f"{'PRINCIPAL':<{width}}  ROLES")
    for principal, roles in out["bindings"].items():
        names = ", ".join(str(r) for r in roles) if isinstance(roles, list) else str(roles)
        print(f"{principal:<{width}}  {names}")
    state = "; INVALID: these bindings are NOT in force" if out.get("invalid") else ""
    print(f"(document version {out['version']}{state})")
    return 0


def cmd_bindings_set(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    current = client.call("GET", "/v1/bindings")
    bindings = dict(current["bindings"])
    if args.roles:
        bindings[args.principal] = sorted(set(args.roles))
    elif bindings.pop(args.principal, None) is None:
        raise ConfigError(f"{args.principal} has no binding; name roles to bind it")
    out = client.call("PUT", "/v1/bindings", {"bindings": bindings, "version": current["version"]})
    if args.json:
        print(json.dumps(out))
    else:
        roles = out["bindings"].get(args.principal, [])
        print(f"{args.principal}: {', '.join(roles) if roles else 'unbound'} (version {out['version']})")
    return 0


# -- grants -------------------------------------------------------------------------------


def _grant_row(g: dict[str, Any]) -> str:
    constraint = ""
    if g.get("context_equals") is not None:
        constraint = "context = " + ",".join(f"{k}={v}" for k, v in g["context_equals"].items())
    elif g.get("context_subset") is not None:
        constraint = "context ⊇ " + ",".join(f"{k}={v}" for k, v in g["context_subset"].items())
    return f"{g['id']}  {g['grantee']}  {','.join(g['operations'])}  until {g['expires_at']}  {constraint}"


def cmd_grants_create(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    if args.context_equals and args.context_subset:
        raise ConfigError("give --context-equals or --context-subset, not both")
    body: dict[str, Any] = {
        "grantee": args.grantee,
        "operations": args.operation,
        "expires_in": args.expires_in,
    }
    if args.context_equals:
        body["context_equals"] = context_pairs(args.context_equals, "--context-equals")
    if args.context_subset:
        body["context_subset"] = context_pairs(args.context_subset, "--context-subset")
    out = client.call("POST", f"/v1/keys/{quote(args.key)}/grants", body)
    if args.json:
        print(json.dumps(out))
    else:
        print(_grant_row(out))
        print(f"grant token (for `keybroker grants retire --token`): {out['grant_token']}")
    return 0


def cmd_grants_list(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    out = client.call("GET", f"/v1/keys/{quote(args.key)}/grants")
    if args.json:
        print(json.dumps(out))
    else:
        print("\n".join(_grant_row(g) for g in out["grants"]) or "no grants")
    return 0


def cmd_grants_revoke(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    out = client.call("DELETE", f"/v1/keys/{quote(args.key)}/grants/{quote(args.grant_id)}")
    print(json.dumps(out) if args.json else f"revoked {out['revoked']['id']}")
    return 0


def cmd_grants_retire(args: argparse.Namespace, session: Session) -> int:
    client = session.client()
    key, grant_id = args.key, args.grant_id
    if args.token:
        try:
            key, grant_id = parse_grant_token(args.token)
        except ValueError as exc:
            raise ConfigError(f"--token: {exc}") from None
    if not key or not grant_id:
        raise ConfigError("give KEY GRANT_ID, or --token")
    out = client.call("POST", f"/v1/keys/{quote(key)}/grants/{quote(grant_id)}/retire", {})
    print(json.dumps(out) if args.json else f"retired {out['retired']['id']}")
    return 0


# -- parsers ------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    policy = add_group(
        sub,
        "policy",
        "role policies: apply a file, show, list, explain a decision",
        "Role policies decide every request: deny by default; a rule names operations, keys and "
        "context conditions; an explicit deny beats every allow. The document lives in Vault; "
        "every broker replica enforces a change within seconds.",
        POLICY_EPILOG,
    )
    p = add_command(
        policy,
        "apply",
        "validate a policy file, then store it atomically (or print the diff)",
        cmd_policy_apply,
    )
    p.add_argument("file", help="YAML (or JSON) with roles, optional bindings and settings")
    p.add_argument("--dry-run", action="store_true", help="validate and print the diff; change nothing")
    p = add_command(policy, "show", "print the stored document, or one role, as YAML", cmd_policy_show)
    p.add_argument("role", nargs="?")
    add_command(policy, "list", "list roles with their rule and binding counts", cmd_policy_list)
    p = add_command(
        policy,
        "explain",
        "say what the policy decides for a principal, and which rule or grant decides",
        cmd_policy_explain,
    )
    p.add_argument("--principal", required=True, help="spiffe://<domain>/<kind>/<name> or cn:<name>")
    p.add_argument("--operation", required=True, choices=sorted(OPERATIONS), metavar="OPERATION")
    p.add_argument("--key", type=key_name_arg, help="the key, for key operations")
    p.add_argument("--context", action="append", metavar="KEY=VALUE", help="encryption context (repeatable)")

    bindings = add_group(
        sub,
        "bindings",
        "which principal holds which roles",
        "Bindings map a principal (SPIFFE ID, cn:<name>, or a glob of either) to role names.",
        BINDINGS_EPILOG,
    )
    add_command(bindings, "show", "list every binding", cmd_bindings_show)
    p = add_command(bindings, "set", "set a principal's roles (none: remove its binding)", cmd_bindings_set)
    p.add_argument("principal")
    p.add_argument("roles", nargs="*", metavar="ROLE")

    grants = add_group(
        sub,
        "grants",
        "time-limited rights for one principal on one key",
        "A grant gives one grantee some operations on one key until it expires, optionally only "
        f"for one encryption context. Grantable: {', '.join(sorted(GRANTABLE))}.",
        GRANTS_EPILOG,
    )
    p = add_command(grants, "create", "grant operations on a key to a principal", cmd_grants_create)
    p.add_argument("key", type=key_name_arg)
    p.add_argument("--grantee", required=True, help="principal id")
    p.add_argument(
        "--operation", required=True, action="append", metavar="OP", help="repeatable; e.g. crypto.decrypt"
    )
    p.add_argument("--expires-in", required=True, metavar="DURATION", help="e.g. 900, 30m, 12h")
    p.add_argument(
        "--context-equals", action="append", metavar="KEY=VALUE", help="the context must be exactly this"
    )
    p.add_argument(
        "--context-subset", action="append", metavar="KEY=VALUE", help="the context must contain these"
    )
    p = add_command(grants, "list", "list a key's unexpired grants", cmd_grants_list)
    p.add_argument("key", type=key_name_arg)
    p = add_command(grants, "revoke", "revoke a grant (key custodians)", cmd_grants_revoke)
    p.add_argument("key", type=key_name_arg)
    p.add_argument("grant_id")
    p = add_command(grants, "retire", "give back a grant you hold", cmd_grants_retire)
    p.add_argument("key", nargs="?", type=key_name_arg)
    p.add_argument("grant_id", nargs="?")
    p.add_argument("--token", help="the grant token instead of KEY GRANT_ID")
