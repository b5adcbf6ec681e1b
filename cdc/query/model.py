"""What the query layer returns: mutations, table facts, pages, blame, requests; key helpers."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from cdc.errors import UsageError
from cdc.lsn import format_lsn
from cdc.names import format_table, parse_table
from cdc.store.format import MAYBE_INCOMPLETE_NOTE, ChangeFlag, TxnFlag

__all__ = [
    "BlameEntry",
    "Key",
    "Mutation",
    "MutationPage",
    "RequestError",
    "RequestRecord",
    "Row",
    "TableInfo",
    "TablePage",
    "TransactionInfo",
    "VersionRange",
    "format_key",
    "key_from_text",
    "parse_json",
    "table_name",
    "trace_of",
]

#: A row key as users give it: a scalar for one key column, a dict for several.
Key = Any
Row = dict[str, Any]


def parse_json(text: str | None) -> Any:
    """Stored JSON text (an image, a context) as Python values, object members in their order."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # an integer beyond 64 bits: the slower parser keeps it
        return json.loads(text)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@dataclass(frozen=True)
class Mutation:
    """One stored change of one row (or a TRUNCATE of a whole table)."""

    position: int
    ordinal: int
    version: int | None  # None: a rolled-back attempt
    lsn: int
    xid: int
    committed_at: datetime
    table: str  # the table's name at the change, "schema.name" quoted as PostgreSQL needs
    op: str
    key: Row | None  # None for TRUNCATE
    old_key: Row | None  # set when an UPDATE moved the row from old_key to key
    before: Row | None
    after: Row | None
    changed: tuple[str, ...]
    status: str  # "committed" | "rolled_back"
    request_id: str | None
    context: dict[str, Any] | None
    schema_id: int | None = None
    flags: int = 0  # docs/store.md "Change flags"
    table_id: int | None = None
    unknown: tuple[str, ...] = ()  # columns of an INCOMPLETE image whose value is not known
    key_text: str | None = None  # the stored key (docs/store.md "The key")
    old_key_text: str | None = None
    txn_flags: int = 0  # its transaction's (docs/store.md "Transaction flags")

    @property
    def rolled_back(self) -> bool:
        return self.status == "rolled_back"

    @property
    def possibly_incomplete(self) -> bool:
        """An attempt of a rolled-back transaction capture could not show it saw whole (it was
        behind): other attempted changes of it may be missing."""
        return bool(self.txn_flags & TxnFlag.MAYBE_INCOMPLETE)

    @property
    def incomplete_note(self) -> str | None:
        """What readers say of it when :attr:`possibly_incomplete`, else None."""
        return MAYBE_INCOMPLETE_NOTE if self.possibly_incomplete else None

    @property
    def is_keyframe(self) -> bool:
        """A SNAPSHOT written by pruning: the row's image at the history floor, not a change."""
        return bool(self.flags & ChangeFlag.KEYFRAME)

    @property
    def incomplete(self) -> bool:
        """Some columns of the image are unknown (listed in ``unknown`` when the schema says which)."""
        return bool(self.flags & ChangeFlag.INCOMPLETE)

    @property
    def cursor(self) -> tuple[int, int]:
        """The ``(position, ordinal)`` pair that orders mutations (and pages the log)."""
        return (self.position, self.ordinal)

    def to_json(self) -> dict[str, Any]:
        """The exported form (DESIGN.md "A mutation, as exported in JSON")."""
        return {
            "version": self.version,
            "version_lsn": format_lsn(self.version) if self.version is not None else None,
            "lsn": self.lsn,
            "lsn_text": format_lsn(self.lsn),
            "xid": self.xid,
            "committed_at": self.committed_at.isoformat(),
            "table": self.table,
            "key": self.key,
            "op": self.op,
            "before": self.before,
            "after": self.after,
            "changed": list(self.changed),
            "request_id": self.request_id,
            "context": self.context,
            "status": self.status,
            "possibly_incomplete": self.possibly_incomplete,
        }


