"""Dry-run of a mutation: run a callback in a transaction on the SOURCE, report its row deltas, roll back.

::

    import cdc

    def close_all(conn):
        conn.execute("UPDATE todos SET completed = true WHERE id = ANY(%s)", (ids,))

    preview = cdc.simulate(conn, close_all)      # conn: psycopg.Connection to the source
    preview.deltas[0]   # Delta(version=0, table='public.todos', key=7, operation='update',
                        #       before={...}, after={...})
    preview.as_dict()   # {"committed": False, "deltas": [...], "result": ..., "error": None}

How: ``cdc setup`` installs (:func:`install_simulate`, ``sql/simulate.sql``) a row-level AFTER
trigger on every captured table whose ``WHEN`` condition is false unless the
transaction-local setting ``cdc.simulate`` is ``on``. :func:`simulate` switches it on inside
its own transaction; each changed row is then reported to the client as an ``INFO`` message
(``cdc.simulate``) carrying the old and new row in the server's text output, which this module
turns into cdc's value convention (ints and bools native, every other value as the server
prints it with the capture daemon's output settings). The transaction is always rolled back;
a commit guard makes it fail even if the callback runs a raw ``COMMIT``.

Deltas are the row changes in the order they happened (an INSERT then an UPDATE of the same
row are two deltas). ``version`` is always 0: a simulation never commits, so it has no version.
A TRUNCATE is reported as one delete per row. ``key`` is the row's primary key (or replica
identity index) as a scalar for one column and a dict for several; a table without a key is
named by the whole row; an update's key is the key after the update (its before image has the
old one).

Caveats (see docs/undo.md): side effects outside the database are not rolled back; sequences
advance (``nextval`` is not transactional); triggers with side effects run; the dry run leaves
no committed history (with in-progress streaming, PostgreSQL 16+, the capture daemon sees an
aborted transaction marked with a ``cdc.simulate`` logical message); a table created after
``cdc setup`` without the event trigger (non-superuser setup) is not instrumented until
``cdc setup`` runs again.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

import psycopg
from psycopg import sql
from psycopg.errors import Diagnostic
from psycopg.pq import TransactionStatus

from cdc.errors import SetupError, UsageError, reported_message
from cdc.source_context import tables_with_trigger
from cdc.values import converter_for

__all__ = [
    "EVENT_TRIGGER_NAME",
    "TRIGGER_NAME",
    "TRUNCATE_TRIGGER_NAME",
    "Delta",
    "SimulationResult",
    "asimulate",
    "install_simulate",
    "parse_record",
    "simulate",
    "simulate_installed",
    "simulate_sql",
    "simulate_tables",
    "uninstall_simulate",
]

T = TypeVar("T")

TRIGGER_NAME: Final = "cdc_simulate"
TRUNCATE_TRIGGER_NAME: Final = "cdc_simulate_truncate"
EVENT_TRIGGER_NAME: Final = "cdc_simulate_attach"
NOTICE_MESSAGE: Final = "cdc.simulate"
_LOCK_KEY: Final = "cdc.simulate.install"
_LOCK_TIMEOUT: Final = "30s"
_SYSTEM_SCHEMAS: Final = frozenset({"cdc", "pg_catalog", "information_schema", "pg_toast"})
_WHEN: Final = "pg_catalog.current_setting('cdc.simulate', true) OPERATOR(pg_catalog.=) 'on'"

NESTED_MESSAGE: Final = "nested transactions are not supported inside simulate"
OPEN_TRANSACTION_MESSAGE: Final = "simulate cannot run inside an open transaction"
ENDED_MESSAGE: Final = (
    "the callback ended the simulation's transaction (COMMIT or ROLLBACK); nothing it did was committed"
)

Operation = Literal["insert", "update", "delete"]
_OPS: Final[Mapping[str, Operation]] = {"INSERT": "insert", "UPDATE": "update", "DELETE": "delete"}


# ============================================================================ results


@dataclass(frozen=True)
class Delta:
    """One row change the callback made (and that was rolled back)."""

    version: int  # always 0: a simulation never commits, so its changes have no version
    table: str  # "schema.name"
    key: Any  # scalar for a one-column key, dict for a composite key or a keyless table
    operation: Operation
    before: dict[str, Any] | None  # None for an insert
    after: dict[str, Any] | None  # None for a delete

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "table": self.table,
            "key": self.key,
            "operation": self.operation,
            "before": self.before,
            "after": self.after,
        }


@dataclass(frozen=True)
class SimulationResult(Generic[T]):
    """What :func:`simulate` saw: the deltas, the callback's return value or its error."""

    committed: bool  # always False
    deltas: list[Delta] = field(default_factory=list)
    result: T | None = None
    error: str | None = None  # the callback's exception message; its deltas up to it are kept

    def as_dict(self) -> dict[str, Any]:
        return {
            "committed": self.committed,
            "deltas": [d.as_dict() for d in self.deltas],
            "result": self.result,
            "error": self.error,
        }


