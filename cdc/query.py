"""The one query layer every reader (CLI, HTTP API, web page, Python API) shares.

A :class:`Store` reads the history store (``sql/store.sql``) of one schema over one
psycopg 3 connection, opened lazily on first use and reopened after it breaks. It is
synchronous and not thread-safe: use one ``Store`` per thread (or per request).

Semantics (see ``sql/store.sql``):

* A mutation's *version* is its transaction's end LSN when it is part of the committed
  state, ``None`` for a rolled-back attempt. Mutations are ordered by
  ``(position, ordinal)``.
* Row R (table T, key K) at version V: the latest committed mutation at or before V
  with ``key = K`` or ``old_key = K`` decides: its ``after`` if it has ``key = K`` and
  op INSERT/UPDATE/SNAPSHOT, else the row is absent; a later committed TRUNCATE of T
  (still at or before V) makes it absent too. Two index seeks (``mutations_row``,
  ``mutations_old_row``) plus one on ``mutations_truncate``.
* Tables without a key (``REPLICA IDENTITY FULL``, ``table_schemas.key_columns`` empty)
  use the whole row as key and are multisets: a row value counts +1 per INSERT/SNAPSHOT
  (or UPDATE arriving at it) and -1 per DELETE (or UPDATE leaving it) since the last
  TRUNCATE.
* **Key order** (``table_at``, ``History.at(...).table(...).collect()``): rows come
  ordered by the values of their key columns, compared in key-column order, each value
  compared with PostgreSQL's jsonb ordering (integers numerically, booleans false <
  true, every other type by its text output in the store database's collation). For a
  one-column key this is the order of the ``mutations_row`` index, so each page is a
  short index range scan; for composite keys and keyless tables (ordered by the jsonb of
  the whole row) each page scans the table's history.

Keys: a one-column key is given as a Python scalar, a composite one as a dict
(``{"a": 1, "b": "x"}``); both are turned into the stored jsonb form with the key
columns and type oids of the table's latest schema (ints for integer types, bools for
bool, text otherwise: give numerics, uuids and timestamps as the server prints them).
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb

from cdc.config import normalize_table, redact_dsn
from cdc.errors import NotFoundError, StoreUnavailableError, UsageError, error_text
from cdc.lsn import format_lsn
from cdc.values import key_value_from_user

__all__ = [
    "DEFAULT_SCHEMA",
    "BlameEntry",
    "Key",
    "Mutation",
    "MutationPage",
    "RequestRecord",
    "Row",
    "Store",
    "TableInfo",
    "TablePage",
    "TransactionInfo",
    "VersionRange",
    "format_key",
    "key_from_text",
    "table_name",
]

DEFAULT_SCHEMA = "cdc_history"

#: A row key as users give it: a scalar for one key column, a dict for several.
Key = Any
Row = dict[str, Any]
Op = Literal["INSERT", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT"]

OPS = ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "SNAPSHOT")
STATUSES = ("committed", "rolled_back")
_ROW_OPS = ("INSERT", "UPDATE", "SNAPSHOT")
_MAX_ORDINAL = 2**31  # larger than any ordinal: "every mutation of position <= V"
_BATCH = 500
_MAX_KEY_HOPS = 1000
_TABLE_CACHE_SECONDS = 30.0
_TIME_SKEW = timedelta(seconds=60)  # commit timestamps vs WAL order, see version_at_timestamp
_DEFAULT_CONNECT_TIMEOUT = "10"

#: Every stored mutation: the time partitions of ``mutations`` and ``mutations_keep`` (the
#: keyframes written by pruning and the rows of longer-retention tables), see sql/store.sql.
_MUTATIONS = "mutations_all"

_MUTATION_COLUMNS = sql.SQL(
    "position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, "
    "before, after, changed, status, request_id, context, schema_id"
)


# ============================================================================ results


@dataclass(frozen=True)
class Mutation:
    """One stored change of one row (or a TRUNCATE of a whole table)."""

    position: int
    ordinal: int
    version: int | None  # None: a rolled-back attempt
    lsn: int
    xid: int
    committed_at: datetime
    table: str  # "schema.name"
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

    @property
    def rolled_back(self) -> bool:
        return self.status == "rolled_back"

    @property
    def is_keyframe(self) -> bool:
        """A SNAPSHOT written by pruning: the row's image at the history floor, not a change."""
        return self.op == "SNAPSHOT" and bool((self.context or {}).get("keyframe"))

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
            "earliest_at": self.earliest_at.isoformat() if self.earliest_at else None,
            "current": self.current,
            "current_lsn": format_lsn(self.current) if self.current is not None else None,
            "current_at": self.current_at.isoformat() if self.current_at else None,
        }


@dataclass(frozen=True)
class TableInfo:
    """What the latest schema row says about a captured table."""

    name: str  # "schema.name"
    key_columns: tuple[str, ...]  # empty: no key, the whole row names it (multiset)
    columns: tuple[str, ...]  # in table order
    type_oids: Mapping[str, int]

    @property
    def keyless(self) -> bool:
        return not self.key_columns


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
            "committed_at": self.committed_at.isoformat() if self.committed_at else None,
            "version": self.version,
            "op": self.op,
            "rolled_back": self.rolled_back,
            "rolled_back_request_id": self.rolled_back_request_id,
            "rolled_back_at": self.rolled_back_at.isoformat() if self.rolled_back_at else None,
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
    mutation_count: int

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
        }