@dataclass(frozen=True)
class VersionRange:
    """The versions the store can read: ``earliest`` (the floor) to ``current``, with their times."""

    earliest: int | None
    current: int | None
    earliest_at: datetime | None
    current_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "earliest": self.earliest,
            "earliest_lsn": format_lsn(self.earliest) if self.earliest is not None else None,
            "earliest_at": _iso(self.earliest_at),
            "current": self.current,
            "current_lsn": format_lsn(self.current) if self.current is not None else None,
            "current_at": _iso(self.current_at),
        }


@dataclass(frozen=True)
class TableInfo:
    """A captured table (one source relation) as resolved from a name, with its schema there.

    ``name`` is the name it was resolved by (at the version asked, else now or last);
    ``current_name`` its latest name; ``until``: a bound on positions (exclusive) when the name is
    an old one (the table was renamed or dropped there): only the history before it is read.
    """

    name: str  # "schema.name" quoted as PostgreSQL needs (cdc.names.format_table)
    key_columns: tuple[str, ...]  # empty: no key, the whole row names it (multiset)
    columns: tuple[str, ...]  # in table order
    type_oids: Mapping[str, int]
    table_id: int = 0
    schema_name: str = ""
    table_name: str = ""
    current_name: str = ""
    relation_oid: int = 0
    dropped_position: int | None = None
    until: int | None = None
    names: tuple[tuple[int, str], ...] = ()  # (from position, "schema.name") of every name it had

    @property
    def keyless(self) -> bool:
        return not self.key_columns

    @property
    def dropped(self) -> bool:
        return self.dropped_position is not None

    @property
    def current_parts(self) -> tuple[str, str]:
        """``(schema, name)`` of the table's latest name, exact."""
        return parse_table(self.current_name)


@dataclass(frozen=True)
class TablePage:
    """One page of a table at a version: rows in key order and the cursor for the next page."""

    rows: list[Row]
    next_after: Row | None  # the stored key to pass as ``after_key``; None on the last page


@dataclass(frozen=True)
class MutationPage:
    """One page of the mutation log, newest first."""

    mutations: list[Mutation]
    next_cursor: tuple[int, int] | None  # pass as ``before=`` for the next (older) page


@dataclass(frozen=True)
class BlameEntry:
    """Who wrote the current value of one column of a row."""

    column: str
    value: Any
    request_id: str | None  # of the last committed write (None: no request or unknown)
    committed_at: datetime | None  # None: written before the history floor
    version: int | None
    op: str | None
    rolled_back_request_id: str | None = None  # a later attempt on the column that was reverted
    rolled_back_at: datetime | None = None
    rolled_back: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "value": self.value,
            "request_id": self.request_id,
            "committed_at": _iso(self.committed_at),
            "version": self.version,
            "op": self.op,
            "rolled_back": self.rolled_back,
            "rolled_back_request_id": self.rolled_back_request_id,
            "rolled_back_at": _iso(self.rolled_back_at),
        }


@dataclass(frozen=True)
class TransactionInfo:
    position: int
    xid: int
    version: int | None
    commit_lsn: int | None
    status: str
    committed_at: datetime
    origin: str | None
    mutation_count: int  # every change of the transaction (of any request)
    possibly_incomplete: bool = False  # MAYBE_INCOMPLETE: capture was behind, changes may be missing
    flags: int = 0  # docs/store.md "Transaction flags"

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "position_lsn": format_lsn(self.position),
            "xid": self.xid,
            "version": self.version,
            "commit_lsn": self.commit_lsn,
            "status": self.status,
            "committed_at": self.committed_at.isoformat(),
            "origin": self.origin,
            "mutation_count": self.mutation_count,
            "possibly_incomplete": self.possibly_incomplete,
        }


#: How a reported error relates to its request (docs/security.md "Request attribution").
ATTRIBUTIONS = ("own_session", "other_session", "no_captured_session", "unverified")