# ============================================================================ record text


def parse_record(text: str, count: int) -> list[str | None]:
    """The fields of a composite value's text output (``record_out``): text, or None for NULL.

    ``count`` is the number of columns (``()`` is zero columns or one NULL). Inverse of the
    server's quoting: a quoted field may hold ``,()"\\`` and spaces; ``""`` and ``\\x`` inside
    quotes (and ``\\x`` outside) stand for the character.
    """
    if len(text) < 2 or text[0] != "(" or text[-1] != ")":
        raise ValueError(f"not a record: {text[:40]!r}")
    if count == 0:
        return []
    fields: list[str | None] = []
    end = len(text) - 1
    i = 1
    while True:
        if i >= end or text[i] == ",":  # nothing between separators: NULL
            fields.append(None)
        else:
            chunk: list[str] = []
            quoted = False
            while i < end and (quoted or text[i] != ","):
                ch = text[i]
                if ch == "\\" and i + 1 <= end:
                    chunk.append(text[i + 1])
                    i += 2
                    continue
                if ch == '"':
                    if quoted and i + 1 < end and text[i + 1] == '"':
                        chunk.append('"')
                        i += 2
                        continue
                    quoted = not quoted
                    i += 1
                    continue
                chunk.append(ch)
                i += 1
            fields.append("".join(chunk))
        if i >= end:
            break
        i += 1  # the comma
    return fields


# ============================================================================ collecting deltas


@dataclass(frozen=True)
class _Raw:
    seq: int
    relid: int
    op: str
    old: str | None
    new: str | None


class _Collector:
    """The notice handler: keeps the ``cdc.simulate`` messages in order.

    A message whose ``seq`` is not above the last kept one means a savepoint rolled back the
    kept deltas from that ``seq`` on (the counter is transaction-local and was reverted).
    """

    def __init__(self) -> None:
        self.raw: list[_Raw] = []
        self.bad: int = 0

    def __call__(self, diag: Diagnostic) -> None:
        if diag.message_primary != NOTICE_MESSAGE or diag.severity_nonlocalized not in (None, "INFO"):
            return
        try:
            seq, relid, op, old, new = json.loads(diag.message_detail or "")
            entry = _Raw(int(seq), int(relid), str(op), old, new)
        except (ValueError, TypeError):
            self.bad += 1
            return
        while self.raw and self.raw[-1].seq >= entry.seq:
            self.raw.pop()
        self.raw.append(entry)

    def keep_up_to(self, final_seq: int | None) -> None:
        """Drop the deltas of savepoints rolled back after the last one (``final_seq``: the counter)."""
        if final_seq is None:
            return
        while self.raw and self.raw[-1].seq > final_seq:
            self.raw.pop()


@dataclass(frozen=True)
class _TableShape:
    name: str
    columns: tuple[str, ...]  # every non-dropped column, in attnum order (the record's fields)
    type_oids: tuple[int, ...]
    generated: tuple[bool, ...]
    key_columns: tuple[str, ...]  # empty: the whole row names it


