"""One timeline from the broker's audit log and Vault's file audit log, joined on request id.

Each broker record keeps its backend evidence nested: the Vault audit entries made
for it, and the KMS request ids and HSM operations the broker noted while serving
it. A Vault entry joins a record only when it was made under the broker's own Vault
identity (a token from its AppRole login, with the broker policy and an identity
entity; a root or hand-made token never qualifies) and either carries the record's
broker-generated request id (``X-Request-Id``; no caller can choose it) or is a
Vault request id the record noted. Every other Vault entry is its own row:

* ``bypass`` (flagged): made under any other identity — someone using Vault
  directly, say with a root token, even when reusing a broker request id;
* ``unexplained`` (flagged): made under the broker's identity but explained by no
  broker record and not one of the broker's own background calls — a stolen
  AppRole credential used directly looks like this;
* ``broker-background``: the broker's own upkeep (policy refresh, token renewal,
  the key scheduler, audit anchors), which carries a ``kb-bg-`` request id.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

BROKER_VAULT_POLICY = "keybroker-broker"
BACKGROUND_PREFIX = "kb-bg-"  # broker.context.BACKGROUND_PREFIX (kept import-free for offline use)
CSV_COLUMNS = (
    "time",
    "source",
    "kind",
    "request_id",
    "principal",
    "operation",
    "key",
    "version",
    "backend",
    "outcome",
    "status",
    "reason",
    "client_request_id",
    "vault_request_ids",
    "backend_call_ids",
    # Last, so readers that go by position keep working: the Vault path of a Vault row.
    "vault_path",
)


def parse_time(value: str) -> datetime:
    """ISO 8601 with any number of fractional digits (Vault writes nanoseconds) to an aware datetime."""
    text = value.strip().replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_of(row: Mapping[str, Any]) -> datetime:
    """A row's time for sorting and filtering; an unreadable time sorts first rather than failing."""
    try:
        return parse_time(str(row.get("time") or ""))
    except ValueError:
        return EPOCH


