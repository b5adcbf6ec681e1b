"""The Python API over the history store: time travel, row history, blame, requests.

::

    from cdc import History

    with History(store_dsn) as h:
        before = h.current_version()
        ...
        past = h.at(version=before)          # or h.at(timestamp=datetime / epoch-ms)
        past.table("orders").get(42)         # dict or None; also past.orders.get(42)
        past.orders.collect()                # every row at that version, in key order
        for page in past.orders.pages(1000): # the same, a page at a time
            ...
        h.row_history("users", 42, since=timedelta(hours=24))
        h.blame("users", 42)
        h.request("550e8400")                # full id or unique prefix

Rows are dicts in column order with the columns the row had at that version (a column
added later is simply absent). Values are as stored: integers and booleans as Python
ints and bools, every other type as the server's text output (``"12.50"``, ``"\\x0a0b"``
for bytea: decode with ``bytes.fromhex(value[2:])``).

A version below the history floor (pruned, or before capture began) reads as None:
``get()`` and ``collect()`` return None and ``pages()`` yields nothing; check
``view.exact`` or :meth:`History.earliest_version`. Views are read-only: every write
raises :class:`~cdc.errors.ReadOnlyHistoryView`.

A ``History`` holds one connection to the store and is not thread-safe: use one per thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from cdc.errors import ReadOnlyHistoryView, UsageError
from cdc.lsn import format_lsn, parse_lsn
from cdc.query import (
    DEFAULT_SCHEMA,
    BlameEntry,
    Key,
    Mutation,
    MutationPage,
    RequestRecord,
    Row,
    Store,
)

__all__ = ["History", "HistoryTable", "HistoryView", "TimeArg"]

#: A point in time: an aware datetime (naive ones are local time) or epoch milliseconds.
TimeArg = datetime | int | float


def to_datetime(value: TimeArg | timedelta, *, name: str = "timestamp") -> datetime:
    """A datetime from a datetime, epoch milliseconds, or a timedelta meaning "that long ago"."""
    if isinstance(value, bool):
        raise UsageError(f"invalid {name} {value!r}: expected a datetime or epoch milliseconds")
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.astimezone()
    if isinstance(value, timedelta):
        return datetime.now(UTC) - value
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            raise UsageError(f"invalid {name} {value!r}: epoch milliseconds out of range") from None
    raise UsageError(f"invalid {name} {value!r}: expected a datetime or epoch milliseconds")


def _read_only(what: str) -> NoReturn:
    raise ReadOnlyHistoryView(f"{what}: history views are read-only (write through your database instead)")


class _ReadOnly:
    """Refuses attribute writes and the write methods of a table handle."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        _read_only(f"cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        _read_only(f"cannot delete {name!r}")

    def __setitem__(self, key: Any, value: Any) -> None:
        _read_only("cannot assign an item")

    def __delitem__(self, key: Any) -> None:
        _read_only("cannot delete an item")

    def insert(self, *args: Any, **kwargs: Any) -> NoReturn:
        _read_only("cannot insert")

    def patch(self, *args: Any, **kwargs: Any) -> NoReturn:
        _read_only("cannot patch")

    def update(self, *args: Any, **kwargs: Any) -> NoReturn:
        _read_only("cannot update")

    def replace(self, *args: Any, **kwargs: Any) -> NoReturn:
        _read_only("cannot replace")

    def delete(self, *args: Any, **kwargs: Any) -> NoReturn:
        _read_only("cannot delete")

    def truncate(self, *args: Any, **kwargs: Any) -> NoReturn:
        _read_only("cannot truncate")


class HistoryTable(_ReadOnly):
    """One table as it was at a version (read-only)."""

    __slots__ = ("_exact", "_name", "_store", "_version")
    _store: Store
    _name: str
    _version: int | None
    _exact: bool

    def __init__(self, store: Store, name: str, version: int | None, exact: bool) -> None:
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_version", version)
        object.__setattr__(self, "_exact", exact)

    @property
    def name(self) -> str:
        """The table's ``schema.name``, quoted as PostgreSQL needs (NotFoundError: no history)."""
        return self._store.table(self._name, self._version).name

    @property
    def version(self) -> int | None:
        return self._version

    def get(self, key: Key) -> Row | None:
        """The row named ``key`` (scalar, or dict for a composite key) at this version, or None."""
        if not self._exact or self._version is None:
            self._store.table(self._name)  # an unknown table is still an error
            return None
        return self._store.row_at(self._name, key, self._version)

    def collect(self, limit: int | None = None, after: Key | None = None) -> list[Row] | None:
        """Every row at this version in key order (None below the history floor).

        ``limit``/``after``: at most ``limit`` rows, starting after the row keyed ``after``.
        This materializes the whole table when no ``limit`` is given: use :meth:`pages` for
        large tables.
        """
        if not self._exact or self._version is None:
            self._store.table(self._name)
            return None
        if limit is not None or after is not None:
            if limit is None:
                rows: list[Row] = []
                for page in self._pages_after(1000, after):
                    rows.extend(page)
                return rows
            return self._store.table_at(self._name, self._version, after_key=after, limit=limit).rows
        return [row for page in self._store.iter_table_at(self._name, self._version) for row in page]

    def pages(self, page_size: int = 1000) -> Iterator[list[Row]]:
        """The rows at this version in key order, ``page_size`` at a time (the table is read once,
        through a server-side cursor)."""
        if not self._exact or self._version is None:
            self._store.table(self._name)
            return iter(())
        return self._store.iter_table_at(self._name, self._version, page_size)

    def _pages_after(self, page_size: int, after: Key | None) -> Iterator[list[Row]]:
        assert self._version is not None
        while True:
            page = self._store.table_at(self._name, self._version, after_key=after, limit=page_size)
            if page.rows:
                yield page.rows
            if page.next_after is None:
                return
            after = page.next_after

    def __iter__(self) -> Iterator[Row]:
        for page in self.pages():
            yield from page

    def __repr__(self) -> str:
        version = format_lsn(self._version) if self._version is not None else "None"
        return f"<HistoryTable {self._name} at {version}>"