@dataclass(frozen=True)
class RequestRecord:
    """A request: its context, outcome, reported error, transactions and data changes."""

    request_id: str
    actor: str | None
    context: dict[str, Any] | None
    first_seen_at: datetime | None
    last_seen_at: datetime | None
    committed_count: int
    rolled_back_count: int
    error_type: str | None
    error_message: str | None
    error_location: str | None
    error_at: datetime | None
    transactions: list[TransactionInfo] = field(default_factory=list)
    mutations: list[Mutation] = field(default_factory=list)
    mutation_count: int = 0  # every mutation of the request (``mutations`` may be cut)
    # Who reported the error, as the source stamped it (None: recorded before signing).
    error_db_user: str | None = None
    error_backend_pid: int | None = None
    error_client_addr: str | None = None
    error_xid: int | None = None
    # The reporter proved with its session token that it wrote a context of this request.
    error_proven: bool = False
    # (db_user, backend_pid) of the sessions whose verified contexts carried this request id.
    sessions: tuple[tuple[str, int], ...] = ()

    @property
    def has_error(self) -> bool:
        return bool(self.error_type or self.error_message)

    @property
    def error_attribution(self) -> str | None:
        """How the reported error relates to the request (docs/security.md, "Attribution").

        ``own_session``: reported by a session that wrote this request's context (one of its
        captured contexts has the reporter's db_user and backend_pid, or the reporter proved it
        with the session token cdc.emit_context() gave it, as the client helper does): its root
        cause. ``other_session``: reported by a session that did neither, while the request has
        captured contexts; ``no_captured_session``: the same, for a request with no captured
        context: both not attributed. ``unverified``: recorded before messages were signed.
        None: no error.
        """
        if not self.has_error:
            return None
        if self.error_db_user is None or self.error_backend_pid is None:
            return "unverified"
        if self.error_proven or (self.error_db_user, self.error_backend_pid) in self.sessions:
            return "own_session"
        return "other_session" if self.sessions else "no_captured_session"

    @property
    def error_attributed(self) -> bool:
        """Whether the error may be shown as the request's root cause."""
        return self.error_attribution == "own_session"

    def error_reporter(self) -> str:
        """ "db_user X, pid N" of the session that reported the error."""
        if self.error_db_user is None:
            return "an unverified reporter"
        return f"db_user {self.error_db_user}, pid {self.error_backend_pid}"

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

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "actor": self.actor,
            "outcome": self.outcome,
            "context": self.context,
            "first_seen_at": self.first_seen_at.isoformat() if self.first_seen_at else None,
            "last_seen_at": self.last_seen_at.isoformat() if self.last_seen_at else None,
            "committed_count": self.committed_count,
            "rolled_back_count": self.rolled_back_count,
            "error": None
            if not self.has_error
            else {
                "type": self.error_type,
                "message": self.error_message,
                "location": self.error_location,
                "at": self.error_at.isoformat() if self.error_at else None,
                "attributed": self.error_attributed,
                "attribution": self.error_attribution,
                "reported_by": {
                    "db_user": self.error_db_user,
                    "backend_pid": self.error_backend_pid,
                    "client_addr": self.error_client_addr,
                    "xid": self.error_xid,
                    "proven": self.error_proven,
                },
            },
            "transactions": [t.to_json() for t in self.transactions],
            "mutation_count": self.mutation_count,
            "mutations": [m.to_json() for m in self.mutations],
        }


def _sessions(value: Any) -> tuple[tuple[str, int], ...]:
    """[[db_user, backend_pid], ...] (stored or aggregated) as pairs; malformed entries skipped."""
    out: list[tuple[str, int]] = []
    for item in value or ():
        if (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
        ):
            out.append((item[0], item[1]))
    return tuple(dict.fromkeys(out))


# ============================================================================ names and keys


def table_name(name: str) -> str:
    """``users`` → ``public.users``; ``s.t`` stays; quoted parts keep their case."""
    schema, table = normalize_table(name)
    return f"{schema}.{table}"


