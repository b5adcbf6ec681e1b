"""The store's connection (lazy, reopened after it breaks) and its versions."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row

from cdc.config import redact_dsn
from cdc.errors import StoreUnavailableError, UsageError, error_text
from cdc.lsn import format_lsn
from cdc.query.model import VersionRange
from cdc.store.format import STATUS_CODES

__all__ = ["DEFAULT_SCHEMA", "StoreBase"]

DEFAULT_SCHEMA = "cdc_history"

_TIME_SKEW = timedelta(seconds=60)  # commit timestamps vs WAL order, see version_at_timestamp
_DEFAULT_CONNECT_TIMEOUT = "10"
COMMITTED = STATUS_CODES["committed"]

Query = sql.Composed | sql.SQL


class StoreBase:
    """Reads of the history store in schema ``schema``, over ``dsn`` or an open connection."""

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

    def _t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self._schema, name)

    def _rows(self, query: Query, params: Mapping[str, Any] | Sequence[Any] = ()) -> list[DictRow]:
        """Run a query, rows as dicts; every database error becomes a StoreUnavailableError."""
        with self._guard() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            return cur.fetchall()

    @contextmanager
    def _guard(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection; a database error inside becomes a StoreUnavailableError."""
        conn = self._connection()
        try:
            yield conn
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
        version wins (index range scans, never a scan of the whole history).
        """
        if ts.tzinfo is None:
            ts = ts.astimezone()
        rows = self._rows(
            sql.SQL(
                "SELECT max(t.position) AS v FROM {tx} t, "
                "(SELECT committed_at FROM {tx} WHERE status = %(c)s AND committed_at <= %(ts)s "
                " ORDER BY committed_at DESC LIMIT 1) last "
                "WHERE t.status = %(c)s AND t.committed_at <= %(ts)s "
                "AND t.committed_at >= last.committed_at - %(skew)s"
            ).format(tx=self._t("transactions_all")),
            {"ts": ts, "skew": _TIME_SKEW, "c": COMMITTED},
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
                "SELECT committed_at FROM {} WHERE position <= %(v)s AND status = %(c)s "
                "ORDER BY position DESC LIMIT 1"
            ).format(self._t("transactions_all")),
            {"v": version, "c": COMMITTED},
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