_CATALOG_QUERY: Final = """
SELECT c.oid::pg_catalog.int8 AS oid, n.nspname::pg_catalog.text AS nspname,
       c.relname::pg_catalog.text AS relname, c.relreplident::pg_catalog.text AS identity,
       coalesce(a.names, '{}') AS names, coalesce(a.types, '{}') AS types,
       coalesce(a.generated, '{}') AS generated,
       (SELECT pg_catalog.array_agg(ka.attname::pg_catalog.text ORDER BY k.ord)
          FROM pg_catalog.pg_index AS i
          CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute AS ka ON ka.attrelid = i.indrelid AND ka.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisreplident) AS identity_key,
       (SELECT pg_catalog.array_agg(ka.attname::pg_catalog.text ORDER BY k.ord)
          FROM pg_catalog.pg_index AS i
          CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
          JOIN pg_catalog.pg_attribute AS ka ON ka.attrelid = i.indrelid AND ka.attnum = k.attnum
         WHERE i.indrelid = c.oid AND i.indisprimary) AS primary_key
  FROM pg_catalog.pg_class AS c
  JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
  LEFT JOIN LATERAL (
        SELECT pg_catalog.array_agg(at.attname::pg_catalog.text ORDER BY at.attnum) AS names,
               pg_catalog.array_agg(at.atttypid::pg_catalog.int8 ORDER BY at.attnum) AS types,
               pg_catalog.array_agg(at.attgenerated <> '' AND NOT (at.attgenerated = 's'
                   AND pg_catalog.current_setting('server_version_num')::pg_catalog.int4 >= 180000)
                   ORDER BY at.attnum) AS generated
          FROM pg_catalog.pg_attribute AS at
         WHERE at.attrelid = c.oid AND at.attnum > 0 AND NOT at.attisdropped) AS a ON true
 WHERE c.oid = ANY(%s::pg_catalog.oid[])
"""


def _shapes(rows: Iterable[Sequence[Any]]) -> dict[int, _TableShape]:
    out: dict[int, _TableShape] = {}
    for oid, nspname, relname, identity, names, types, generated, identity_key, primary in rows:
        # REPLICA IDENTITY USING INDEX: its columns; otherwise (default, FULL, NOTHING) the primary key
        key = tuple(identity_key) if identity == "i" and identity_key else tuple(primary or ())
        out[int(oid)] = _TableShape(
            name=f"{nspname}.{relname}",
            columns=tuple(names),
            type_oids=tuple(int(t) for t in types),
            generated=tuple(bool(g) for g in generated),
            key_columns=key,
        )
    return out