def key_from_text(text: str) -> Key:
    """Parse a CLI ``--id``: a JSON object for a composite key, else the scalar text as given."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise UsageError(
                f"invalid --id {_short(text)}: not valid JSON ({exc.msg} at column {exc.colno}); "
                """a composite key is a JSON object such as '{"a": 1, "b": "x"}'"""
            ) from None
        if not isinstance(value, dict):
            raise UsageError(f"invalid --id {_short(text)}: expected a JSON object")
        return value
    if not stripped:
        raise UsageError("invalid --id: empty")
    return stripped


def _short(text: str, width: int = 60) -> str:
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


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


# ============================================================================ the store


class Store:
    """Reads of the history store in schema ``schema``, over ``dsn`` or an open connection.

    Every error is a :class:`~cdc.errors.CdcError`: the store unreachable or not set up →
    :class:`StoreUnavailableError`; unknown table, row or request → :class:`NotFoundError`;
    a malformed argument → :class:`UsageError`.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        schema: str = DEFAULT_SCHEMA,
        connection: psycopg.Connection[Any] | None = None,
    ) -> None:
        if dsn is None and connection is None:
            raise UsageError("no history store: give a DSN or a connection")
        self._dsn = dsn
        self._schema = schema
        self._conn: psycopg.Connection[Any] | None = connection
        self._owns_conn = connection is None
        self._tables: dict[str, tuple[float, TableInfo]] = {}
        self._schema_columns: dict[int, tuple[str, ...]] = {}

    # ------------------------------------------------------------------ connection

    @property
    def schema(self) -> str:
        return self._schema

    def describe(self) -> str:
        """``host=... port=... dbname=... schema=...`` of the store, never the password."""
        if self._dsn is None:
            info = self._conn.info if self._conn is not None else None
            if info is None:
                return f"schema={self._schema}"
            return f"host={info.host} port={info.port} dbname={info.dbname} schema={self._schema}"
        try:
            params = conninfo_to_dict(self._dsn)
        except psycopg.Error:
            return f"{redact_dsn(self._dsn)!r} schema={self._schema}"
        parts = [f"{k}={params[k]}" for k in ("host", "hostaddr", "port", "dbname", "user") if params.get(k)]
        parts.append(f"schema={self._schema}")
        return " ".join(parts)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._dsn is None:
            raise StoreUnavailableError(f"the connection to the history store ({self.describe()}) is closed")
        try:
            params: dict[str, Any] = conninfo_to_dict(self._dsn)
        except psycopg.Error as exc:
            raise UsageError(f"invalid history store DSN: {redact_dsn(str(exc))}") from None
        if "connect_timeout" not in params:
            params["connect_timeout"] = _DEFAULT_CONNECT_TIMEOUT
        params.setdefault("application_name", "cdc-reader")
        try:
            conn = psycopg.connect(autocommit=True, **params)
            conn.execute("SET default_transaction_read_only = on")
        except psycopg.Error as exc:
            reason = redact_dsn(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise StoreUnavailableError(
                f"cannot connect to the history store ({self.describe()}): {reason}",
                hint="check --store / CDC_STORE_DSN / store.dsn and that the server is up",
            ) from None
        self._conn = conn
        self._owns_conn = True
        return conn

    def close(self) -> None:
        if self._conn is not None and self._owns_conn and not self._conn.closed:
            self._conn.close()
        self._conn = None if self._owns_conn else self._conn

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self._schema, name)

    def _rows(
        self,
        query: sql.Composed | sql.SQL,
        params: Mapping[str, Any] | Sequence[Any] = (),
        *,
        presorted: bool = False,
    ) -> list[DictRow]:
        """Run a query, rows as dicts. ``presorted``: plan it with sorts disabled, for a page
        read in index order (see ``table_at``), then restore the caller's setting."""
        conn = self._connection()
        try:
            with conn.cursor(row_factory=dict_row) as cur:
                if not presorted:
                    cur.execute(query, params)
                    return cur.fetchall()
                with conn.transaction():  # a savepoint when the caller is in a transaction
                    cur.execute(
                        "SELECT current_setting('enable_sort') AS was, set_config('enable_sort', 'off', true)"
                    )
                    found = cur.fetchone()
                    cur.execute(query, params)
                    rows = cur.fetchall()
                    cur.execute(
                        "SELECT set_config('enable_sort', %s, true)", (found["was"] if found else "on",)
                    )
                    return rows
        except psycopg.Error as exc:
            if not conn.autocommit and not conn.closed and not conn.broken:
                conn.rollback()  # a caller's connection: leave it usable
            raise self._store_error(conn, exc) from None

    def _store_error(self, conn: psycopg.Connection[Any], exc: psycopg.Error) -> StoreUnavailableError:
        if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
            return StoreUnavailableError(
                f"the history store ({self.describe()}) has no history tables in schema {self._schema}",
                hint="run `cdc setup`, or pass the right --schema",
            )
        if conn.closed or conn.broken:
            self._conn = None
            return StoreUnavailableError(
                f"lost the connection to the history store ({self.describe()}): {redact_dsn(error_text(exc))}"
            )
        return StoreUnavailableError(
            f"query on the history store ({self.describe()}) failed: {redact_dsn(error_text(exc))}"
        )

    def _mutations(self, query: sql.Composed | sql.SQL, params: Mapping[str, Any]) -> list[Mutation]:
        return [self._mutation(r) for r in self._rows(query, params)]

    # ------------------------------------------------------------------ versions

    def current_version(self) -> int | None:
        """The newest version fully stored (``max(acked_lsn)``), None when nothing is."""
        rows = self._rows(sql.SQL("SELECT max(acked_lsn) AS v FROM {}").format(self._t("capture_state")))
        value = rows[0]["v"] if rows else None
        return int(value) if value else None

    def earliest_version(self) -> int | None:
        """The history floor: the earliest version at which time travel is exact.

        ``history_floor``, else ``baseline_lsn``, else 0; None when capture never started.
        """
        rows = self._rows(
            sql.SQL("SELECT max(coalesce(history_floor, baseline_lsn, 0)) AS v FROM {}").format(
                self._t("capture_state")
            )
        )
        value = rows[0]["v"] if rows else None
        return None if value is None else int(value)

    def version_at_timestamp(self, ts: datetime) -> int | None:
        """The newest version committed at or before ``ts``; None if none, or if it is below the floor.

        Commit timestamps follow WAL order up to a few milliseconds; among the committed
        transactions of the last minute before the latest one at or before ``ts`` the largest
        version wins (two index range scans, never a scan of the whole history).
        """
        if ts.tzinfo is None:
            ts = ts.astimezone()
        transactions = self._t("transactions")
        rows = self._rows(
            sql.SQL(
                "SELECT max(t.version) AS v FROM {tx} t, "
                "(SELECT committed_at FROM {tx} WHERE status = 'committed' AND committed_at <= %(ts)s "
                " ORDER BY committed_at DESC LIMIT 1) last "
                "WHERE t.status = 'committed' AND t.committed_at <= %(ts)s "
                "AND t.committed_at >= last.committed_at - %(skew)s"
            ).format(tx=transactions),
            {"ts": ts, "skew": _TIME_SKEW},
        )
        version = rows[0]["v"] if rows else None
        if version is None:
            return None
        version = int(version)
        current = self.current_version()
        if current is not None and version > current:
            version = current
        floor = self.earliest_version() or 0
        if version < floor:
            return None
        return version

    def versions(self) -> VersionRange:
        """The readable range of versions and when they were committed."""
        current, earliest = self.current_version(), self.earliest_version()
        return VersionRange(
            earliest=earliest,
            current=current,
            earliest_at=self.version_time(earliest) if earliest else None,
            current_at=self.version_time(current) if current is not None else None,
        )

    def version_time(self, version: int) -> datetime | None:
        """When the newest transaction at or before ``version`` committed."""
        rows = self._rows(
            sql.SQL(
                "SELECT committed_at FROM {} WHERE position <= %(v)s AND status = 'committed' "
                "ORDER BY position DESC LIMIT 1"
            ).format(self._t("transactions")),
            {"v": version},
        )
        return rows[0]["committed_at"] if rows else None

    def check_version(self, version: int) -> bool:
        """True if ``version`` can be read exactly; False below the history floor.

        Raises :class:`UsageError` for a version the store has not caught up with yet.
        """
        if version < 0:
            raise UsageError(f"invalid version {version}: must not be negative")
        floor = self.earliest_version()
        current = self.current_version()
        if floor is None or current is None:
            return False  # nothing captured yet: nothing to read
        if version > current:
            raise UsageError(
                f"version {format_lsn(version)} is ahead of the history store "
                f"(stored up to {format_lsn(current)})",
                hint="capture has not caught up yet: wait and retry; `cdc status` shows the lag",
            )
        return version >= floor

    # ------------------------------------------------------------------ tables

    def known_tables(self) -> list[str]:
        rows = self._rows(
            sql.SQL("SELECT DISTINCT table_name FROM {} ORDER BY table_name").format(self._t("table_schemas"))
        )
        return [r["table_name"] for r in rows]

    def table(self, name: str) -> TableInfo:
        """The table's latest schema; :class:`NotFoundError` when the store has no history of it."""
        full = table_name(name)
        cached = self._tables.get(full)
        if cached is not None and time.monotonic() - cached[0] < _TABLE_CACHE_SECONDS:
            return cached[1]
        rows = self._rows(
            sql.SQL(
                "SELECT key_columns, columns FROM {} WHERE table_name = %(t)s "
                "ORDER BY first_position DESC, schema_id DESC LIMIT 1"
            ).format(self._t("table_schemas")),
            {"t": full},
        )
        if rows:
            columns = [c for c in rows[0]["columns"] or [] if isinstance(c, dict) and "name" in c]
            info = TableInfo(
                name=full,
                key_columns=tuple(rows[0]["key_columns"] or ()),
                columns=tuple(str(c["name"]) for c in columns),
                type_oids={str(c["name"]): int(c.get("type_oid") or 25) for c in columns},
            )
        else:
            info = self._table_from_mutations(full)
        self._tables[full] = (time.monotonic(), info)
        return info

    def recorded_policies(self, name: str) -> dict[str, str]:
        """Column -> redaction policy (hash, mask, exclude) as capture recorded them in any stored
        schema version of the table (the latest wins): which stored values are placeholders."""
        rows = self._rows(
            sql.SQL(
                "SELECT c->>'name' AS name, c->>'policy' AS policy "
                "FROM {} AS s, jsonb_array_elements(s.columns) AS c "
                "WHERE s.table_name = %(t)s AND c ? 'policy' ORDER BY s.first_position, s.schema_id"
            ).format(self._t("table_schemas")),
            {"t": table_name(name)},
        )
        return {str(r["name"]): str(r["policy"]) for r in rows if r["name"] and r["policy"]}

    def _table_from_mutations(self, full: str) -> TableInfo:
        """No schema row (an old or partial store): infer the key columns from the newest key."""
        rows = self._rows(
            sql.SQL(
                "SELECT key, coalesce(after, before) AS image FROM {} WHERE table_name = %(t)s "
                "ORDER BY position DESC LIMIT 20"
            ).format(self._t(_MUTATIONS)),
            {"t": full},
        )
        if not rows:
            raise self._unknown_table(full)
        key = next((r["key"] for r in rows if r["key"]), None) or {}
        image = next((r["image"] for r in rows if r["image"]), None) or {}
        key_columns = tuple(key) if key != image else ()
        oids = {
            c: (20 if isinstance(v, int) and not isinstance(v, bool) else 16 if isinstance(v, bool) else 25)
            for c, v in {**image, **key}.items()
        }
        return TableInfo(name=full, key_columns=key_columns, columns=tuple(image), type_oids=oids)

    def _unknown_table(self, full: str) -> NotFoundError:
        known = self.known_tables()
        short = {t.removeprefix("public."): t for t in known}
        close = difflib.get_close_matches(full, known, n=3, cutoff=0.6)
        close += [short[c] for c in difflib.get_close_matches(full.removeprefix("public."), list(short), n=3)]
        close = list(dict.fromkeys(close))
        listed = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        message = f"no history for table {full}; known tables: {listed or '(none)'}"
        return NotFoundError(message, hint=f"did you mean {' or '.join(close)}?" if close else None)

    def stored_key(self, table: str | TableInfo, key: Key) -> Row:
        """Turn a user's key (scalar, dict, or CLI text) into the stored jsonb form of ``table``."""
        info = table if isinstance(table, TableInfo) else self.table(table)
        if isinstance(key, Mapping):
            names = [str(k) for k in key]
            if info.key_columns and set(names) != set(info.key_columns):
                raise UsageError(
                    f"key {_short(json.dumps(dict(key), default=str))} does not name a row of {info.name}: "
                    f"its key columns are ({', '.join(info.key_columns)})"
                )
            order = info.key_columns or tuple(c for c in info.columns if c in key) + tuple(
                c for c in names if c not in info.columns
            )
            return {c: self._key_value(info, c, key[c]) for c in order}
        if info.keyless:
            raise UsageError(
                f"{info.name} has no key: name a row by all its columns as a JSON object / dict "
                f"({', '.join(info.columns)})"
            )
        if len(info.key_columns) > 1:
            raise UsageError(
                f"{info.name} has a composite key ({', '.join(info.key_columns)}): "
                """give a dict / a JSON object such as '{"a": 1, "b": "x"}'"""
            )
        column = info.key_columns[0]
        return {column: self._key_value(info, column, key)}

    @staticmethod
    def _key_value(info: TableInfo, column: str, value: Any) -> Any:
        oid = info.type_oids.get(column, 25)
        if isinstance(value, dict | list):
            return value
        try:
            return key_value_from_user(oid, value)
        except ValueError as exc:
            raise UsageError(f"invalid key value for {info.name}.{column}: {exc}") from None

    def _ordered(self, image: Any, schema_id: int | None, table: str) -> Row | None:
        """A stored row image with its columns in table order (jsonb sorts them by length)."""
        if image is None:
            return None
        if not isinstance(image, dict):
            return {"value": image}
        order = self._columns_of_schema(schema_id) if schema_id is not None else None
        if order is None:
            cached = self._tables.get(table)
            order = cached[1].columns if cached is not None else ()
        out = {c: image[c] for c in order if c in image}
        out.update((c, v) for c, v in image.items() if c not in out)
        return out

    def _columns_of_schema(self, schema_id: int) -> tuple[str, ...] | None:
        if schema_id not in self._schema_columns:
            rows = self._rows(
                sql.SQL("SELECT columns FROM {} WHERE schema_id = %(s)s").format(self._t("table_schemas")),
                {"s": schema_id},
            )
            columns = rows[0]["columns"] if rows else []
            self._schema_columns[schema_id] = tuple(
                str(c["name"]) for c in columns or [] if isinstance(c, dict) and "name" in c
            )
        return self._schema_columns[schema_id] or None

    def _mutation(self, r: Mapping[str, Any]) -> Mutation:
        table, schema_id = r["table_name"], r["schema_id"]
        return Mutation(
            position=int(r["position"]),
            ordinal=int(r["ordinal"]),
            version=None if r["version"] is None else int(r["version"]),
            lsn=int(r["lsn"]),
            xid=int(r["xid"]),
            committed_at=r["committed_at"],
            table=table,
            op=r["op"],
            key=self._ordered(r["key"], schema_id, table),
            old_key=self._ordered(r["old_key"], schema_id, table),
            before=self._ordered(r["before"], schema_id, table),
            after=self._ordered(r["after"], schema_id, table),
            changed=tuple(r["changed"] or ()),
            status=r["status"],
            request_id=r["request_id"],
            context=r["context"],
            schema_id=schema_id,
        )

    # ------------------------------------------------------------------ single rows

    def has_history(self, table: str, key: Key) -> bool:
        """Whether any mutation (committed or not) ever named this row."""
        info = self.table(table)
        stored = self.stored_key(info, key)
        m = self._t(_MUTATIONS)
        rows = self._rows(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {m} WHERE table_name = %(t)s AND key = %(k)s) "
                "OR EXISTS (SELECT 1 FROM {m} WHERE table_name = %(t)s AND old_key = %(k)s) AS found"
            ).format(m=m),
            {"t": info.name, "k": Jsonb(stored)},
        )
        return bool(rows[0]["found"])

    def row_at(self, table: str, key: Key, version: int) -> Row | None:
        """The row at ``version`` (a dict in column order), None if absent then.

        The version is not checked against the floor or the current version here: see
        :meth:`check_version` (``History.at`` does both).
        """
        info = self.table(table)
        return self._row_before(info, self.stored_key(info, key), version, _MAX_ORDINAL)

    def _row_before(self, info: TableInfo, stored: Row, position: int, ordinal: int) -> Row | None:
        """The row as every committed mutation before ``(position, ordinal)`` left it."""
        params = {"t": info.name, "k": Jsonb(stored), "p": position, "o": ordinal}
        m = self._t(_MUTATIONS)
        bound = sql.SQL("position <= %(p)s AND (position < %(p)s OR ordinal < %(o)s)")
        if info.keyless:
            rows = self._rows(
                sql.SQL(
                    "WITH tr AS (SELECT position, ordinal FROM {m} "
                    "  WHERE table_name = %(t)s AND op = 'TRUNCATE' AND version IS NOT NULL AND {bound} "
                    "  ORDER BY position DESC, ordinal DESC LIMIT 1) "
                    "SELECT coalesce(sum(d), 0) AS n FROM ("
                    "  SELECT CASE WHEN op = 'DELETE' THEN -1 WHEN op = 'UPDATE' AND old_key IS NULL THEN 0 "
                    "    ELSE 1 END AS d, position, ordinal FROM {m} "
                    "  WHERE table_name = %(t)s AND key = %(k)s AND version IS NOT NULL AND {bound} "
                    "  UNION ALL "
                    "  SELECT -1, position, ordinal FROM {m} "
                    "  WHERE table_name = %(t)s AND old_key = %(k)s AND version IS NOT NULL AND {bound}"
                    ") x WHERE NOT EXISTS (SELECT 1 FROM tr WHERE x.position < tr.position "
                    "  OR (x.position = tr.position AND x.ordinal < tr.ordinal))"
                ).format(m=m, bound=bound),
                params,
            )
            return self._ordered(stored, None, info.name) if rows and rows[0]["n"] > 0 else None
        rows = self._rows(
            sql.SQL(
                "SELECT l.op, l.at_key, l.after, l.schema_id, EXISTS ("
                "  SELECT 1 FROM {m} tr WHERE tr.table_name = %(t)s AND tr.op = 'TRUNCATE' "
                "  AND tr.version IS NOT NULL AND tr.position <= %(p)s "
                "  AND (tr.position < %(p)s OR tr.ordinal < %(o)s) AND tr.position >= l.position "
                "  AND (tr.position > l.position OR tr.ordinal > l.ordinal)) AS truncated "
                "FROM ("
                "  (SELECT op, true AS at_key, after, schema_id, position, ordinal FROM {m} "
                "   WHERE table_name = %(t)s AND key = %(k)s AND version IS NOT NULL AND {bound} "
                "   ORDER BY position DESC, ordinal DESC LIMIT 1) "
                "  UNION ALL "
                "  (SELECT op, false, NULL, schema_id, position, ordinal FROM {m} "
                "   WHERE table_name = %(t)s AND old_key = %(k)s AND version IS NOT NULL AND {bound} "
                "   ORDER BY position DESC, ordinal DESC LIMIT 1)"
                ") l ORDER BY l.position DESC, l.ordinal DESC LIMIT 1"
            ).format(m=m, bound=bound),
            params,
        )
        if not rows:
            return None
        r = rows[0]
        if not r["at_key"] or r["op"] not in _ROW_OPS or r["truncated"]:
            return None
        return self._ordered(r["after"], r["schema_id"], info.name)

    def row_history(
        self,
        table: str,
        key: Key,
        since: datetime | None = None,
        until: datetime | None = None,
        include_rolled_back: bool = True,
    ) -> list[Mutation]:
        """Every mutation of the row, oldest first: ``since <= committed_at < until``.

        Includes the UPDATE that moved the row away to another key (``old_key``), rolled-back
        attempts (unless ``include_rolled_back`` is false) and each TRUNCATE of the table that
        removed the row. :class:`NotFoundError` if the row never had any mutation.
        """
        info = self.table(table)
        stored = self.stored_key(info, key)
        m = self._t(_MUTATIONS)
        filters: sql.Composable = sql.SQL("")
        params: dict[str, Any] = {"t": info.name, "k": Jsonb(stored), "since": since, "until": until}
        if since is not None:
            filters += sql.SQL(" AND committed_at >= %(since)s")
        if until is not None:
            filters += sql.SQL(" AND committed_at < %(until)s")
        if not include_rolled_back:
            filters += sql.SQL(" AND status = 'committed'")
        found = self._mutations(
            sql.SQL(
                "SELECT {cols} FROM ("
                "  (SELECT {cols} FROM {m} WHERE table_name = %(t)s AND key = %(k)s{f}) "
                "  UNION ALL "
                "  (SELECT {cols} FROM {m} WHERE table_name = %(t)s AND old_key = %(k)s{f})"
                ") x ORDER BY position, ordinal"
            ).format(cols=_MUTATION_COLUMNS, m=m, f=filters),
            params,
        )
        if not found:
            if since is None and until is None and include_rolled_back:
                raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
            if not self.has_history(info.name, stored):
                raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
            return []
        truncates = self._mutations(
            sql.SQL(
                "SELECT {cols} FROM {m} WHERE table_name = %(t)s AND op = 'TRUNCATE' "
                "AND position >= %(first)s{f} ORDER BY position, ordinal"
            ).format(cols=_MUTATION_COLUMNS, m=m, f=filters),
            {**params, "first": found[0].position},
        )
        for truncate in truncates:
            if self._row_before(info, stored, truncate.position, truncate.ordinal) is not None:
                found.append(truncate)
        found.sort(key=lambda x: x.cursor)
        return found

    def blame(self, table: str, key: Key) -> list[BlameEntry]:
        """For each column of the row's current value: the last committed write to it.

        Key columns are left out unless the table has no key. A rolled-back attempt on a column
        after that write is reported as ``rolled_back_request_id``/``rolled_back_at``. A row moved
        here from another key (key-changing UPDATE) is followed to its old key.
        :class:`NotFoundError` if the row does not exist now.
        """
        info = self.table(table)
        stored = self.stored_key(info, key)
        current = self.current_version()
        row = self._row_before(info, stored, current, _MAX_ORDINAL) if current is not None else None
        if row is None or current is None:
            if not self.has_history(info.name, stored):
                raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
            raise NotFoundError(
                f"{info.name} {format_key(stored)} does not exist now (deleted or moved)",
                hint=f"see its history: cdc state history {info.name} --id ...",
            )
        columns = [c for c in row if info.keyless or c not in stored]
        written: dict[str, Mutation] = {}
        attempts: dict[str, Mutation] = {}
        unresolved = set(columns)
        bound_position, bound_ordinal = current, _MAX_ORDINAL
        key_now = stored
        for _ in range(_MAX_KEY_HOPS):  # a row moved between keys is followed to its old key
            moved_from: Mutation | None = None
            for mutation in self._walk_back(info, key_now, bound_position, bound_ordinal):
                if mutation.is_keyframe:
                    unresolved.clear()  # older writes were pruned: "written before the history floor"
                    break
                if mutation.op == "DELETE" and not mutation.rolled_back:
                    unresolved.clear()  # the row was born after this (cannot happen for a live row)
                    break
                touched = (
                    set(unresolved)
                    if mutation.op in ("INSERT", "SNAPSHOT", "DELETE")
                    else unresolved.intersection(mutation.changed)
                )
                if mutation.rolled_back:
                    for column in touched:
                        attempts.setdefault(column, mutation)
                    continue
                for column in touched:
                    written[column] = mutation
                unresolved -= touched
                if mutation.op in ("INSERT", "SNAPSHOT"):
                    unresolved.clear()
                if mutation.op == "UPDATE" and mutation.old_key is not None:
                    moved_from = mutation
                    break
                if not unresolved:
                    break
            if moved_from is None or not unresolved or moved_from.old_key is None:
                break
            key_now = dict(moved_from.old_key)
            bound_position, bound_ordinal = moved_from.position, moved_from.ordinal
        entries = []
        for column in columns:
            w = written.get(column)
            attempt = attempts.get(column)
            entries.append(
                BlameEntry(
                    column=column,
                    value=row[column],
                    request_id=w.request_id if w else None,
                    committed_at=w.committed_at if w else None,
                    version=w.version if w else None,
                    op=w.op if w else None,
                    rolled_back=attempt is not None,
                    rolled_back_request_id=attempt.request_id if attempt else None,
                    rolled_back_at=attempt.committed_at if attempt else None,
                )
            )
        return entries

    def _walk_back(self, info: TableInfo, key: Row, position: int, ordinal: int) -> Iterator[Mutation]:
        """The mutations with ``key`` before ``(position, ordinal)``, newest first, in batches."""
        query = sql.SQL(
            "SELECT {cols} FROM {m} WHERE table_name = %(t)s AND key = %(k)s "
            "AND position <= %(p)s AND (position < %(p)s OR ordinal < %(o)s) "
            "ORDER BY position DESC, ordinal DESC LIMIT %(limit)s"
        ).format(cols=_MUTATION_COLUMNS, m=self._t(_MUTATIONS))
        while True:
            batch = self._mutations(
                query, {"t": info.name, "k": Jsonb(key), "p": position, "o": ordinal, "limit": _BATCH}
            )
            yield from batch
            if len(batch) < _BATCH:
                return
            position, ordinal = batch[-1].cursor

    # ------------------------------------------------------------------ whole tables

    def table_at(
        self, table: str, version: int, after_key: Key | None = None, limit: int = 1000
    ) -> TablePage:
        """One page of the rows of ``table`` at ``version``, in key order (see the module doc).

        ``after_key``: the ``next_after`` of the previous page (or any key: the page starts after
        it). A keyless table's page never splits identical rows, so it may hold fewer than
        ``limit`` rows (or more, when one row value alone is repeated more than ``limit`` times).
        """
        if limit <= 0:
            raise UsageError(f"invalid limit {limit}: must be positive")
        info = self.table(table)
        after = self.stored_key(info, after_key) if after_key is not None else None
        m = self._t(_MUTATIONS)
        trunc = self._rows(
            sql.SQL(
                "SELECT position, ordinal FROM {m} WHERE table_name = %(t)s AND op = 'TRUNCATE' "
                "AND version IS NOT NULL AND position <= %(v)s ORDER BY position DESC, ordinal DESC LIMIT 1"
            ).format(m=m),
            {"t": info.name, "v": version},
        )
        params: dict[str, Any] = {
            "t": info.name,
            "v": version,
            "tp": trunc[0]["position"] if trunc else -1,
            "to": trunc[0]["ordinal"] if trunc else -1,
            "limit": limit,
        }
        live = sql.SQL(
            "table_name = %(t)s AND key IS NOT NULL AND version IS NOT NULL AND position <= %(v)s "
            "AND (position > %(tp)s OR (position = %(tp)s AND ordinal > %(to)s))"
        )
        if info.keyless:
            return self._keyless_page(info, live, params, after, limit)
        if len(info.key_columns) == 1:
            order: sql.Composable = sql.SQL("key")
            after_filter: sql.Composable = (
                sql.SQL(" AND key > %(after)s") if after is not None else sql.SQL("")
            )
            if after is not None:
                params["after"] = Jsonb(after)
        else:
            parts = [sql.SQL("key -> {}").format(sql.Literal(c)) for c in info.key_columns]
            order = sql.SQL(", ").join(parts)
            after_filter = sql.SQL("")
            if after is not None:
                values = sql.SQL(", ").join(
                    sql.SQL("{}::jsonb").format(sql.Literal(json.dumps(after.get(c))))
                    for c in info.key_columns
                )
                after_filter = sql.SQL(" AND ({}) > ({})").format(order, values)
        rows = self._rows(
            sql.SQL(
                "SELECT l.key, l.after, l.schema_id FROM ("
                "  SELECT DISTINCT ON (key) key, op, after, schema_id, position, ordinal FROM {m} "
                "  WHERE {live}{after_filter} ORDER BY key, position DESC, ordinal DESC"
                ") l WHERE l.op <> 'DELETE' AND NOT EXISTS ("
                "  SELECT 1 FROM {m} o WHERE o.table_name = %(t)s AND o.old_key = l.key "
                "  AND o.version IS NOT NULL AND o.position <= %(v)s "
                "  AND (o.position > l.position OR (o.position = l.position AND o.ordinal > l.ordinal))"
                ") ORDER BY {order} LIMIT %(limit)s"
            ).format(m=m, live=live, after_filter=after_filter, order=order),
            params,
            # The planner cannot estimate how many distinct keys the view yields (no statistics
            # on a partitioned parent or a UNION ALL), guesses 200, and sorts the whole table's
            # history to fill a page: 20 s on a 10-million-mutation store. In the index's order
            # (a merge of each partition's (table, key, position) index) a page reads only its
            # own rows' versions. Only with one key column: a composite key's page is ordered by
            # its columns' values, which needs a sort (with sorts disabled PostgreSQL 15 would
            # pick a far worse plan to avoid it).
            presorted=len(info.key_columns) == 1,
        )
        out = [self._ordered(r["after"], r["schema_id"], info.name) or {} for r in rows]
        next_after = dict(rows[-1]["key"]) if len(rows) == limit else None
        return TablePage(rows=out, next_after=next_after)

    def _keyless_page(
        self, info: TableInfo, live: sql.Composable, params: dict[str, Any], after: Row | None, limit: int
    ) -> TablePage:
        m = self._t(_MUTATIONS)
        after_filter = sql.SQL("")
        if after is not None:
            after_filter = sql.SQL(" AND key > %(after)s")
            params["after"] = Jsonb(after)
        rows = self._rows(
            sql.SQL(
                "SELECT s.key, s.n FROM ("
                "  SELECT g.key, sum(g.d) - (SELECT count(*) FROM {m} o WHERE o.table_name = %(t)s "
                "    AND o.old_key = g.key AND o.version IS NOT NULL AND o.position <= %(v)s "
                "    AND (o.position > %(tp)s OR (o.position = %(tp)s AND o.ordinal > %(to)s))) AS n "
                "  FROM (SELECT key, CASE WHEN op = 'DELETE' THEN -1 "
                "          WHEN op = 'UPDATE' AND old_key IS NULL THEN 0 ELSE 1 END AS d "
                "        FROM {m} WHERE {live}{after_filter}) g "
                "  GROUP BY g.key"
                ") s WHERE s.n > 0 ORDER BY s.key LIMIT %(limit)s"
            ).format(m=m, live=live, after_filter=after_filter),
            params,
        )
        out: list[Row] = []
        last: Row | None = None
        for r in rows:
            n = int(r["n"])
            if out and len(out) + n > limit:
                break
            row = self._ordered(r["key"], None, info.name) or {}
            out.extend(dict(row) for _ in range(n))
            last = dict(r["key"])
        exhausted = len(rows) < limit and (not rows or last == dict(rows[-1]["key"]))
        return TablePage(rows=out, next_after=None if exhausted else last)

    def iter_table_at(self, table: str, version: int, page_size: int = 1000) -> Iterator[list[Row]]:
        """Every page of ``table`` at ``version`` (see :meth:`table_at`)."""
        after: Row | None = None
        while True:
            page = self.table_at(table, version, after_key=after, limit=page_size)
            if page.rows:
                yield page.rows
            if page.next_after is None:
                return
            after = page.next_after

    # ------------------------------------------------------------------ the log

    def mutation_log(
        self,
        *,
        table: str | None = None,
        key: Key | None = None,
        request_id: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | None = None,
        op: str | None = None,
        before: tuple[int, int] | None = None,
        limit: int = 100,
    ) -> MutationPage:
        """The mutation log, newest first, filtered; ``before``: the previous page's ``next_cursor``.

        ``request_id`` must be a full id (see :meth:`resolve_request`); ``actor`` matches the
        ``actor`` of the mutation's context.
        """
        if limit <= 0:
            raise UsageError(f"invalid limit {limit}: must be positive")
        where: list[sql.Composable] = []
        params: dict[str, Any] = {"limit": limit}
        if table is not None:
            info = self.table(table)
            where.append(sql.SQL("table_name = %(t)s"))
            params["t"] = info.name
            if key is not None:
                where.append(sql.SQL("(key = %(k)s OR old_key = %(k)s)"))
                params["k"] = Jsonb(self.stored_key(info, key))
        elif key is not None:
            raise UsageError("a key filter needs a table")
        if request_id is not None:
            where.append(sql.SQL("request_id = %(r)s"))
            params["r"] = request_id
        if actor is not None:
            where.append(sql.SQL("context ->> 'actor' = %(a)s"))
            params["a"] = actor
        if since is not None:
            where.append(sql.SQL("committed_at >= %(since)s"))
            params["since"] = since
        if until is not None:
            where.append(sql.SQL("committed_at < %(until)s"))
            params["until"] = until
        if status is not None:
            if status not in STATUSES:
                raise UsageError(f"invalid status {status!r}: expected one of {', '.join(STATUSES)}")
            where.append(sql.SQL("status = %(s)s"))
            params["s"] = status
        if op is not None:
            if op.upper() not in OPS:
                raise UsageError(f"invalid op {op!r}: expected one of {', '.join(OPS)}")
            where.append(sql.SQL("op = %(op)s"))
            params["op"] = op.upper()
        if before is not None:
            where.append(sql.SQL("position <= %(cp)s AND (position < %(cp)s OR ordinal < %(co)s)"))
            params["cp"], params["co"] = before
        condition = sql.SQL(" AND ").join(where) if where else sql.SQL("true")
        found = self._mutations(
            sql.SQL(
                "SELECT {cols} FROM {m} WHERE {cond} ORDER BY position DESC, ordinal DESC LIMIT %(limit)s"
            ).format(cols=_MUTATION_COLUMNS, m=self._t(_MUTATIONS), cond=condition),
            params,
        )
        return MutationPage(mutations=found, next_cursor=found[-1].cursor if len(found) == limit else None)

    # ------------------------------------------------------------------ requests

    def resolve_request(self, request_id: str) -> str:
        """The full request id for ``request_id`` or a unique prefix of one.

        :class:`NotFoundError` when nothing matches, :class:`UsageError` (listing the candidates)
        when a prefix is ambiguous.
        """
        wanted = request_id.strip()
        if not wanted:
            raise UsageError("invalid request id: empty")
        rows = self._rows(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {r} WHERE request_id = %(id)s) "
                "OR EXISTS (SELECT 1 FROM {m} WHERE request_id = %(id)s) AS found"
            ).format(r=self._t("requests"), m=self._t(_MUTATIONS)),
            {"id": wanted},
        )
        if rows[0]["found"]:
            return wanted
        params = {"like": _like_prefix(wanted)}
        candidates = [
            r["request_id"]
            for r in self._rows(
                sql.SQL(
                    "SELECT request_id FROM {} WHERE request_id LIKE %(like)s ORDER BY 1 LIMIT 11"
                ).format(self._t("requests")),
                params,
            )
        ]
        if not candidates:
            candidates = [
                r["request_id"]
                for r in self._rows(
                    sql.SQL(
                        "SELECT DISTINCT request_id FROM {} WHERE request_id LIKE %(like)s "
                        "ORDER BY 1 LIMIT 11"
                    ).format(self._t(_MUTATIONS)),
                    params,
                )
            ]
        if not candidates:
            raise NotFoundError(
                f"no request {wanted!r} in the history (no id equal to it or starting with it)"
            )
        if len(candidates) > 1:
            listed = ", ".join(candidates[:10]) + (", ..." if len(candidates) > 10 else "")
            raise UsageError(f"request id prefix {wanted!r} is ambiguous: it matches {listed}")
        return str(candidates[0])

    def request_mutations(
        self, request_id: str, *, limit: int | None = None, after: tuple[int, int] | None = None
    ) -> list[Mutation]:
        """The mutations of a request (id or unique prefix), oldest first."""
        return self._request_mutations(self.resolve_request(request_id), limit=limit, after=after)

    def _request_mutations(
        self, full: str, *, limit: int | None = None, after: tuple[int, int] | None = None
    ) -> list[Mutation]:
        params: dict[str, Any] = {"r": full, "limit": limit}
        after_filter = sql.SQL("")
        if after is not None:
            after_filter = sql.SQL(" AND position >= %(cp)s AND (position > %(cp)s OR ordinal > %(co)s)")
            params["cp"], params["co"] = after
        return self._mutations(
            sql.SQL(
                "SELECT {cols} FROM {m} WHERE request_id = %(r)s{f} "
                "ORDER BY position, ordinal LIMIT %(limit)s"
            ).format(cols=_MUTATION_COLUMNS, m=self._t(_MUTATIONS), f=after_filter),
            params,
        )

    def request(self, request_id: str, *, mutation_limit: int | None = 1000) -> RequestRecord:
        """The request's record: context, error, transactions and (up to ``mutation_limit``) mutations."""
        full = self.resolve_request(request_id)
        records = self._rows(
            sql.SQL("SELECT * FROM {} WHERE request_id = %(r)s").format(self._t("requests")), {"r": full}
        )
        mutations = self._request_mutations(full, limit=mutation_limit)
        count_rows = self._rows(
            sql.SQL(
                "SELECT count(*) AS n, array_agg(DISTINCT position) AS positions, "
                "jsonb_agg(DISTINCT jsonb_build_array(context->'db_user', context->'backend_pid')) "
                "FILTER (WHERE context ? 'db_user') AS sessions "
                "FROM {} WHERE request_id = %(r)s"
            ).format(self._t(_MUTATIONS)),
            {"r": full},
        )
        count = int(count_rows[0]["n"])
        positions = list(count_rows[0]["positions"] or [])
        sessions = _sessions(count_rows[0]["sessions"])
        tx_rows = (
            self._rows(
                sql.SQL("SELECT * FROM {} WHERE position = ANY(%(p)s::bigint[]) ORDER BY position").format(
                    self._t("transactions")
                ),
                {"p": positions},
            )
            if positions
            else []
        )
        transactions = [
            TransactionInfo(
                position=int(t["position"]),
                xid=int(t["xid"]),
                version=None if t["version"] is None else int(t["version"]),
                commit_lsn=None if t["commit_lsn"] is None else int(t["commit_lsn"]),
                status=t["status"],
                committed_at=t["committed_at"],
                origin=t["origin"],
                mutation_count=int(t["mutation_count"]),
            )
            for t in tx_rows
        ]
        first_context = next((m.context for m in mutations if m.context), None)
        if records:
            rec = records[0]
            return RequestRecord(
                request_id=full,
                actor=rec["actor"] or (first_context or {}).get("actor"),
                context=rec["context"] or first_context,
                first_seen_at=rec["first_seen_at"],
                last_seen_at=rec["last_seen_at"],
                committed_count=int(rec["committed_count"]),
                rolled_back_count=int(rec["rolled_back_count"]),
                error_type=rec["error_type"],
                error_message=rec["error_message"],
                error_location=rec["error_location"],
                error_at=rec["error_at"],
                transactions=transactions,
                mutations=mutations,
                mutation_count=count,
                error_db_user=rec.get("error_db_user"),
                error_backend_pid=rec.get("error_backend_pid"),
                error_client_addr=rec.get("error_client_addr"),
                error_xid=rec.get("error_xid"),
                error_proven=bool(rec.get("error_proven")),
                sessions=tuple(dict.fromkeys(sessions + _sessions(rec.get("sessions")))),
            )
        # No record row (the capture side saw only the changes): derive what we can.
        committed = sum(1 for t in transactions if t.status == "committed")
        rolled_back = sum(1 for t in transactions if t.status == "rolled_back")
        if not transactions:
            committed = 1 if any(not m.rolled_back for m in mutations) else 0
            rolled_back = 1 if any(m.rolled_back for m in mutations) else 0
        times = [m.committed_at for m in mutations]
        return RequestRecord(
            request_id=full,
            actor=(first_context or {}).get("actor"),
            context=first_context,
            first_seen_at=min(times) if times else None,
            last_seen_at=max(times) if times else None,
            committed_count=committed,
            rolled_back_count=rolled_back,
            error_type=None,
            error_message=None,
            error_location=None,
            error_at=None,
            transactions=transactions,
            mutations=mutations,
            mutation_count=count,
            sessions=sessions,
        )


def _json_type_oid(value: Any) -> int:
    if isinstance(value, bool):
        return 16
    if isinstance(value, int):
        return 20
    return 25
