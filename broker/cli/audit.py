"""``keybroker audit verify|query|merge|report|hmac|new-epoch``: the auditor's commands.

``verify``, ``query``, ``report`` and ``hmac`` ask a running broker (audit roles
needed); ``verify --dir`` and ``merge`` work offline on copied log files.
``new-epoch`` is the administrator's way out of a log whose history was lost.

``verify`` exits 0 when the log is intact, 1 when it is broken (names the first bad
record) and 3 when nothing was found wrong but completeness is not proven (no
public key, no Vault anchor, or an unsigned tail); ``--allow-unanchored`` accepts
that explicitly.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from broker.cli.client import BrokerClient
from broker.cli.common import Command, Session, add_command, add_group
from broker.errors import BrokerError, ConfigError

EPILOG = """\
examples:
  keybroker audit verify                         # chain, HSM signatures, Vault anchor, live head
  keybroker audit query --since 7d --outcome denied            # or --since 2026-11-23, or a full ISO time
  keybroker audit query --source bypass --hide-setup            # Vault used around the broker, not its setup
  keybroker audit query --source bypass --format csv > bypass.csv   # every matching row, paged
  keybroker audit query --outcome denied --limit 50                 # only the newest 50 (says if cut)
  keybroker audit report --out report.html       # self-contained HTML for auditors
  keybroker audit report --since 2026-11-01 --until 2026-11-30 --hide-setup --out november.html
  keybroker audit hmac acme                      # find records whose context carried 'acme'
  keybroker audit new-epoch --name restore-2026-11 --reason "disk lost, see INC-42"
offline, on copied files:
  keybroker audit verify --dir ./audit --public-key audit-key.pem --anchor SEQ:HASH
  keybroker audit merge --dir ./audit --vault-log vault-audit.log --format jsonl > timeline.jsonl
"""
FILTERS = ("since", "until", "principal", "key", "operation", "outcome", "source")
EXIT_BROKEN, EXIT_UNVERIFIED = 1, 3


def _print_report(report: dict[str, Any], as_json: bool, *, allow_unanchored: bool = False) -> int:
    verdict = report.get("verdict") or ("intact" if report["ok"] else "broken")
    if verdict == "unverified" and allow_unanchored:
        verdict = "intact"
        report = {
            **report,
            "verdict": verdict,
            "notes": [*report.get("notes", []), *(f"accepted: {u}" for u in report.get("unverified", []))],
            "unverified": [],
        }
    if as_json:
        print(json.dumps(report))
    else:
        label = {"intact": "intact", "broken": "BROKEN", "unverified": "UNVERIFIED"}[verdict]
        print(
            f"audit log {label}: {report['records']} records in {report['files']} files, "
            f"{report['checkpoints']} signed checkpoints, last record {report['last_seq']}"
        )
        problem = report.get("first_problem")
        if problem:
            where = f"{problem['file']} line {problem['line']}" if problem["file"] else "the log's end"
            print(
                f"first problem: {problem['kind']} — record {problem['seq']} ({where}): {problem['detail']}"
            )
            print(f"({report['problems']} problems in all)")
        for reason in report.get("unverified", []):
            print(f"not verified: {reason}")
        if verdict == "unverified":
            print("(pass --allow-unanchored to accept a log that cannot be proven complete)")
        for note in report.get("notes", []):
            print(f"note: {note}")
        for part in report.get("chains", []):  # serve --workers: one chain per worker
            problem = part.get("first_problem")
            print(
                f"chain {part['node']}: {part['verdict']}, {part['records']} records"
                + (f"; first problem: {problem['kind']} at record {problem['seq']}" if problem else "")
            )
    return {"intact": 0, "broken": EXIT_BROKEN}.get(verdict, EXIT_UNVERIFIED)


def _local_files(directory: str) -> list[tuple[str, Callable[[], Iterator[bytes]]]]:
    """The log's files, each read line by line when used: a log of any size in constant memory."""
    from broker.audit.chain import FILE_PREFIX, FILE_SUFFIX
    from broker.audit.segments import segment_sources

    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(f"--dir: not a directory: {directory}")
    files = sorted(path.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}"))
    if not files:
        raise ConfigError(f"--dir: no audit files ({FILE_PREFIX}*{FILE_SUFFIX}) in {directory}")
    return segment_sources(files)


