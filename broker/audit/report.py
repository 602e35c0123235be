"""The auditor's report: one self-contained HTML page (inline CSS and SVG, no scripts, no fetches).

Sections: chain verification, key inventory (state, age of the current version
against its rotation period, last use), keys overdue for rotation (past their own
period, or — with no period, or a longer one — past the maximum cryptoperiod, a year
by default), operations over time per principal (a chart) and per key and principal
(a table), denials, and Vault access that bypassed the broker. The period covered and
any setup rows left out are stated at the top. Every value is HTML-escaped.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from html import escape
from typing import Any

from broker.audit import merge
from broker.audit.merge import parse_time

# The seeds' guidance: rotate at least yearly. A key with no rotation period (or a longer
# one) is overdue once its current version is older than this.
DEFAULT_MAX_CRYPTOPERIOD = 365 * 86400
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#6b7280")
CRYPTO_PREFIX = "crypto."

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#111827;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #e5e7eb}
.meta{color:#6b7280}.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{padding:.3rem .5rem;text-align:left;
border-bottom:1px solid #f3f4f6;vertical-align:top}th{background:#f9fafb;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}.pill{border-radius:9px;padding:0 .45rem;
font-size:.8rem;background:#f3f4f6}.overdue{background:#fee2e2}.empty{color:#6b7280;font-style:italic}
.legend span{display:inline-block;margin-right:1rem}.legend i{display:inline-block;width:.8rem;height:.8rem;
margin-right:.3rem;vertical-align:middle}code{font-size:.85em}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _period(seconds: float | None) -> str:
    return _age(seconds) if seconds else "none"


def _why(row: Mapping[str, Any]) -> Any:
    return (row.get("decision") or {}).get("reason") or (row.get("error") or {}).get("detail")


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else ""


def _age(seconds: float) -> str:
    days = seconds / 86400
    if days >= 1:
        return f"{days:.1f} d"
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds:.0f} s"


def key_rows(
    keys: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    now: datetime,
    max_cryptoperiod: int = DEFAULT_MAX_CRYPTOPERIOD,
) -> list[dict[str, Any]]:
    """Inventory rows: current version age vs its limit, overdue flag and why, last use.

    The limit is the key's rotation period, or the maximum cryptoperiod when it has none
    or a longer one: a key nobody rotates is exactly what an auditor must see.
    """
    last_use: dict[str, str] = {}
    for row in events:
        used = str(row.get("operation", "")).startswith(CRYPTO_PREFIX) and row.get("outcome") == "success"
        if row.get("source") == "broker" and used and row.get("key"):
            last_use[str(row["key"])] = str(row.get("time"))
    out = []
    for key in keys:
        versions = key.get("versions") or []
        created = parse_time(versions[-1]["created_at"]) if versions else None
        age = (now - created).total_seconds() if created else None
        period = key.get("rotation_period_seconds")
        limit = min(int(period), max_cryptoperiod) if period else max_cryptoperiod
        in_use = key.get("state") in ("active", "suspended")
        overdue = bool(in_use and age is not None and age > limit)
        if not period:
            why = f"no rotation period; older than the maximum cryptoperiod ({_age(max_cryptoperiod)})"
        elif limit < int(period):
            why = (
                f"rotation period {_age(int(period))} is longer than the maximum cryptoperiod "
                f"({_age(max_cryptoperiod)}), which it exceeds"
            )
        else:
            why = f"past its rotation period ({_age(int(period))})"
        out.append(
            {
                "name": key.get("name"),
                "backend": key.get("backend"),
                "type": key.get("type"),
                "environment": key.get("environment"),
                "state": key.get("state"),
                "version": key.get("latest_version"),
                "age_seconds": age,
                "rotation_period_seconds": period,
                "overdue": overdue,
                "overdue_why": why if overdue else "",
                "limit_seconds": limit,
                "last_use": last_use.get(str(key.get("name"))),
            }
        )
    return out


def _buckets(events: Sequence[Mapping[str, Any]]) -> tuple[list[datetime], timedelta]:
    times = [parse_time(str(r["time"])) for r in events if r.get("time")]
    if not times:
        return [], timedelta(hours=1)
    start, end = min(times), max(times)
    span = max((end - start).total_seconds(), 60.0)
    for size in (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400):
        if span / size <= 48:
            break
    width = timedelta(seconds=size)
    first = datetime.fromtimestamp(start.timestamp() // size * size, tz=start.tzinfo)
    count = int((end - first) / width) + 1
    return [first + i * width for i in range(count)], width


def chart(events: Sequence[Mapping[str, Any]]) -> str:
    """Broker operations per time bucket, stacked by principal (the top six, then 'others')."""
    rows = [r for r in events if r.get("source") == "broker"]
    buckets, width = _buckets(rows)
    if not buckets:
        return '<p class="empty">No operations in this period.</p>'
    totals = Counter(str(r.get("principal") or "-") for r in rows)
    top = [p for p, _ in totals.most_common(6)]
    series = [*top, "others"] if len(totals) > len(top) else top
    counts: dict[int, Counter[str]] = defaultdict(Counter)
    for r in rows:
        index = int((parse_time(str(r["time"])) - buckets[0]) / width)
        principal = str(r.get("principal") or "-")
        counts[index][principal if principal in top else "others"] += 1
    peak = max(sum(c.values()) for c in counts.values())
    w, h, left, bottom = 1000.0, 260.0, 48.0, 40.0
    bar = (w - left - 10) / len(buckets)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="100%" role="img" '
        'aria-label="operations over time by principal">',
        f'<line x1="{left}" y1="{h - bottom}" x2="{w - 10}" y2="{h - bottom}" stroke="#9ca3af"/>',
        f'<text x="{left - 6}" y="14" text-anchor="end" font-size="11">{peak}</text>',
        f'<text x="{left - 6}" y="{h - bottom}" text-anchor="end" font-size="11">0</text>',
    ]
    scale = (h - bottom - 10) / peak
    for i, _moment in enumerate(buckets):
        y = h - bottom
        for n, name in enumerate(series):
            value = counts.get(i, Counter()).get(name, 0)
            if not value:
                continue
            height = value * scale
            y -= height
            parts.append(
                f'<rect x="{left + i * bar + 1:.1f}" y="{y:.1f}" width="{max(bar - 2, 1):.1f}" '
                f'height="{height:.1f}" fill="{PALETTE[n % len(PALETTE)]}">'
                f"<title>{_e(name)}: {value}</title></rect>"
            )
    step = max(1, len(buckets) // 6)
    fmt = "%H:%M" if width < timedelta(days=1) else "%m-%d"
    for i in range(0, len(buckets), step):
        parts.append(
            f'<text x="{left + i * bar + bar / 2:.1f}" y="{h - bottom + 16}" text-anchor="middle" '
            f'font-size="11">{buckets[i].strftime(fmt)}</text>'
        )
    parts.append("</svg>")
    legend = "".join(
        f'<span><i style="background:{PALETTE[n % len(PALETTE)]}"></i>{_e(name)}</span>'
        for n, name in enumerate(series)
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(
    *,
    verification: Mapping[str, Any],
    keys: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    now: datetime,
    source: str,
    since: datetime | None = None,
    until: datetime | None = None,
    max_cryptoperiod: int = DEFAULT_MAX_CRYPTOPERIOD,
    setup_hidden: int | None = None,
    trail_start: datetime | None = None,
) -> str:
    """The page. ``setup_hidden`` is how many setup rows were left out (None: none were)."""
    inventory = key_rows(keys, events, now, max_cryptoperiod)
    ok = bool(verification.get("ok"))
    problem = verification.get("first_problem") or {}
    unproven = [str(u) for u in verification.get("unverified") or []]
    word = '<span class="bad">UNVERIFIED</span>' if unproven else '<span class="ok">intact</span>'
    status = (
        f"{word} — {verification.get('records')} records, "
        f"{verification.get('checkpoints')} HSM-signed checkpoints, "
        f"last record {verification.get('last_seq')}" + "".join(f"; not verified: {_e(u)}" for u in unproven)
        if ok
        else f'<span class="bad">BROKEN</span> — first problem: {_e(problem.get("kind"))} at record '
        f"{_e(problem.get('seq'))} ({_e(problem.get('file'))} line {_e(problem.get('line'))}): "
        f"{_e(problem.get('detail'))}"
    )
    key_table = _table(
        [
            "key",
            "backend",
            "type",
            "env",
            "state",
            "version",
            "current version age",
            "rotation period",
            "last use",
        ],
        [
            [
                f"<td><code>{_e(k['name'])}</code></td>",
                f"<td>{_e(k['backend'])}</td>",
                f"<td>{_e(k['type'])}</td>",
                f"<td>{_e(k['environment'])}</td>",
                f'<td><span class="pill">{_e(k["state"])}</span></td>',
                f'<td class="num">{_e(k["version"])}</td>',
                f'<td class="num{" overdue" if k["overdue"] else ""}">'
                f"{_age(k['age_seconds']) if k['age_seconds'] is not None else '-'}</td>",
                f'<td class="num">{_period(k["rotation_period_seconds"])}</td>',
                f"<td>{_e(k['last_use'] or 'never (in this period)')}</td>",
            ]
            for k in inventory
        ],
        "No keys.",
    )
    overdue = [k for k in inventory if k["overdue"]]
    overdue_table = _table(
        ["key", "current version age", "rotation period", "why"],
        [
            [
                f"<td><code>{_e(k['name'])}</code></td>",
                f'<td class="num overdue">{_age(k["age_seconds"])}</td>',
                f'<td class="num">{_period(k["rotation_period_seconds"])}</td>',
                f"<td>{_e(k['overdue_why'])}</td>",
            ]
            for k in overdue
        ],
        "No key is overdue for rotation.",
    )
    per_key = Counter(
        (str(r.get("key") or "-"), str(r.get("principal") or "-"))
        for r in events
        if r.get("source") == "broker" and r.get("key")
    )
    usage_table = _table(
        ["key", "principal", "requests"],
        [
            [f"<td><code>{_e(k)}</code></td>", f"<td>{_e(p)}</td>", f'<td class="num">{n}</td>']
            for (k, p), n in per_key.most_common(50)
        ],
        "No key was used.",
    )
    denials = [r for r in events if r.get("source") == "broker" and r.get("outcome") == "denied"]
    denial_table = _table(
        ["time", "principal", "operation", "key", "reason"],
        [
            [
                f"<td>{_e(r.get('time'))}</td>",
                f"<td>{_e(r.get('principal'))}</td>",
                f"<td>{_e(r.get('operation'))}</td>",
                f"<td>{_e(r.get('key'))}</td>",
                f"<td>{_e(_why(r))}</td>",
            ]
            for r in denials[-100:]
        ],
        "No request was denied.",
    )
    bypass = [r for r in events if r.get("bypass")]
    bypass_table = _table(
        ["time", "Vault identity", "operation", "path", "Vault request id"],
        [
            [
                f"<td>{_e(r.get('time'))}</td>",
                f'<td class="bad">{_e(r.get("principal"))}</td>',
                f"<td>{_e(r.get('operation'))}</td>",
                f"<td><code>{_e(r.get('path'))}</code></td>",
                f"<td><code>{_e(r.get('vault_request_id'))}</code></td>",
            ]
            for r in bypass[-200:]
        ],
        "No Vault access bypassed the broker.",
    )
    total = sum(1 for r in events if r.get("source") == "broker")
    period = f"from {_e(_when(since) or 'the beginning of the log')} until {_e(_when(until) or 'now')}"
    start = _e(_when(trail_start) or "unknown")
    if setup_hidden is not None:
        setup = (
            f'<p id="setup">Setup traffic hidden (--hide-setup): {setup_hidden} Vault calls made '
            f"before the broker's audit trail began ({start}) — the stack's bootstrap, first "
            "certificates and policy, with no broker yet to go around — are not listed.</p>"
        )
    else:
        before = sum(1 for r in bypass if merge.is_setup(r, trail_start))
        setup = (
            f'<p id="setup">{before} of these were made before the broker\'s audit trail began '
            f"({start}): the stack's own setup; <code>keybroker audit report --hide-setup</code> "
            "leaves them out.</p>"
            if before
            else ""
        )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>keybroker audit report</title>
<style>{CSS}</style></head><body>
<h1>keybroker audit report</h1>
<p class="meta">Generated {_e(now.isoformat(timespec="seconds"))} from {_e(source)}.
Period: <span id="period">{period}</span>. Maximum cryptoperiod: {_age(max_cryptoperiod)}.
{total} broker requests, {len(denials)} denied, {len(bypass)} Vault calls bypassing the broker.</p>
<h2>Chain verification</h2><p id="verification">{status}</p>
<h2>Key inventory</h2>{key_table}
<h2>Keys overdue for rotation</h2>{overdue_table}
<h2>Operations over time, by principal</h2>{chart(events)}
<h2>Operations per key and principal</h2>{usage_table}
<h2>Denials</h2>{denial_table}
<h2>Vault access that bypassed the broker</h2>{setup}{bypass_table}
</body></html>
"""
