"""Pure formatting of history for people and for export: no database access here.

Times are shown in the local zone (``TZ``) unless ``utc`` is asked for, at minute
precision in tables (``2026-03-10 14:22``) and as ISO 8601 with an offset in JSON/CSV.
Values are shown as stored (the server's text output; integers and booleans as JSON):
``null`` for NULL, and in table form cut to :data:`VALUE_WIDTH` characters with ``…``.
Exports (JSON, CSV) are never shortened.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cdc.errors import UsageError
from cdc.lsn import format_lsn
from cdc.names import display_table, parse_table
from cdc.store.format import MAYBE_INCOMPLETE_NOTE, is_oversize

if TYPE_CHECKING:
    from cdc.query import BlameEntry, Mutation, RequestError, RequestRecord

__all__ = [
    "MUTATION_CSV_FIELDS",
    "POSSIBLY_INCOMPLETE",
    "VALUE_WIDTH",
    "align",
    "blame_lines",
    "csv_text",
    "describe_mutation",
    "format_time",
    "format_value",
    "history_lines",
    "incomplete_lines",
    "json_text",
    "key_text",
    "mutation_record",
    "mutations_csv",
    "mutations_json",
    "oversize_text",
    "request_lines",
    "row_lines",
    "short_request",
    "short_table",
    "shorten",
    "to_zone",
    "unattributed_text",
    "why_lines",
]

VALUE_WIDTH = 40
ARROW = "→"
ROLLED_BACK_NOTE = "(rolled back)"
#: After an attempt of a transaction capture could not show it saw whole (MAYBE_INCOMPLETE).
MAYBE_INCOMPLETE_MARK = "(rolled back; attempt possibly incomplete)"
#: What readers say of such an attempt (docs/store.md "Transaction flags").
POSSIBLY_INCOMPLETE = MAYBE_INCOMPLETE_NOTE
MUTATION_CSV_FIELDS = (
    "version",
    "version_lsn",
    "lsn",
    "lsn_text",
    "xid",
    "committed_at",
    "table",
    "key",
    "op",
    "before",
    "after",
    "changed",
    "request_id",
    "context",
    "status",
    "possibly_incomplete",
)
_JSON_CSV_FIELDS = frozenset({"key", "before", "after", "changed", "context"})
_CONTROL = {i: f"\\x{i:02x}" for i in range(32)} | {10: "\\n", 13: "\\r", 9: "\\t", 127: "\\x7f"}
_INDENT = "  "


# ============================================================================ values and times


def to_zone(value: datetime, utc: bool = False) -> datetime:
    """``value`` in UTC, or in the local zone (``TZ``; naive values are taken as local)."""
    return value.astimezone(UTC) if utc else value.astimezone()


def format_time(value: datetime | None, utc: bool = False, *, seconds: bool = False) -> str:
    """``2026-03-10 14:22`` (``:05`` with ``seconds``); ``-`` for None."""
    if value is None:
        return "-"
    return to_zone(value, utc).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def format_value(value: Any) -> str:
    """A stored value as text: ``null``, ``true``/``false``, numbers, strings as they are, JSON else.

    Control characters (newlines...) are escaped so that one value stays on one line.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if is_oversize(value):
        return oversize_text(value)
    if isinstance(value, str):
        text = value
    elif isinstance(value, int | float):
        text = str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return text.translate(_CONTROL)


def oversize_text(value: Mapping[str, Any]) -> str:
    """``(oversize value: 70000000 bytes, sha256 1a2b3c4d5e6f…)``: a value stored by reference."""
    digest = str(value.get("sha256") or "?")
    return f"(oversize value: {value.get('bytes', '?')} bytes, sha256 {digest[:12]}…)"


def shorten(text: str, width: int = VALUE_WIDTH) -> str:
    """``text`` cut to ``width`` characters, the last one ``…`` when cut."""
    if width <= 0 or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def cell(value: Any, width: int = VALUE_WIDTH) -> str:
    return shorten(format_value(value), width)


def short_table(name: str) -> str:
    """``public.users`` → ``users``, ``public."User"`` → ``"User"``; other schemas stay."""
    try:
        return display_table(*parse_table(name))
    except UsageError:  # not a table name: shown as it is
        return name


def short_request(request_id: str | None, prefixes: Mapping[str, str] | None = None) -> str:
    """``req:<id>``; ``req:-`` when there is none. ``prefixes`` (from
    ``Store.request_prefixes``) shortens an id to its shortest unique prefix of at least 8
    characters, which ``cdc why`` and ``--request`` accept; without it the id is shown whole."""
    if not request_id:
        return "req:-"
    return f"req:{prefixes.get(request_id, request_id) if prefixes else request_id}"