def attribution(
    db_user: str | None, backend_pid: int | None, proven: bool, sessions: Collection[tuple[str, int]]
) -> str:
    """``own_session``: reported by a session that wrote this request's context (one of its
    verified contexts has the reporter's db_user and backend_pid, or the reporter proved it with
    the session token cdc.emit_context() gave it, as the client helper does): its root cause.
    ``other_session``: reported by a session that did neither, while the request has verified
    contexts; ``no_captured_session``: the same, for a request with no verified context: both
    not attributed. ``unverified``: recorded before messages were signed (no reporter)."""
    if db_user is None or backend_pid is None:
        return "unverified"
    if proven or (db_user, backend_pid) in sessions:
        return "own_session"
    return "other_session" if sessions else "no_captured_session"


@dataclass(frozen=True)
class RequestError:
    """An error a request reported; the root cause only when ``attributed``.

    Who reported it (``db_user``, ``backend_pid``, ``client_addr``, ``xid``) is as the source
    stamped it in the signed message. Attributed (``attribution`` ``own_session``): a verified
    context of the request came from the same database user and backend as the error, or the
    reporter proved with its session token that it wrote one (``proven``: the client helper
    reporting over a second connection). Else it was reported by another session (or one the
    history has no context from) and is shown as such, never as the request's cause.
    """

    error_type: str | None
    message: str | None
    location: str | None
    at: datetime | None
    db_user: str | None
    backend_pid: int | None
    attribution: str = "unverified"
    client_addr: str | None = None
    xid: int | None = None
    proven: bool = False

    @property
    def attributed(self) -> bool:
        return self.attribution == "own_session"

    @property
    def reporter(self) -> str:
        """``db_user app, pid 4242`` (who reported it)."""
        if self.db_user is None:
            return "an unverified reporter"
        return f"db_user {self.db_user}, pid {self.backend_pid if self.backend_pid is not None else '?'}"

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.error_type,
            "message": self.message,
            "location": self.location,
            "at": _iso(self.at),
            "attributed": self.attributed,
            "attribution": self.attribution,
            "reported_by": {
                "db_user": self.db_user,
                "backend_pid": self.backend_pid,
                "client_addr": self.client_addr,
                "xid": self.xid,
                "proven": self.proven,
            },
        }


def trace_of(context: Mapping[str, Any] | None) -> tuple[str, str | None] | None:
    """(trace id, span id) of a stored context document, or None when it has no trace."""
    trace_id = (context or {}).get("trace_id")
    if not isinstance(trace_id, str):
        return None
    span_id = (context or {}).get("span_id")
    return trace_id, span_id if isinstance(span_id, str) else None