def cmd_verify(args: argparse.Namespace, session: Session) -> int:
    allow = bool(args.allow_unanchored)
    if args.dir is None:
        return _print_report(
            session.client().call("GET", "/v1/audit/verify"), args.json, allow_unanchored=allow
        )
    from broker.audit.chain import Anchor, verify
    from broker.audit.signing import load_public_key, signature_checker

    check = None
    if args.public_key:
        try:
            check = signature_checker(load_public_key(Path(args.public_key).read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--public-key: {exc}") from None
    anchor = None
    if args.anchor:
        seq, _, digest = args.anchor.partition(":")
        if not seq.isdigit() or len(digest) != 64:
            raise ConfigError("--anchor takes SEQ:SHA256HEX (from Vault's kb-kv/audit/anchor-<node>)")
        anchor = Anchor(int(seq), digest)
    report = verify(_local_files(args.dir), check, anchor=anchor).to_json()
    return _print_report(report, args.json, allow_unanchored=allow)


MAX_PAGE = 10_000  # the broker's largest page (GET /v1/audit/events 'limit')


class _Output:
    """Rows written as they arrive, page by page: one header, then the rows, in the chosen format."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.rows = 0
        self.started = False

    def write(self, rows: list[dict[str, Any]]) -> None:
        from broker.audit import merge

        if self.fmt == "jsonl":
            text = merge.to_jsonl(rows)
        else:
            text = merge.to_csv(rows) if self.fmt == "csv" else merge.to_table(rows) + "\n"
            if self.started:
                text = text.split("\n", 1)[1]  # the header line went out with the first page
        sys.stdout.write(text)
        sys.stdout.flush()
        self.started = True
        self.rows += len(rows)

    def close(self) -> None:
        if self.fmt == "table":
            print(f"({self.rows} rows)")


def _note_cut(shown: int, matched: int) -> None:
    if matched > shown:
        print(
            f"keybroker: note: --limit: showing the newest {shown} of {matched} matching rows; "
            "leave --limit out for every row",
            file=sys.stderr,
        )


def event_pages(
    client: BrokerClient, params: dict[str, str], page_size: int = MAX_PAGE
) -> Iterator[list[dict[str, Any]]]:
    """Every timeline row matching ``params``, oldest first, one page per request (the cursor protocol)."""
    cursor = "start"
    while True:
        query = urllib.parse.urlencode({**params, "limit": str(page_size), "cursor": cursor})
        out = client.call("GET", "/v1/audit/events?" + query)
        if "next" not in out:
            # An older broker that ignores the cursor answers only its newest rows: refuse, never cut.
            raise BrokerError(
                f"the broker at {client.address} does not page audit events (an older version), so the "
                "export could be incomplete; upgrade it, or use --limit to ask for the newest rows only"
            )
        yield out["events"]
        following = out["next"]
        if not following:
            return
        if following == cursor:
            raise BrokerError("the broker answered the same audit page twice; stopping rather than loop")
        cursor = str(following)


# Relative times count back from now: 7d, 12h, 30m, 90s, 2w.
_AGO = re.compile(r"^([0-9]{1,9})([smhdw])$")
_DAY = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
TIME_HELP = "7d, 12h, 30m (that long ago), a date 2026-11-01 (UTC) or an ISO 8601 time 2026-11-01T09:00:00Z"


def parse_moment(value: str, flag: str, now: datetime, *, end_of_day: bool = False) -> datetime:
    """A --since/--until value as an aware datetime.

    A date alone is that day in UTC: its first instant for --since, its last for --until,
    so ``--since 2026-11-01 --until 2026-11-30`` covers the whole of November's first 30 days.
    """
    text = value.strip()
    if found := _AGO.fullmatch(text):
        try:
            return now - timedelta(seconds=int(found.group(1)) * _SECONDS[found.group(2)])
        except OverflowError:  # before year 1: no record is that old
            raise ConfigError(f"{flag}: {value!r} reaches back before the year 1; give {TIME_HELP}") from None
    try:
        if _DAY.fullmatch(text):
            day = date.fromisoformat(text)
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return start + timedelta(days=1, microseconds=-1) if end_of_day else start
        from broker.audit.merge import parse_time

        return parse_time(text)
    except ValueError:
        raise ConfigError(f"{flag}: {value!r} is not a time; give {TIME_HELP}") from None


def parse_period(value: str, flag: str) -> int:
    """A duration like 365d, 52w or 12h, in seconds (at least one)."""
    found = _AGO.fullmatch(value.strip())
    seconds = int(found.group(1)) * _SECONDS[found.group(2)] if found else 0
    if seconds < 1:
        raise ConfigError(f"{flag}: {value!r} is not a duration; give e.g. 365d, 52w or 12h")
    return seconds


def _window(args: argparse.Namespace, now: datetime) -> tuple[datetime | None, datetime | None]:
    since = parse_moment(args.since, "--since", now) if getattr(args, "since", None) else None
    until = (
        parse_moment(args.until, "--until", now, end_of_day=True) if getattr(args, "until", None) else None
    )
    if since and until and since > until:
        raise ConfigError(f"--since ({since.isoformat()}) is after --until ({until.isoformat()})")
    return since, until


def _filter_params(args: argparse.Namespace, now: datetime) -> dict[str, str]:
    params = {f: str(getattr(args, f)) for f in FILTERS if getattr(args, f, None) is not None}
    since, until = _window(args, now)
    for name, moment in (("since", since), ("until", until)):
        if moment is not None:
            params[name] = moment.isoformat()
    return params


def trail_start(client: BrokerClient) -> datetime | None:
    """When the broker's audit trail begins: its oldest record, a request or its own upkeep."""
    from broker.audit.merge import time_of

    for page in event_pages(client, {"source": "broker"}, page_size=1):
        return time_of(page[0]) if page else None
    return None


def _note_setup(hidden: int, start: datetime | None) -> None:
    if hidden:
        when = start.isoformat() if start else "?"
        print(
            f"keybroker: note: --hide-setup: left out {hidden} Vault bypass rows from before the broker's "
            f"audit trail began ({when}): the stack's own setup",
            file=sys.stderr,
        )


def cmd_query(args: argparse.Namespace, session: Session) -> int:
    from broker.audit.merge import is_setup

    params = _filter_params(args, datetime.now(UTC))
    fmt = "jsonl" if args.json else args.format
    output = _Output(fmt)
    client = session.client()
    start = trail_start(client) if args.hide_setup else None
    hidden = 0

    def shown(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        nonlocal hidden
        kept = [row for row in rows if not is_setup(row, start)]
        hidden += len(rows) - len(kept)
        return kept

    if args.limit is not None:
        if not 1 <= args.limit <= MAX_PAGE:
            raise ConfigError(f"--limit takes 1..{MAX_PAGE}; leave it out to export every matching row")
        query = urllib.parse.urlencode({**params, "limit": str(args.limit)})
        out = client.call("GET", "/v1/audit/events?" + query)
        output.write(shown(out["events"]))
        output.close()
        _note_cut(len(out["events"]), int(out.get("matched", len(out["events"]))))
        _note_setup(hidden, start)
        return 0
    if not 1 <= args.page_size <= MAX_PAGE:
        raise ConfigError(f"--page-size takes 1..{MAX_PAGE}")
    for page in event_pages(client, params, args.page_size):
        output.write(shown(page))
    output.close()
    _note_setup(hidden, start)
    return 0


def cmd_merge(args: argparse.Namespace, session: Session) -> int:
    from broker.audit import merge

    vault: list[dict[str, Any]] = []
    if args.vault_log:
        try:
            with Path(args.vault_log).open("rb") as fh:
                vault = merge.vault_entries(fh)
        except OSError as exc:
            raise ConfigError(f"--vault-log: {exc.strerror}: {args.vault_log}") from None
    timeline = merge.merge(merge.broker_records(_local_files(args.dir)), vault)
    since, until = _window(args, datetime.now(UTC))
    start = merge.trail_start(timeline)
    filters = merge.Filters(
        since=since,
        until=until,
        principal=args.principal,
        key=args.key,
        operation=args.operation,
        outcome=args.outcome,
        source=args.source,
    )
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit takes a positive number; leave it out for every matching row")
    rows = merge.query(timeline, filters)
    hidden = 0
    if args.hide_setup:
        kept = [row for row in rows if not merge.is_setup(row, start)]
        hidden, rows = len(rows) - len(kept), kept
    shown = rows[-args.limit :] if args.limit else rows
    output = _Output(args.format)
    output.write(shown)
    output.close()
    _note_cut(len(shown), len(rows))
    _note_setup(hidden, start)
    return 0


def cmd_report(args: argparse.Namespace, session: Session) -> int:
    from broker.audit.merge import is_setup
    from broker.audit.report import render

    now = datetime.now(UTC)
    since, until = _window(args, now)
    max_period = parse_period(args.max_cryptoperiod, "--max-cryptoperiod")
    client = session.client()
    print("verifying the audit chain ...", file=sys.stderr, flush=True)
    verification = client.call("GET", "/v1/audit/verify")
    print("reading the merged timeline and the key inventory ...", file=sys.stderr, flush=True)
    params = {name: moment.isoformat() for name, moment in (("since", since), ("until", until)) if moment}
    events = [row for page in event_pages(client, params) for row in page]
    start = trail_start(client)
    hidden = None
    if args.hide_setup:
        kept = [row for row in events if not is_setup(row, start)]
        hidden, events = len(events) - len(kept), kept
    keys = client.call("GET", "/v1/keys")["keys"]
    html = render(
        verification=verification,
        keys=keys,
        events=events,
        now=now,
        source=client.address,
        since=since,
        until=until,
        max_cryptoperiod=max_period,
        setup_hidden=hidden,
        trail_start=start,
    )
    out = Path(args.out)
    try:
        out.write_text(html)
    except OSError as exc:
        raise ConfigError(f"--out: {exc.strerror}: {out}") from None
    setup = f", {hidden} setup rows left out" if hidden else ""
    print(
        f"wrote {out} ({len(events)} timeline rows{setup}, {len(keys)} keys; chain "
        f"{'intact' if verification['ok'] else 'BROKEN'})"
    )
    return 0 if verification["ok"] else 1


def cmd_new_epoch(args: argparse.Namespace, session: Session) -> int:
    out = session.client().call("POST", "/v1/audit/epoch", {"name": args.name, "reason": args.reason})
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"node {out['node']}: audit epoch {out['epoch']} started at record {out['anchor']['seq']}; "
            f"{len(out['epochs'])} epoch(s) recorded in Vault's anchor"
        )
    return 0


def cmd_hmac(args: argparse.Namespace, session: Session) -> int:
    out = session.client().call("POST", "/v1/audit/hmac", {"value": args.value})
    print(json.dumps(out) if args.json else out["hmac"])
    return 0


def add_parsers(sub: Any) -> None:
    asub = add_group(
        sub,
        "audit",
        "verify, query, merge and report on the tamper-evident audit trail",
        "The broker writes one hash-chained, HSM-checkpointed record per request. These commands "
        "verify it, merge it with Vault's audit log (joined on request id), query it and render a report.",
        EPILOG,
    )

    def command(name: str, help_: str, fn: Command, *, online: bool = True) -> argparse.ArgumentParser:
        return add_command(asub, name, help_, fn, online=online)

    p = command("verify", "check the chain and signatures; name the first bad record", cmd_verify)
    p.add_argument("--dir", help="verify these files offline instead of asking the broker")
    p.add_argument(
        "--public-key", metavar="PEM", help="offline: the checkpoint key (GET /v1/audit/public-key)"
    )
    p.add_argument("--anchor", metavar="SEQ:HASH", help="offline: the last checkpoint recorded in Vault")
    p.add_argument(
        "--allow-unanchored",
        action="store_true",
        help="accept a log that cannot be proven complete (no public key or anchor, unsigned tail): exit 0, "
        "not 3",
    )

    def window(p: argparse.ArgumentParser) -> None:
        p.add_argument("--since", metavar="TIME", help=f"from then on: {TIME_HELP}")
        p.add_argument("--until", metavar="TIME", help="up to then (a date alone: the end of that day)")
        p.add_argument(
            "--hide-setup",
            action="store_true",
            help="leave out Vault bypass rows from before the broker's audit trail began (the stack's "
            "own bootstrap with the root token); later root use is always shown",
        )

    def filters(p: argparse.ArgumentParser) -> None:
        window(p)
        p.add_argument("--principal", help="principal id (globs work)")
        p.add_argument("--key")
        p.add_argument("--operation", help="e.g. crypto.decrypt, key.* (globs work)")
        p.add_argument(
            "--outcome", choices=["success", "partial", "denied", "failed", "error", "unauthenticated"]
        )
        p.add_argument("--source", choices=["broker", "vault", "bypass"])
        p.add_argument("--format", choices=["table", "jsonl", "csv"], default="table")
        p.add_argument(
            "--limit", type=int, metavar="N", help="only the newest N rows (default: every matching row)"
        )

    p = command("query", "the merged timeline, filtered: a table, JSON lines or CSV", cmd_query)
    filters(p)
    p.add_argument(
        "--page-size",
        type=int,
        # Large pages: the broker re-reads its log for each page, so fewer pages cost less.
        default=5000,
        metavar="N",
        help="rows per request while reading every matching row (default: %(default)s)",
    )
    p = command(
        "merge",
        "offline: merge copied broker and Vault audit logs into one timeline",
        cmd_merge,
        online=False,
    )
    p.add_argument("--dir", required=True, help="the broker's audit files")
    p.add_argument("--vault-log", metavar="FILE", help="Vault's file audit device log")
    filters(p)
    p = command("report", "write a self-contained HTML report for auditors", cmd_report)
    p.add_argument("--out", required=True, metavar="FILE")
    window(p)
    p.add_argument(
        "--max-cryptoperiod",
        default="365d",
        metavar="DURATION",
        help="a key with no rotation period (or a longer one) is overdue once its current version is "
        "older than this (default: %(default)s, rotate at least yearly)",
    )
    command("hmac", "the HMAC a context value has in records (to search for it)", cmd_hmac).add_argument(
        "value"
    )
    p = command(
        "new-epoch",
        "after lost audit history (broker refuses with 503): continue in a named new epoch (administrators)",
        cmd_new_epoch,
    )
    p.add_argument("--name", required=True, help="a new name for the epoch, e.g. restore-2026-11-29")
    p.add_argument("--reason", required=True, help="why: recorded in the log and in Vault's anchor")