def key_text(key: Mapping[str, Any] | None, width: int = VALUE_WIDTH) -> str:
    """``id=42``, ``a=1,b=x``; ``(all rows)`` for a TRUNCATE."""
    if key is None:
        return "(all rows)"
    return shorten(",".join(f"{column}={format_value(value)}" for column, value in key.items()), width)


# ============================================================================ mutations


def _shown_columns(image: Mapping[str, Any], hide: Collection[str]) -> list[str]:
    """Non-null columns not hidden; all non-null ones when that would leave nothing (no key)."""
    shown = [c for c, v in image.items() if v is not None and c not in hide]
    return shown or [c for c, v in image.items() if v is not None]


def describe_mutation(
    mutation: Mutation,
    *,
    with_op: bool = False,
    hide: Collection[str] | None = None,
    width: int = VALUE_WIDTH,
) -> str:
    """What a mutation did, in one line.

    INSERT/SNAPSHOT: ``email=a@b.com, plan=free`` (non-null, non-key columns); UPDATE:
    ``plan: free → pro`` for each changed column; DELETE: the deleted values; TRUNCATE:
    ``all rows``. ``with_op`` prefixes every op but UPDATE (``INSERT email=...``). A
    rolled-back attempt ends with ``  (rolled back)``, one of a transaction capture could not
    show it saw whole with ``  (rolled back; attempt possibly incomplete)``. ``hide``: columns to
    leave out of INSERT/DELETE values (default: the key's columns).
    """
    hidden = set(mutation.key or {}) if hide is None else set(hide)
    if mutation.op == "TRUNCATE":
        text = "all rows"
    elif mutation.op == "UPDATE":
        before, after = mutation.before or {}, mutation.after or {}
        changed = list(mutation.changed) or [c for c in after if c in before and before[c] != after[c]]
        if mutation.old_key is not None and mutation.key is not None:
            moved = [
                c for c in mutation.key if mutation.old_key.get(c) != mutation.key[c] and c not in changed
            ]
            changed = moved + changed
        parts = []
        for column in changed:
            old = before.get(column, (mutation.old_key or {}).get(column))
            new = after.get(column, (mutation.key or {}).get(column))
            parts.append(f"{column}: {cell(old, width)} {ARROW} {cell(new, width)}")
        text = ", ".join(parts) or "(no change)"
    else:
        image = (mutation.before if mutation.op == "DELETE" else mutation.after) or {}
        text = ", ".join(f"{c}={cell(image[c], width)}" for c in _shown_columns(image, hidden))
    if with_op and mutation.op != "UPDATE":
        text = f"{mutation.op} {text}".rstrip()
    if mutation.incomplete:
        text = f"{text}  {incomplete_text(mutation)}"
    if mutation.possibly_incomplete:
        text = f"{text}  {MAYBE_INCOMPLETE_MARK}"
    elif mutation.rolled_back:
        text = f"{text}  {ROLLED_BACK_NOTE}"
    return text


def incomplete_lines(mutations: Iterable[Mutation], prefixes: Mapping[str, str] | None = None) -> list[str]:
    """The note under a list of mutations where some are attempts capture could not show it saw
    whole: ``  note: capture was behind; some attempted changes may be missing (req:550e8400)``."""
    requests = list(dict.fromkeys(m.request_id or "" for m in mutations if m.possibly_incomplete))
    if not requests:
        return []
    which = ", ".join(short_request(r or None, prefixes) for r in requests)
    return ["", f"{_INDENT}note: {POSSIBLY_INCOMPLETE} ({which})"]


def incomplete_text(mutation: Mutation) -> str:
    """``(incomplete image: bio unknown)``: columns the store could not know (unchanged TOAST)."""
    unknown = ", ".join(mutation.unknown) or "some columns"
    return f"(incomplete image: {unknown} unknown)"


def align(rows: Iterable[Sequence[str]], gaps: Sequence[int], indent: str = _INDENT) -> list[str]:
    """Lay out ``rows`` in columns: each column but the last padded to its widest cell plus its gap."""
    table = [list(r) for r in rows]
    if not table:
        return []
    count = max(len(r) for r in table)
    widths = [max((len(r[i]) for r in table if i < len(r)), default=0) for i in range(count)]
    lines = []
    for r in table:
        parts = []
        for i, text in enumerate(r):
            if i < len(r) - 1:
                gap = gaps[i] if i < len(gaps) else 2
                parts.append(text.ljust(widths[i] + gap))
            else:
                parts.append(text)
        lines.append((indent + "".join(parts)).rstrip())
    return lines


