"""One timeline from the broker's audit log and Vault's file audit log.

Each broker record keeps its backend evidence nested: the Vault audit entries made
for it, and the KMS request ids and HSM operations the broker noted while serving
it. A Vault entry joins a record only when it was made under the broker's own Vault
identity (a token from its AppRole login, with the broker policy and an identity
entity; a root or hand-made token never qualifies) and the record claims it:

* by Vault's own request id, which the broker noted from Vault's answer (the
  ``request_id`` of the response body is the ``request.id`` of the audit entry; no
  caller chooses it). The X-Request-Id header is never enough: anyone holding a
  Vault token sends whatever header they like;
* for a call Vault answered without an id (204, or an error body), the record noted
  the status, the X-Request-Id the broker sent and the path: such a note claims at
  most ONE entry with that header and path inside the record's time window (from
  the request's start, or the background record's ``since``, to its time, with
  :data:`JOIN_SLACK` either side). A caller who copies all three can at worst have
  their entry claimed in place of the broker's, which then shows unexplained.

The broker's own upkeep (policy refresh, token renewal, the key scheduler, grant
purges, audit anchors) is claimed the same way by its ``background`` records, which
list the ids of the calls it made outside any request. Every other Vault entry is
its own row:

* ``bypass`` (flagged): made under any other identity — someone using Vault
  directly, say with a root token, whatever request id it carries;
* ``unexplained`` (flagged): made under the broker's identity but claimed by no
  broker record — a stolen AppRole credential used directly looks like this,
  whatever X-Request-Id it sent (a ``kb-bg-`` prefix means nothing here).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from broker.audit.chain import Content, lines_of
from broker.timeutil import parse_time as parse_time  # re-exported: readers of the audit log use it from here

BROKER_VAULT_POLICY = "keybroker-broker"
# The broker's request-id syntax (broker.api.middleware; kept import-free for offline use). Vault
# writes whatever X-Request-Id its caller sent: a value outside it is not shown as a request id.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")
# How far a Vault entry's time may lie outside a record's window (clock skew, queueing).
JOIN_SLACK = timedelta(seconds=5)
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


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_of(row: Mapping[str, Any]) -> datetime:
    """A row's time for sorting and filtering; an unreadable time sorts first rather than failing."""
    try:
        return parse_time(str(row.get("time") or ""))
    except ValueError:
        return EPOCH


def broker_records(files: Iterable[tuple[str, Content]]) -> list[dict[str, Any]]:
    """The broker's request records (not its start, resume or checkpoint records)."""
    out = []
    for _, content in sorted(files, key=lambda f: f[0]):
        for line in lines_of(content):  # one line at a time: never a whole segment in memory
            try:
                record = json.loads(line)
            except ValueError:
                continue  # verify reports damage; the timeline shows what can be read
            if isinstance(record, dict) and record.get("type") == "event":
                out.append({**record, "source": "broker", "kind": "request"})
            elif isinstance(record, dict) and record.get("type") == "background":
                out.append({**record, "source": "broker", "kind": "background"})
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


def vault_line(entry: Any) -> tuple[str, dict[str, Any]] | None:
    """A decoded line of Vault's file audit log as (Vault's request id, the line), if it is a
    request or response line with an id; else None."""
    if not isinstance(entry, dict) or entry.get("type") not in ("request", "response"):
        return None
    request = entry.get("request")
    vid = str(request.get("id", "")) if isinstance(request, dict) else ""
    return (vid, entry) if vid else None