def _image(shape: _TableShape | None, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    if shape is None:  # the table is gone (created and dropped inside the callback): keep the text
        return {"record": text}
    fields = parse_record(text, len(shape.columns))
    image: dict[str, Any] = {}
    for index, value in enumerate(fields):
        if index >= len(shape.columns):  # columns added inside the callback, then rolled back
            image[f"column_{index + 1}"] = value
            continue
        if shape.generated[index]:
            continue  # not captured (pgoutput sends stored generated columns only from PG 18)
        converter = converter_for(shape.type_oids[index])
        image[shape.columns[index]] = value if value is None or converter is None else converter(value)
    return image


def _key(shape: _TableShape | None, image: Mapping[str, Any]) -> Any:
    if shape is None or not shape.key_columns or not set(shape.key_columns) <= set(image):
        return dict(image)
    if len(shape.key_columns) == 1:
        return image[shape.key_columns[0]]
    return {c: image[c] for c in shape.key_columns}


def _deltas(raw: Sequence[_Raw], shapes: Mapping[int, _TableShape]) -> list[Delta]:
    deltas: list[Delta] = []
    for entry in raw:
        operation = _OPS.get(entry.op)
        if operation is None:
            continue
        shape = shapes.get(entry.relid)
        before = _image(shape, entry.old) if operation != "insert" else None
        after = _image(shape, entry.new) if operation != "delete" else None
        image = after if after is not None else before
        deltas.append(
            Delta(
                version=0,
                table=shape.name if shape is not None else f"oid:{entry.relid}",
                key=_key(shape, image or {}),
                operation=operation,
                before=before,
                after=after,
            )
        )
    return deltas


# ============================================================================ guarding the transaction


class _Guard:
    """Refuses ``conn.transaction()``, ``conn.commit()`` and ``conn.rollback()`` inside the callback.

    The methods are shadowed on the instance (psycopg connections have a ``__dict__``) and put
    back afterwards; the real connection object is what the callback receives.
    """

    _NAMES: Final = ("transaction", "commit", "rollback")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.tripped = False

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        self.tripped = True
        raise UsageError(NESTED_MESSAGE)

    def install(self) -> None:
        for name in self._NAMES:
            self.conn.__dict__[name] = self._refuse
        self.conn.__dict__["_cdc_simulate_guard"] = self

    def remove(self) -> None:
        for name in (*self._NAMES, "_cdc_simulate_guard"):
            self.conn.__dict__.pop(name, None)


def _check_idle(conn: Any) -> None:
    outer = conn.__dict__.get("_cdc_simulate_guard")
    if isinstance(outer, _Guard):
        outer.tripped = True
        raise UsageError(NESTED_MESSAGE)
    if conn.closed:
        raise UsageError("simulate needs an open connection")
    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise UsageError(OPEN_TRANSACTION_MESSAGE)


def _error_text(exc: BaseException) -> str:
    # A server error's DETAIL/CONTEXT can quote row values: the primary message and SQLSTATE only.
    text = reported_message(exc).strip()
    return text or type(exc).__name__


def _not_installed(exc: psycopg.Error) -> SetupError:
    return SetupError(
        f"simulate is not installed on this database ({exc.diag.message_primary or exc})",
        hint="run `cdc setup` on this source database (it installs the simulate triggers)",
    )


_BEGIN: Final = "SELECT cdc.simulate_begin()"
_STATE: Final = (
    "SELECT pg_catalog.current_setting('cdc.simulate', true), "
    "pg_catalog.current_setting('cdc.simulate_seq', true)"
)


def _final_seq(row: Sequence[Any] | None) -> tuple[bool, int | None]:
    """(the simulation's transaction is still the one we began, the counter's final value)."""
    if row is None or row[0] != "on":
        return False, None
    try:
        return True, int(row[1])
    except (TypeError, ValueError):
        return True, None


# ============================================================================ simulate


def simulate(
    conn: psycopg.Connection[Any], fn: Callable[[psycopg.Connection[Any]], T]
) -> SimulationResult[T]:
    """Run ``fn(conn)`` in a transaction on the source, collect its row deltas, always roll back.

    ``conn`` must not be inside a transaction (:class:`~cdc.errors.UsageError`). If ``fn``
    raises, its message is returned as ``error`` with the deltas made before it (not
    re-raised). ``fn`` must not open, commit or roll back a transaction itself:
    ``conn.transaction()``, ``conn.commit()`` and ``conn.rollback()`` raise, and ``simulate``
    then raises :class:`~cdc.errors.UsageError` ("nested transactions are not supported
    inside simulate"). Needs the triggers of ``cdc setup`` (:class:`~cdc.errors.SetupError`).
    """
    _check_idle(conn)
    collector = _Collector()
    guard = _Guard(conn)
    was_autocommit = conn.autocommit
    rollback = type(conn).rollback
    if was_autocommit:
        conn.autocommit = False  # a raw COMMIT inside fn then cannot leave later statements autocommitted
    conn.add_notice_handler(collector)
    try:
        try:
            conn.execute(_BEGIN)
        except psycopg.errors.UndefinedFunction as exc:
            raise _not_installed(exc) from None
        result: T | None = None
        error: str | None = None
        guard.install()
        try:
            result = fn(conn)
        except Exception as exc:  # noqa: BLE001 - any failure of the callback is its result
            error = _error_text(exc)
        finally:
            guard.remove()
        if guard.tripped:
            raise UsageError(NESTED_MESSAGE)
        status = conn.info.transaction_status
        ours, final_seq = False, None
        if status == TransactionStatus.INTRANS:
            ours, final_seq = _final_seq(conn.execute(_STATE).fetchone())
        elif status == TransactionStatus.INERROR:
            ours = True
        if not ours:
            raise UsageError(ENDED_MESSAGE)
        collector.keep_up_to(final_seq)
        relids = sorted({r.relid for r in collector.raw})
        shapes: dict[int, _TableShape] = {}
        if relids and status == TransactionStatus.INTRANS:
            shapes = _shapes(conn.execute(_CATALOG_QUERY, (relids,)).fetchall())
        rollback(conn)
        if relids and not shapes:  # the transaction had failed: read the catalog after the rollback
            shapes = _shapes(conn.execute(_CATALOG_QUERY, (relids,)).fetchall())
            rollback(conn)
        return SimulationResult(
            committed=False, deltas=_deltas(collector.raw, shapes), result=result, error=error
        )
    finally:
        conn.remove_notice_handler(collector)
        if not conn.closed:
            if conn.info.transaction_status != TransactionStatus.IDLE:
                rollback(conn)
            if was_autocommit:
                conn.autocommit = True


async def asimulate(
    aconn: psycopg.AsyncConnection[Any], afn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]
) -> SimulationResult[T]:
    """The async form of :func:`simulate`: ``await afn(aconn)`` inside the simulation."""
    _check_idle(aconn)
    collector = _Collector()
    guard = _Guard(aconn)
    was_autocommit = aconn.autocommit
    rollback = type(aconn).rollback
    if was_autocommit:
        await aconn.set_autocommit(False)
    aconn.add_notice_handler(collector)
    try:
        try:
            await aconn.execute(_BEGIN)
        except psycopg.errors.UndefinedFunction as exc:
            raise _not_installed(exc) from None
        result: T | None = None
        error: str | None = None
        guard.install()
        try:
            result = await afn(aconn)
        except Exception as exc:  # noqa: BLE001 - any failure of the callback is its result
            error = _error_text(exc)
        finally:
            guard.remove()
        if guard.tripped:
            raise UsageError(NESTED_MESSAGE)
        status = aconn.info.transaction_status
        ours, final_seq = False, None
        if status == TransactionStatus.INTRANS:
            cur = await aconn.execute(_STATE)
            ours, final_seq = _final_seq(await cur.fetchone())
        elif status == TransactionStatus.INERROR:
            ours = True
        if not ours:
            raise UsageError(ENDED_MESSAGE)
        collector.keep_up_to(final_seq)
        relids = sorted({r.relid for r in collector.raw})
        shapes: dict[int, _TableShape] = {}
        if relids and status == TransactionStatus.INTRANS:
            cur = await aconn.execute(_CATALOG_QUERY, (relids,))
            shapes = _shapes(await cur.fetchall())
        await rollback(aconn)
        if relids and not shapes:
            cur = await aconn.execute(_CATALOG_QUERY, (relids,))
            shapes = _shapes(await cur.fetchall())
            await rollback(aconn)
        return SimulationResult(
            committed=False, deltas=_deltas(collector.raw, shapes), result=result, error=error
        )
    finally:
        aconn.remove_notice_handler(collector)
        if not aconn.closed:
            if aconn.info.transaction_status != TransactionStatus.IDLE:
                await rollback(aconn)
            if was_autocommit:
                await aconn.set_autocommit(True)