def history_lines(
    table: str,
    key: Mapping[str, Any],
    mutations: Sequence[Mutation],
    *,
    utc: bool = False,
    prefixes: Mapping[str, str] | None = None,
) -> list[str]:
    """``cdc state history TABLE --id ID``: a header and one aligned line per mutation.

    The description column is at least 2 wider than the widest plain description, and at
    least 1 wider than the widest one ending in ``(rolled back)``.
    """
    count = len(mutations)
    header = f"{_INDENT}{table} {key_text(key)}  ({count} mutation{'' if count == 1 else 's'})"
    if not mutations:
        return [header]
    descriptions = [describe_mutation(m) for m in mutations]
    plain = [describe_mutation(m) for m in mutations if not m.rolled_back] or [""]
    width = max(max(len(d) for d in plain) + 2, max(len(d) for d in descriptions) + 1)
    ops = max(len(m.op) for m in mutations)
    lines = [header, ""]
    for m, desc in zip(mutations, descriptions, strict=True):
        request = short_request(m.request_id, prefixes) if m.request_id else ""
        line = f"{_INDENT}{format_time(m.committed_at, utc)}  {m.op.ljust(ops)}  {desc.ljust(width)}{request}"
        lines.append(line.rstrip())
    return lines + incomplete_lines(mutations, prefixes)


def request_lines(mutations: Sequence[Mutation]) -> list[str]:
    """``cdc state history --request REQ``: ``users    id=42   plan: free → null  (rolled back)``."""
    rows = [
        [
            short_table(m.table),
            key_text(m.key if m.op != "TRUNCATE" else None),
            describe_mutation(m, with_op=True),
        ]
        for m in mutations
    ]
    return align(rows, gaps=(3, 1)) + incomplete_lines(mutations)


def blame_lines(
    entries: Sequence[BlameEntry], *, utc: bool = False, prefixes: Mapping[str, str] | None = None
) -> list[str]:
    """``cdc state blame``, a line per column: name, value, request, time, later rolled-back attempt.

    ``plan    pro       req:4f9a3b2c  2026-03-10 14:22  ✗ rolled back req:550e8400``
    """
    rows = []
    for e in entries:
        when = format_time(e.committed_at, utc) if e.committed_at else "(before history)"
        row = [e.column, cell(e.value), short_request(e.request_id, prefixes), when]
        if e.rolled_back:
            row.append(f"✗ rolled back {short_request(e.rolled_back_request_id, prefixes)}")
        rows.append(row)
    return align(rows, gaps=(3, 3, 2, 2))


def row_lines(row: Mapping[str, Any]) -> list[str]:
    """``cdc state at``: one ``column  value`` line per column."""
    return align(([c, cell(v)] for c, v in row.items()), gaps=(2,))


_OUTCOMES = {
    "committed": "committed",
    "rolled_back": "rolled back",
    "unknown": "unknown (no transaction of it was stored)",
}


def _outcome(record: RequestRecord) -> str:
    if record.outcome == "partly_rolled_back":
        n = record.rolled_back_count
        return f"committed, {n} attempt{'' if n == 1 else 's'} rolled back"
    return _OUTCOMES.get(record.outcome, record.outcome)


def _context_text(context: Mapping[str, Any] | None) -> str:
    if not context:
        return ""
    labels = (
        ("application_name", "app"),
        ("db_user", "db user"),
        ("client_addr", "client"),
        ("backend_pid", "pid"),
        ("source", "source"),
    )
    parts = [f"{label}={format_value(context[k])}" for k, label in labels if context.get(k) not in (None, "")]
    extra = context.get("extra")
    if isinstance(extra, Mapping):
        parts += [f"{k}={cell(v)}" for k, v in extra.items()]
    return ", ".join(parts)


def unattributed_text(error: RequestError) -> str:
    """Why a reported error is not shown as the request's root cause (docs/security.md):
    ``reported by another session (db_user app, pid 4242): not attributed``."""
    if error.attribution == "other_session":
        return f"reported by another session ({error.reporter}): not attributed"
    if error.attribution == "no_captured_session":
        return f"reported by a session that wrote no captured context of this request ({error.reporter}): not attributed"
    return "unverified (recorded before messages were signed): not attributed"