@dataclass(frozen=True)
class RequestRecord:
    """A request: its context, outcome, reported errors, transactions and data changes.

    ``error_type``, ``error_message``, ``error_location``, ``error_at``: the root cause (the first
    attributed error), else None; ``errors``: every error reported for the request, attributed or
    not; ``error``: the error readers show (the root cause, else the last reported error, with its
    attribution); ``sessions``: (db_user, backend_pid) of the sessions whose verified contexts
    carried this request id; ``traces``: the (trace id, span id) pairs of its contexts (W3C trace
    context, cdc/tracing.py), first seen first.
    """

    request_id: str
    actor: str | None
    context: dict[str, Any] | None
    first_seen_at: datetime | None
    last_seen_at: datetime | None
    committed_count: int
    rolled_back_count: int
    error_type: str | None  # of the attributed error (the root cause), else None
    error_message: str | None
    error_location: str | None
    error_at: datetime | None
    transactions: list[TransactionInfo] = field(default_factory=list)
    mutations: list[Mutation] = field(default_factory=list)
    mutation_count: int = 0  # every mutation of the request (``mutations`` may be cut)
    errors: list[RequestError] = field(default_factory=list)  # every reported error, attributed or not
    sessions: tuple[tuple[str, int], ...] = ()
    traces: tuple[tuple[str, str | None], ...] = ()

    @property
    def trace_id(self) -> str | None:
        """The trace id of the request's first traced context."""
        return self.traces[0][0] if self.traces else None

    @property
    def span_id(self) -> str | None:
        """The span id of the request's first traced context."""
        return self.traces[0][1] if self.traces else None

    @property
    def outcome(self) -> str:
        """``committed``, ``rolled_back``, ``partly_rolled_back`` or ``unknown``."""
        if self.committed_count and self.rolled_back_count:
            return "partly_rolled_back"
        if self.committed_count:
            return "committed"
        if self.rolled_back_count:
            return "rolled_back"
        return "unknown"

    @property
    def possibly_incomplete(self) -> bool:
        """A rolled-back transaction of it may miss attempted changes (capture was behind)."""
        return any(t.possibly_incomplete for t in self.transactions)

    @property
    def incomplete_note(self) -> str | None:
        """What readers say when :attr:`possibly_incomplete`, else None."""
        return MAYBE_INCOMPLETE_NOTE if self.possibly_incomplete else None

    @property
    def unattributed_errors(self) -> list[RequestError]:
        return [e for e in self.errors if not e.attributed]

    @property
    def error(self) -> RequestError | None:
        """The error to show: the root cause (attributed), else the last one reported, else None."""
        cause = next((e for e in self.errors if e.attributed), None)
        return cause if cause is not None else (self.errors[-1] if self.errors else None)

    @property
    def has_error(self) -> bool:
        return bool(self.errors)

    @property
    def error_attribution(self) -> str | None:
        """The :func:`attribution` of :attr:`error` (None: no error)."""
        error = self.error
        return None if error is None else error.attribution

    @property
    def error_attributed(self) -> bool:
        """Whether a reported error may be shown as the request's root cause."""
        return self.error_attribution == "own_session"

    @property
    def error_db_user(self) -> str | None:
        error = self.error
        return None if error is None else error.db_user

    @property
    def error_backend_pid(self) -> int | None:
        error = self.error
        return None if error is None else error.backend_pid

    @property
    def error_proven(self) -> bool:
        error = self.error
        return error is not None and error.proven

    def error_reporter(self) -> str:
        """``db_user X, pid N`` of the session that reported :attr:`error`."""
        error = self.error
        return "no reporter" if error is None else error.reporter

    def to_json(self) -> dict[str, Any]:
        error = self.error
        return {
            "request_id": self.request_id,
            "actor": self.actor,
            "outcome": self.outcome,
            "context": self.context,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "traces": [{"trace_id": t, "span_id": s} for t, s in self.traces],
            "first_seen_at": _iso(self.first_seen_at),
            "last_seen_at": _iso(self.last_seen_at),
            "committed_count": self.committed_count,
            "rolled_back_count": self.rolled_back_count,
            "error": None if error is None else error.to_json(),
            "errors": [e.to_json() for e in self.errors],
            "possibly_incomplete": self.possibly_incomplete,
            "incomplete_note": self.incomplete_note,
            "transactions": [t.to_json() for t in self.transactions],
            "mutation_count": self.mutation_count,
            "mutations": [m.to_json() for m in self.mutations],
        }


# ============================================================================ names and keys


def table_name(name: str) -> str:
    """``users`` → ``public.users``; ``"User"`` → ``public."User"`` (cdc/names.py)."""
    return format_table(*parse_table(name))


def key_from_text(text: str) -> Key:
    """Parse a CLI ``--id``: a JSON object for a composite key, else the scalar text as given."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"invalid --id {short(text)}: not valid JSON ({exc.msg} at column {exc.colno}); "
                """a composite key is a JSON object such as '{"a": 1, "b": "x"}'"""
            ) from None
        if not isinstance(value, dict):
            raise UsageError(f"invalid --id {short(text)}: expected a JSON object")
        return value
    if not stripped:
        raise UsageError("invalid --id: empty")
    return stripped


def short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def format_key(key: Mapping[str, Any] | None) -> str:
    """``id=42`` / ``a=1,b=x`` (for messages)."""
    if key is None:
        return "(all rows)"
    parts = []
    for column, value in key.items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"{column}={text}")
    return ",".join(parts)