# ============================================================================ install (cdc setup)


def simulate_sql() -> str:
    """The text of ``sql/simulate.sql``."""
    # This module sits in the package directory; cdc/sql -> ../sql (packaged as cdc/sql).
    return (Path(__file__).parent / "sql" / "simulate.sql").read_text(encoding="utf-8")


def _is_superuser(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user").fetchone()
    return bool(row and row[0])


def _e_literal(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@contextmanager
def _install_transaction(conn: psycopg.Connection[Any], what: str) -> Iterator[None]:
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext(%s))", [_LOCK_KEY])
            yield
    except psycopg.errors.LockNotAvailable as exc:
        raise SetupError(
            f"could not take a lock to {what} within {_LOCK_TIMEOUT}: {exc.diag.message_primary}",
            hint="a long transaction holds a lock on one of the tables; retry when it has finished",
        ) from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SetupError(
            f"not allowed to {what}: {exc.diag.message_primary}",
            hint="run `cdc setup` as the owner of the captured tables (or a superuser)",
        ) from None


def install_simulate(
    conn: psycopg.Connection[Any],
    tables: Sequence[tuple[str, str]],
    *,
    attach_new_tables: bool = True,
    exclude_schemas: Sequence[str] = (),
) -> list[str]:
    """Install or update the simulate triggers on ``tables`` ((schema, table) pairs); idempotent.

    Returns warnings for the operator. With ``attach_new_tables`` and a superuser connection,
    an event trigger attaches them to tables created later (outside ``exclude_schemas``: put
    the store's schema there when the store shares the database). Runs in one transaction
    under an advisory lock. :class:`SetupError` for missing tables, privileges or a lock
    that could not be taken.
    """
    excluded = "ARRAY[" + ", ".join(_e_literal(s) for s in exclude_schemas) + "]::pg_catalog.text[]"
    if not exclude_schemas:
        excluded = "'{}'::pg_catalog.text[]"
    warnings: list[str] = []
    with _install_transaction(conn, "install the simulate triggers"):
        conn.execute(simulate_sql())  # trusted file shipped with the package
        conn.execute(
            "CREATE OR REPLACE FUNCTION cdc.simulate_excluded_schemas() RETURNS text[] "
            f"LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT {excluded} $$"
        )
        warnings.extend(_attach(conn, tables))
        conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(EVENT_TRIGGER_NAME)))
        if attach_new_tables and _is_superuser(conn):
            conn.execute(
                sql.SQL(
                    "CREATE EVENT TRIGGER {} ON ddl_command_end"
                    " WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')"
                    " EXECUTE FUNCTION cdc.simulate_attach_new_tables()"
                ).format(sql.Identifier(EVENT_TRIGGER_NAME))
            )
        elif attach_new_tables:
            warnings.append("not superuser: tables created later need `cdc setup` again for simulate")
    return warnings