def _error_text(error_type: str | None, message: str | None) -> str:
    return ": ".join(p for p in (error_type, message) if p).translate(_CONTROL)


def why_lines(record: RequestRecord, *, utc: bool = False, max_changes: int = 50) -> list[str]:
    """``cdc why REQ``: the request's record, one labelled field a line."""
    fields: list[tuple[str, str]] = [("REQUEST", record.request_id)]
    if record.actor:
        fields.append(("ACTOR", record.actor))
    fields.append(("OUTCOME", _outcome(record)))
    if record.error_type or record.error_message:
        fields.append(("ROOT CAUSE", _error_text(record.error_type, record.error_message)))
        fields.append(("REPORTED BY", record.error_reporter()))
    elif record.rolled_back_count:
        none = (
            "no error of this request's sessions was reported" if record.errors else "no error was reported"
        )
        fields.append(("ROOT CAUSE", f"unknown ({none} for this request)"))
    if record.error_location:
        fields.append(("LOCATION", record.error_location.translate(_CONTROL)))
    for error in record.unattributed_errors:
        fields.append(
            ("ERROR", f"{_error_text(error.error_type, error.message)}  ({unattributed_text(error)})")
        )
    if record.possibly_incomplete:
        fields.append(("NOTE", POSSIBLY_INCOMPLETE))
    context = _context_text(record.context)
    if context:
        fields.append(("CONTEXT", context))
    fields.extend(("TRACE", f"{t}  span {s or '-'}") for t, s in record.traces)
    if record.first_seen_at is not None:
        first, last = format_time(record.first_seen_at, utc), format_time(record.last_seen_at, utc)
        fields.append(("WHEN", first if last in ("-", first) else f"{first} … {last}"))
    for t in record.transactions:
        status = "committed" if t.status == "committed" else "rolled back"
        count = f"{t.mutation_count} change{'' if t.mutation_count == 1 else 's'}"
        fields.append(
            (
                "TRANSACTION",
                f"xid {t.xid}  {status} at {format_lsn(t.position)}  "
                f"{format_time(t.committed_at, utc)}  {count}"
                + ("  (possibly incomplete)" if t.possibly_incomplete else ""),
            )
        )
    label_width = max(len("DATA CHANGES"), *(len(label) for label, _ in fields)) + 1
    lines = [f"{_INDENT}{label.ljust(label_width)}{value}" for label, value in fields]
    shown = record.mutations[:max_changes]
    targets = [f"{short_table(m.table)}.{key_text(m.key)}" if m.key else short_table(m.table) for m in shown]
    target_width = max((len(t) for t in targets), default=0) + 2
    changes: list[str] = [
        f"{target.ljust(target_width)}{describe_mutation(m, with_op=True)}"
        for target, m in zip(targets, shown, strict=True)
    ]
    hidden = record.mutation_count - len(shown)
    if hidden > 0:
        changes.append(f"… and {hidden} more (cdc state history --request {record.request_id})")
    if not changes:
        changes = ["none"]
    for i, text in enumerate(changes):
        label = "DATA CHANGES" if i == 0 else ""
        lines.append(f"{_INDENT}{label.ljust(label_width)}{text}".rstrip())
    return lines


# ============================================================================ exports


def mutation_record(mutation: Mutation, *, utc: bool = False) -> dict[str, Any]:
    """The exported form of a mutation, its time in UTC or the local zone."""
    record = mutation.to_json()
    record["committed_at"] = to_zone(mutation.committed_at, utc).isoformat()
    return record


def mutations_json(mutations: Iterable[Mutation], *, utc: bool = False) -> str:
    """A JSON array of mutations (the DESIGN.md fields plus ``version_lsn``/``lsn_text``)."""
    return json.dumps([mutation_record(m, utc=utc) for m in mutations], ensure_ascii=False, indent=2)


def json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


def csv_text(fields: Sequence[str], records: Iterable[Mapping[str, Any]]) -> str:
    """CSV with a header row; None is an empty cell, dicts and lists are JSON."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({f: _csv_cell(record.get(f), f in _JSON_CSV_FIELDS) for f in fields})
    return out.getvalue()


def _csv_cell(value: Any, as_json: bool) -> str:
    if as_json or isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def mutations_csv(mutations: Iterable[Mutation], *, utc: bool = False) -> str:
    """One CSV row per mutation; ``key``/``before``/``after``/``changed``/``context`` are JSON."""
    return csv_text(MUTATION_CSV_FIELDS, (mutation_record(m, utc=utc) for m in mutations))