class HistoryView(_ReadOnly):
    """The captured database as it was at one version (read-only).

    ``view.table("orders")`` or ``view.orders``; names are read as PostgreSQL reads them:
    ``"s.t"``/``s.t`` a table of schema ``s``, ``'"User"'`` the table named ``User`` exactly.
    A name is the table's name at this version (a table renamed since is found by its old name).
    """

    __slots__ = ("_exact", "_store", "_version")
    _store: Store
    _version: int | None
    _exact: bool

    def __init__(self, store: Store, version: int | None, exact: bool) -> None:
        object.__setattr__(self, "_store", store)
        object.__setattr__(self, "_version", version)
        object.__setattr__(self, "_exact", exact)

    @property
    def version(self) -> int | None:
        """The version read (None when no version was at or before the requested time)."""
        return self._version

    @property
    def exact(self) -> bool:
        """False when the version is below the history floor: every read returns None."""
        return self._exact

    def table(self, name: str) -> HistoryTable:
        return HistoryTable(self._store, name, self._version, self._exact)

    def __getattr__(self, name: str) -> HistoryTable:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.table(name)

    def __getitem__(self, name: str) -> HistoryTable:
        return self.table(name)

    def __repr__(self) -> str:
        version = format_lsn(self._version) if self._version is not None else "None"
        return f"<HistoryView at {version}{'' if self._exact else ' (below the history floor)'}>"


class History:
    """Read the history store at ``dsn`` (schema ``schema``); also accepts an open ``Store``."""

    def __init__(self, dsn: str | Store, schema: str = DEFAULT_SCHEMA) -> None:
        self._store = dsn if isinstance(dsn, Store) else Store(dsn, schema=schema)

    @property
    def store(self) -> Store:
        """The query layer underneath (for the log and other reads)."""
        return self._store

    # ------------------------------------------------------------------ versions

    def current_version(self) -> int | None:
        """The newest version fully stored: a version to travel back to later. None if none yet."""
        return self._store.current_version()

    def earliest_version(self) -> int | None:
        """The history floor: the oldest version ``at()`` reads exactly."""
        return self._store.earliest_version()

    def version_at_timestamp(self, ts: TimeArg) -> int | None:
        """The newest version committed at or before ``ts`` (datetime or epoch-ms); None if none."""
        return self._store.version_at_timestamp(to_datetime(ts))

    def at(self, version: int | str | None = None, *, timestamp: TimeArg | None = None) -> HistoryView:
        """A read-only view at ``version`` (int LSN or ``X/Y``) or at ``timestamp``.

        Reads through a view of a version below the history floor return None.
        """
        if (version is None) == (timestamp is None):
            raise UsageError("at() needs exactly one of version= or timestamp=")
        if timestamp is not None:
            resolved = self.version_at_timestamp(timestamp)
            if resolved is None:
                return HistoryView(self._store, None, exact=False)
            return HistoryView(self._store, resolved, exact=self._store.check_version(resolved))
        assert version is not None
        if isinstance(version, bool) or not isinstance(version, int | str):
            raise UsageError(f"invalid version {version!r}: expected an int LSN or X/Y")
        number = parse_lsn(version)
        return HistoryView(self._store, number, exact=self._store.check_version(number))

    # ------------------------------------------------------------------ history

    def row_history(
        self,
        table: str,
        key: Key,
        since: TimeArg | timedelta | None = None,
        until: TimeArg | timedelta | None = None,
        *,
        include_rolled_back: bool = True,
    ) -> list[Mutation]:
        """Every mutation of the row, oldest first (``since <= committed_at < until``).

        ``since``/``until``: datetimes, epoch-ms, or timedeltas meaning "that long ago".
        """
        return self._store.row_history(
            table,
            key,
            since=to_datetime(since, name="since") if since is not None else None,
            until=to_datetime(until, name="until") if until is not None else None,
            include_rolled_back=include_rolled_back,
        )

    def blame(self, table: str, key: Key) -> list[BlameEntry]:
        """For each column of the row now: the request and time of its last committed write."""
        return self._store.blame(table, key)

    def request(self, request_id: str) -> RequestRecord:
        """The request's record (full id or unique prefix): outcome, error, context, changes."""
        return self._store.request(request_id)

    def mutations(
        self,
        *,
        table: str | None = None,
        key: Key | None = None,
        request_id: str | None = None,
        actor: str | None = None,
        since: TimeArg | timedelta | None = None,
        until: TimeArg | timedelta | None = None,
        status: str | None = None,
        op: str | None = None,
        before: tuple[int, int] | None = None,
        limit: int = 100,
    ) -> MutationPage:
        """One page of the mutation log, newest first; pass ``next_cursor`` as ``before``."""
        return self._store.mutation_log(
            table=table,
            key=key,
            request_id=self._store.resolve_request(request_id) if request_id is not None else None,
            actor=actor,
            since=to_datetime(since, name="since") if since is not None else None,
            until=to_datetime(until, name="until") if until is not None else None,
            status=status,
            op=op,
            before=before,
            limit=limit,
        )

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<History {self._store.describe()}>"