def broker_records(files: Iterable[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """The broker's request records (not its start, resume or checkpoint records)."""
    out = []
    for _, content in sorted(files):
        for line in content.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # verify reports damage; the timeline shows what can be read
            if isinstance(record, dict) and record.get("type") == "event":
                out.append({**record, "source": "broker", "kind": "request"})
    return out


_KEYED_MOUNTS = ("encrypt", "decrypt", "rewrap", "datakey", "sign", "verify", "hmac", "keys")


def _key_of(path: str) -> str | None:
    """kb-transit/encrypt/payments → payments; kb-kv/data/keys/payments → payments."""
    parts = path.split("/")
    if len(parts) >= 3 and parts[1] in _KEYED_MOUNTS:
        return parts[2].split("/")[0] or None
    if len(parts) >= 4 and parts[1] == "data" and parts[2] in ("keys", "grants"):
        return parts[3] or None
    return None


def is_broker_identity(auth: Mapping[str, Any], broker_policy: str = BROKER_VAULT_POLICY) -> bool:
    """Whether a Vault audit entry's ``auth`` is a token the broker's AppRole login made.

    The policy alone is not enough (root can mint a token with any policy): the token must
    also come from the AppRole method (a token made with ``token create`` is named
    ``token-...``, whatever display name was asked for) and belong to an identity entity,
    which tokens minted by root do not.
    """
    policies = set(auth.get("token_policies") or auth.get("policies") or [])
    return (
        broker_policy in policies
        and "root" not in policies
        and auth.get("display_name") == "approle"
        and bool(auth.get("entity_id"))
    )


def vault_entries(
    lines: Iterable[bytes | str], broker_policy: str = BROKER_VAULT_POLICY
) -> list[dict[str, Any]]:
    """Vault's request/response pairs as one entry each (the response's view when there is one)."""
    by_id: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for raw in lines:
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("type") not in ("request", "response"):
            continue
        request = entry.get("request") or {}
        vid = str(request.get("id", ""))
        if not vid:
            continue
        auth = entry.get("auth") or {}
        header = (request.get("headers") or {}).get("x-request-id") or []
        path = str(request.get("path", ""))
        row = by_id.get(vid)
        if row is None:
            row = {
                "source": "vault",
                "time": str(entry.get("time", "")),
                "vault_request_id": vid,
                "request_id": str(header[0]) if header else None,
                "operation": f"vault.{request.get('operation', '?')}",
                "path": path,
                "key": _key_of(path),
                "remote_address": request.get("remote_address"),
                "outcome": "success",
            }
            by_id[vid] = row
            order.append(vid)
        if auth or "principal" not in row:
            # The response's view wins: a login's request carries no token, its response the new one.
            row["principal"] = f"vault:{auth.get('display_name') or 'unauthenticated'}"
            row["policies"] = list(auth.get("policies") or [])
            row["broker_identity"] = is_broker_identity(auth, broker_policy)
        if entry.get("type") == "response" and entry.get("error"):
            row["outcome"] = "error"
            row["error"] = str(entry["error"])
    return [by_id[v] for v in order]


def merge(broker: Sequence[Mapping[str, Any]], vault: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Broker records with their Vault evidence nested, plus unexplained Vault rows, in time order.

    A Vault entry belongs to a broker record only when the broker's own identity made it
    and it carries the record's request id, or the record noted its Vault request id among
    its backend calls (a micro-batch serving several requests belongs to each of them).
    """
    by_request: dict[str, list[Mapping[str, Any]]] = {}
    by_vault_id: dict[str, Mapping[str, Any]] = {}
    for row in vault:
        if not row.get("broker_identity"):
            continue  # never joined, whatever request id it carries
        by_vault_id[str(row["vault_request_id"])] = row
        if row.get("request_id"):
            by_request.setdefault(str(row["request_id"]), []).append(row)
    timeline: list[dict[str, Any]] = []
    claimed: set[str] = set()
    for record in broker:
        evidence = {
            str(v["vault_request_id"]): v for v in by_request.get(str(record.get("request_id", "")), [])
        }
        for call in record.get("backend_calls") or []:
            found = by_vault_id.get(str(call.get("id"))) if call.get("backend") == "vault" else None
            if found is not None:
                evidence[str(found["vault_request_id"])] = found
        claimed.update(evidence)
        timeline.append({**record, "vault": [_evidence(v) for v in evidence.values()]})
    for row in vault:
        if str(row["vault_request_id"]) in claimed:
            continue
        kind = _unclaimed_kind(row)
        flags = {"bypass": kind == "bypass", "unexplained": kind == "unexplained"}
        timeline.append({**row, "kind": kind, **flags})
    timeline.sort(key=time_of)
    return timeline


def _unclaimed_kind(row: Mapping[str, Any]) -> str:
    if not row.get("broker_identity"):
        return "bypass"
    if str(row.get("request_id") or "").startswith(BACKGROUND_PREFIX):
        return "broker-background"
    return "unexplained"


def _evidence(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: row.get(k)
        for k in ("vault_request_id", "time", "operation", "path", "outcome", "error")
        if k in row
    }


def trail_start(timeline: Iterable[Mapping[str, Any]]) -> datetime | None:
    """When the broker's audit trail begins: the time of its first request record, if any."""
    times = [time_of(row) for row in timeline if row.get("source") == "broker"]
    return min(times) if times else None


def is_setup(row: Mapping[str, Any], trail_start: datetime | None) -> bool:
    """A bypass row from before the broker's audit trail began: the stack's own setup.

    Bootstrap (init, mounts, PKI, policies), the first certificates and the first policy
    document are written with the root token before any broker runs; with no broker to go
    around, they are not a bypass of it. The boundary is Vault's own time of the broker's
    first record, so root use at any later moment stays a bypass whatever it claims to be.
    """
    return bool(row.get("bypass")) and trail_start is not None and time_of(row) < trail_start


@dataclass(frozen=True)
class Filters:
    since: datetime | None = None
    until: datetime | None = None
    principal: str | None = None
    key: str | None = None
    operation: str | None = None
    outcome: str | None = None
    # broker | vault (every Vault row, the broker's own upkeep too) | bypass; None: all but that upkeep
    source: str | None = None
    # Hide bypass rows from before this moment (the broker's trail start): see :func:`is_setup`.
    hide_setup_before: datetime | None = None

    def match(self, row: Mapping[str, Any]) -> bool:
        moment = time_of(row)
        if is_setup(row, self.hide_setup_before):
            return False
        if self.since and moment < self.since:
            return False
        if self.until and moment > self.until:
            return False
        if self.source == "bypass":
            if not (row.get("bypass") or row.get("unexplained")):
                return False
        elif self.source and row.get("source") != self.source:
            return False
        elif self.source is None and row.get("kind") == "broker-background":
            return False  # the broker's own upkeep (policy refresh, renewals): shown with source=vault
        for name, pattern in (("principal", self.principal), ("operation", self.operation)):
            if pattern and not fnmatchcase(str(row.get(name) or ""), pattern):
                return False
        if self.key and row.get("key") != self.key:
            return False
        return not (self.outcome and row.get("outcome") != self.outcome)


def query(
    timeline: Iterable[Mapping[str, Any]], filters: Filters, limit: int | None = None
) -> list[dict[str, Any]]:
    rows = [dict(r) for r in timeline if filters.match(r)]
    return rows[-limit:] if limit else rows


def flat(row: Mapping[str, Any]) -> dict[str, str]:
    """One CSV row: nested evidence becomes ';'-joined ids."""
    reason = full_reason(row)
    vault_ids = [str(v.get("vault_request_id")) for v in row.get("vault") or []]
    if row.get("source") == "vault":
        vault_ids = [str(row.get("vault_request_id"))]
    calls = [f"{c.get('backend')}:{c.get('id')}" for c in row.get("backend_calls") or []]
    values = {
        "time": row.get("time"),
        "source": row.get("source"),
        "kind": row.get("kind"),
        "request_id": row.get("request_id"),
        "principal": row.get("principal"),
        "operation": row.get("operation"),
        "key": row.get("key"),
        "version": row.get("version"),
        "backend": row.get("backend"),
        "outcome": row.get("outcome"),
        "status": row.get("status"),
        "reason": reason,
        "client_request_id": row.get("client_request_id"),
        "vault_request_ids": ";".join(vault_ids),
        "backend_call_ids": ";".join(calls),
        "vault_path": row.get("path") if row.get("source") == "vault" else None,
    }
    return {k: "" if v is None else str(v) for k, v in values.items()}


def full_reason(row: Mapping[str, Any]) -> str:
    """Why a row ended as it did: the whole decision reason, and the error the caller got.

    The error's detail is what the caller was told, which for a denial is deliberately
    short; the decision's reason is what the policy engine actually found.
    """
    decision = row.get("decision")
    why = str(decision.get("reason") or "") if isinstance(decision, dict) else ""
    error = row.get("error")
    if not error:
        return why
    if not isinstance(error, dict):
        return f"{why}; {error}" if why else str(error)
    code, detail = str(error.get("code") or "error"), str(error.get("detail") or "")
    if why and (not detail or why.startswith(detail)):
        return f"{code}: {why}"
    return f"{code}: {detail}; decision: {why}" if why else f"{code}: {detail}"


def to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(flat(row))
    return buffer.getvalue()


def to_jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def to_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A fixed-width table; a Vault row ends with its path (in full: it says what was touched)."""
    lines = [
        f"{'TIME':<27} {'SOURCE':<17} {'PRINCIPAL':<38} {'OPERATION':<24} {'KEY':<24} OUTCOME / VAULT PATH"
    ]
    for row in rows:
        source = str(row.get("kind") if row.get("source") == "vault" else "broker")
        if row.get("bypass"):
            source = "VAULT BYPASS"
        elif row.get("unexplained"):
            source = "UNEXPLAINED"
        principal = str(row.get("principal") or "-")[-38:]
        outcome = str(row.get("outcome") or "")
        if row.get("source") == "broker" and row.get("vault"):
            outcome += f" (+{len(row['vault'])} vault)"
        if row.get("source") == "vault" and row.get("path"):
            outcome += f"  {row['path']}"
        lines.append(
            f"{str(row.get('time', ''))[:26]:<27} {source:<17} {principal:<38} "
            f"{str(row.get('operation') or '-')[:24]:<24} {str(row.get('key') or '-')[:24]:<24} {outcome}"
        )
    return "\n".join(lines)