def _attach(conn: psycopg.Connection[Any], tables: Sequence[tuple[str, str]]) -> list[str]:
    warnings: list[str] = []
    missing: list[str] = []
    for schema, table in dict.fromkeys(tables):
        row = conn.execute(
            """
            SELECT c.relkind, c.relpersistence,
                   EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                            WHERE t.tgrelid = c.oid AND t.tgname = %s
                              AND t.tgfoid = 'cdc.simulate_capture()'::pg_catalog.regprocedure),
                   EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                            WHERE t.tgrelid = c.oid AND t.tgname = %s
                              AND t.tgfoid = 'cdc.simulate_capture_truncate()'::pg_catalog.regprocedure)
              FROM pg_catalog.pg_class AS c
              JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             WHERE n.nspname = %s AND c.relname = %s
            """,
            [TRIGGER_NAME, TRUNCATE_TRIGGER_NAME, schema, table],
        ).fetchone()
        name = f"{schema}.{table}"
        if row is None:
            missing.append(name)
            continue
        relkind, persistence, has_row, has_truncate = row
        if relkind not in ("r", "p") or persistence != "p" or schema in _SYSTEM_SCHEMAS:
            warnings.append(f"{name}: not a captured permanent table, no simulate trigger")
            continue
        ident = sql.Identifier(schema, table)
        if not has_row:
            conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER_NAME), ident)
            )
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW"
                    " WHEN ({}) EXECUTE FUNCTION cdc.simulate_capture()"
                ).format(sql.Identifier(TRIGGER_NAME), ident, sql.SQL(_WHEN))
            )
        if not has_truncate:
            conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(TRUNCATE_TRIGGER_NAME), ident
                )
            )
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT"
                    " WHEN ({}) EXECUTE FUNCTION cdc.simulate_capture_truncate()"
                ).format(sql.Identifier(TRUNCATE_TRIGGER_NAME), ident, sql.SQL(_WHEN))
            )
    if missing:
        raise SetupError(
            "no such table on the source: " + ", ".join(missing),
            hint="check the table list in the configuration",
        )
    return warnings


def simulate_installed(conn: psycopg.Connection[Any]) -> bool:
    """Whether the simulate functions are installed on this database."""
    row = conn.execute("SELECT pg_catalog.to_regprocedure('cdc.simulate_begin()') IS NOT NULL").fetchone()
    return bool(row and row[0])


def simulate_tables(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """The (schema, table) pairs that carry the simulate row trigger, sorted."""
    if not simulate_installed(conn):
        return []
    return tables_with_trigger(conn, "cdc.simulate_capture()")


def uninstall_simulate(conn: psycopg.Connection[Any]) -> None:
    """Remove the simulate triggers, event trigger, guard table and functions. Idempotent.

    Schema ``cdc`` itself is left alone (the context trigger lives there too; its uninstall
    drops the schema when it is empty).
    """
    with _install_transaction(conn, "remove the simulate triggers"):
        conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(EVENT_TRIGGER_NAME)))
        for signature in (
            "cdc.simulate_attach_new_tables()",
            "cdc.simulate_capture()",  # CASCADE: the triggers go with their functions
            "cdc.simulate_capture_truncate()",
            "cdc.simulate_begin()",
            "cdc.emit_simulate_marker()",
            "cdc.simulate_excluded_schemas()",
        ):
            conn.execute(f"DROP FUNCTION IF EXISTS {signature} CASCADE")
        conn.execute("DROP TABLE IF EXISTS cdc.simulate_guard")
        conn.execute("DROP FUNCTION IF EXISTS cdc.simulate_refuse_commit() CASCADE")