def vault_row(vid: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """A Vault call's row, from the first of its lines (:func:`vault_line`)."""
    request = entry.get("request") or {}
    header = (request.get("headers") or {}).get("x-request-id") or []
    sent = str(header[0]) if isinstance(header, list) and header else None
    path = str(request.get("path", ""))
    return {
        "source": "vault",
        "time": str(entry.get("time", "")),
        "vault_request_id": vid,
        "request_id": sent if sent is not None and REQUEST_ID_RE.fullmatch(sent) else None,
        "operation": f"vault.{request.get('operation', '?')}",
        "path": path,
        "key": _key_of(path),
        "remote_address": request.get("remote_address"),
        "outcome": "success",
    }


def add_vault_line(row: dict[str, Any], entry: Mapping[str, Any], broker_policy: str) -> None:
    """What each of a call's lines adds to its row: the response's view of who called wins (a
    login's request carries no token, its response the new one), and the response's error."""
    auth = entry.get("auth") or {}
    if auth or "principal" not in row:
        row["principal"] = f"vault:{auth.get('display_name') or 'unauthenticated'}"
        row["policies"] = list(auth.get("policies") or [])
        row["broker_identity"] = is_broker_identity(auth, broker_policy)
    if entry.get("type") == "response" and entry.get("error"):
        row["outcome"] = "error"
        row["error"] = str(entry["error"])


def vault_entries(
    lines: Iterable[bytes | str], broker_policy: str = BROKER_VAULT_POLICY
) -> list[dict[str, Any]]:
    """Vault's request/response pairs as one entry each (the response's view when there is one)."""
    by_id: dict[str, dict[str, Any]] = {}
    for raw in lines:
        try:
            found = vault_line(json.loads(raw))
        except ValueError:
            continue
        if found is None:
            continue
        vid, entry = found
        row = by_id.get(vid)
        if row is None:
            row = by_id[vid] = vault_row(vid, entry)
        add_vault_line(row, entry, broker_policy)
    return list(by_id.values())


def merge(broker: Sequence[Mapping[str, Any]], vault: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Broker records with their Vault evidence nested, plus unclaimed Vault rows, in time order.

    A Vault entry belongs to a broker record only when the broker's own identity made it and
    the record claims it (see the module docstring): by the Vault request id the record noted
    (a micro-batch serving several requests belongs to each of them), or, for a call answered
    without an id, by the one matching entry in the record's window.
    """
    by_vault_id: dict[str, Mapping[str, Any]] = {}
    by_sent: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in vault:
        if not row.get("broker_identity"):
            continue  # never joined, whatever request id it carries
        by_vault_id[str(row["vault_request_id"])] = row
        if row.get("request_id"):
            by_sent.setdefault((str(row["request_id"]), str(row.get("path"))), []).append(row)
    evidence: list[dict[str, Mapping[str, Any]]] = []
    claimed: set[str] = set()
    for record in broker:
        found: dict[str, Mapping[str, Any]] = {}
        for call in _vault_calls(record):
            joined = by_vault_id.get(str(call.get("id")))
            if joined is not None:
                found[str(joined["vault_request_id"])] = joined
        claimed.update(found)
        evidence.append(found)
    # Unnumbered notes second, so they can only take entries no id claimed.
    for record, found in zip(broker, evidence, strict=True):
        window = _window(record)
        for call in _vault_calls(record):
            if call.get("id") or window is None:
                continue
            key = (str(call.get("sent_request_id")), str(call.get("path")))
            for row in by_sent.get(key, []):
                vid = str(row["vault_request_id"])
                if vid not in claimed and window[0] <= time_of(row) <= window[1]:
                    claimed.add(vid)
                    found[vid] = row
                    break
    timeline: list[dict[str, Any]] = [
        {**record, "vault": [_evidence(v) for v in found.values()]}
        for record, found in zip(broker, evidence, strict=True)
    ]
    for row in vault:
        if str(row["vault_request_id"]) in claimed:
            continue
        kind = _unclaimed_kind(row)
        flags = {"bypass": kind == "bypass", "unexplained": kind == "unexplained"}
        timeline.append({**row, "kind": kind, **flags})
    timeline.sort(key=time_of)
    return timeline


def _vault_calls(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    calls = record.get("backend_calls")
    if not isinstance(calls, list):
        return []
    return [c for c in calls if isinstance(c, Mapping) and c.get("backend") == "vault"]


def _window(record: Mapping[str, Any]) -> tuple[datetime, datetime] | None:
    """When a record's unnumbered calls may have been made: from its start (a request's time less
    its latency, a background record's ``since``) to its time, with slack; None if unreadable."""
    end = time_of(record)
    if end == EPOCH:
        return None
    start = end
    if record.get("kind") == "background":
        try:
            start = parse_time(str(record.get("since") or ""))
        except ValueError:
            return None
    try:
        if isinstance(record.get("latency_ms"), int | float) and record.get("kind") != "background":
            start = end - timedelta(milliseconds=float(record["latency_ms"]))
        return start - JOIN_SLACK, end + JOIN_SLACK
    except (OverflowError, ValueError):
        return None  # a time at the calendar's ends or a latency no request had (NaN, 1e300)


def _unclaimed_kind(row: Mapping[str, Any]) -> str:
    """A Vault entry no record claims: its X-Request-Id, which its caller chose, does not matter."""
    return "unexplained" if row.get("broker_identity") else "bypass"


def _evidence(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: row.get(k)
        for k in ("vault_request_id", "time", "operation", "path", "outcome", "error")
        if k in row
    }


def trail_start(timeline: Iterable[Mapping[str, Any]]) -> datetime | None:
    """When the broker's audit trail begins: the time of its first record (request or upkeep), if any."""
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
    # broker (its records, its ``background`` upkeep records too) | vault (Vault entries no record
    # claims) | bypass (the flagged ones); None: all but the upkeep records
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
        elif self.source is None and row.get("kind") == "background":
            return False  # the broker's own upkeep (policy refresh, renewals): shown with source=broker
        for name, pattern in (("principal", self.principal), ("operation", self.operation)):
            if pattern and not fnmatchcase(str(row.get(name) or ""), pattern):
                return False
        if self.key and row.get("key") != self.key and self.key not in _names(row.get("keys")):
            return False  # ``keys``: every key a record used (a rewrap's target too)
        return not (self.outcome and row.get("outcome") != self.outcome)


def _names(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def query(
    timeline: Iterable[Mapping[str, Any]], filters: Filters, limit: int | None = None
) -> list[dict[str, Any]]:
    rows = [dict(r) for r in timeline if filters.match(r)]
    return rows[-limit:] if limit else rows


def _call_label(call: Mapping[str, Any]) -> str:
    """backend:id, or for a call answered without an id backend:status path."""
    if call.get("id"):
        return f"{call.get('backend')}:{call.get('id')}"
    return f"{call.get('backend')}:{call.get('status')} {call.get('path')}"


def flat(row: Mapping[str, Any]) -> dict[str, str]:
    """One CSV row: nested evidence becomes ';'-joined ids."""
    reason = full_reason(row)
    vault_ids = [str(v.get("vault_request_id")) for v in row.get("vault") or []]
    if row.get("source") == "vault":
        vault_ids = [str(row.get("vault_request_id"))]
    calls = [_call_label(c) for c in row.get("backend_calls") or [] if isinstance(c, Mapping)]
    values = {
        "time": row.get("time"),
        "source": row.get("source"),
        "kind": row.get("kind"),
        "request_id": row.get("request_id"),
        "principal": row.get("principal"),
        "operation": row.get("operation"),
        "key": ";".join(_names(row.get("keys"))) or row.get("key"),
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


# A cell a spreadsheet would read as a formula (or, after a tab or carriage return, might).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: str) -> str:
    """A CSV cell no spreadsheet evaluates: one starting like a formula gets a leading ``'``.

    Vault's log holds values anyone who can reach Vault chooses (paths, headers, error text),
    and the auditor opens this export in a spreadsheet.
    """
    return f"'{value}" if value.startswith(_FORMULA_STARTS) else value


def to_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: safe_cell(v) for k, v in flat(row).items()})
    return buffer.getvalue()


def to_jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def printable(value: Any) -> str:
    """Text safe for a terminal: control and other non-printable characters are escaped.

    Vault's log holds paths and names whoever called Vault chose; an escape sequence among
    them would otherwise drive the auditor's terminal (clear it, rewrite earlier lines).
    """
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


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
        principal = printable(row.get("principal") or "-")[-38:]
        outcome = printable(row.get("outcome") or "")
        if row.get("source") == "broker" and row.get("vault"):
            outcome += f" (+{len(row['vault'])} vault)"
        if row.get("source") == "vault" and row.get("path"):
            outcome += f"  {printable(row['path'])}"
        lines.append(
            f"{printable(row.get('time', ''))[:26]:<27} {printable(source):<17} {principal:<38} "
            f"{printable(row.get('operation') or '-')[:24]:<24} {printable(row.get('key') or '-')[:24]:<24} "
            f"{outcome}"
        )
    return "\n".join(lines)
