"""The application side: tag database work with the request that caused it.

``request(conn, request_id, actor=..., **extra)`` is a context manager for a psycopg 3
connection (or a SQLAlchemy Engine/Connection). Inside a transaction it

1. sets ``cdc.request_id``, ``cdc.actor`` and ``cdc.<key>`` for each extra, transaction-local
   (``set_config(..., true)``), so nothing leaks into the session: safe behind poolers such as
   pgbouncer in transaction mode;
2. writes the ``cdc.context`` message through ``cdc.emit_context()`` (transactional, ``"source":
   "client"``; the server stamps and signs it), so the context reaches the WAL even for tables
   without the trigger, and records the fingerprint the trigger compares (``cdc._emitted``), so
   the trigger does not emit a second one;
3. when the block raises, writes a NON-transactional ``cdc.error`` message through
   ``cdc.report_error()`` (error type, message, the application's file:line, request id; the
   server stamps the session and the xid) that survives the rollback and, when ``cdc setup``
   installed ``cdc.await_capture()`` and the transaction is still alive, waits (bounded) until
   the capture daemon has decoded past it, so the attempted changes are captured before the
   rollback discards them (PostgreSQL 16+ streaming); then re-raises. The message of a database
   error is its primary message and SQLSTATE only (never DETAIL, HINT or CONTEXT, which quote
   row values: :func:`cdc.errors.reported_message`).

Both functions are installed on the source by ``cdc setup``: without them ``request()`` raises
:class:`cdc.errors.SetupError`.

All of step 1 and 2 is one round trip. Transactions: with an autocommit connection the block
runs in its own transaction (``conn.transaction()``: committed at the end, rolled back on an
exception); otherwise the block uses the connection's current transaction, which the caller
commits or rolls back (the context then stays in effect until that transaction ends, like
``SET LOCAL``; a nested ``request()`` re-emits the outer context when it exits).

Reporting an error after SQL failed: a failed statement leaves the transaction aborted, where
nothing, not even a non-transactional message, can be written. When ``request()`` owns the
transaction it rolls back first and then writes the message on the same connection (autocommit,
so it is a statement of its own). When the caller owns the transaction, ``request()`` must not
roll it back, so it writes the message over a short separate connection to the same server
(``conn.info.get_parameters()`` plus the password; SQLAlchemy: another connection of the engine),
from a thread, and re-raises once it is written or after ``report_wait_ms`` (see
:func:`configure`: behind a transaction pooler the second connection may get a server connection
only after the caller's rollback); the session token that ``cdc.emit_context()`` returned proves
to the server that the error is that session's. Reporting never masks the original exception: a
failure to report is logged (without values) and swallowed.

Tracing: ``request(conn, traceparent=...)`` takes a W3C ``traceparent`` (the OpenTelemetry
convention, :mod:`cdc.tracing`; an invalid one is ignored) and records its trace id and span id
with the request's context (sent as the ``traceparent`` member of ``extra``, signed with the rest;
the daemon stores them as the context's ``trace_id`` and ``span_id``). Without one, the trace
context of the current HTTP request (the middlewares) or of the enclosing ``request()`` is used.
With ``configure(request_id_from_trace=True)`` a request given no id is named by its trace id.

``arequest(aconn, ...)`` is the same for psycopg's AsyncConnection. ``WSGIMiddleware`` and
``ASGIMiddleware`` (:mod:`cdc.middleware`) take the request id from a header (or make one) and
the trace context from ``traceparent``, expose them through :func:`current_request_id` and
:func:`current_trace` and echo the id in the response; ``request(conn)`` without an id uses them.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import json
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg.pq import TransactionStatus

from cdc.context import (
    EMITTED_SETTING,
    MAX_EXTRA_KEYS,
    MAX_EXTRA_VALUE_CHARS,
    MAX_ID_CHARS,
    MAX_MESSAGE_BYTES,
    truncate_utf8,
    validate_setting_name,
)
from cdc.error_location import error_location
from cdc.errors import SetupError, error_text, reported_message
from cdc.middleware import (
    ASGIMiddleware,
    WSGIMiddleware,
    _request_id,
    _trace,
    current_request_id,
    current_trace,
    new_request_id,
    settings,
)
from cdc.tracing import TRACEPARENT_KEY, TraceContext, parse_traceparent

__all__ = [
    "ASGIMiddleware",
    "RequestScope",
    "TraceContext",
    "WSGIMiddleware",
    "arequest",
    "configure",
    "current_request_id",
    "current_trace",
    "error_location",
    "new_request_id",
    "request",
]

log = logging.getLogger("cdc.client")

# The request() scopes open in this context, innermost last: (id(connection), scope).
_open_scopes: contextvars.ContextVar[tuple[tuple[int, RequestScope], ...]] = contextvars.ContextVar(
    "cdc_open_scopes", default=()
)

_settings_prefix = "cdc"
#: The longest a failed request waits for capture before it rolls back (cdc.await_capture).
_capture_wait_ms = 2000
#: The longest a failed request waits for its error report over a second connection.
_report_wait_ms = 1000
_REPORT_CONNECT_TIMEOUT: Final = 5


def _milliseconds(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return min(value, 30_000)


def configure(
    *,
    settings_prefix: str = "cdc",
    capture_wait_ms: int = 2000,
    report_wait_ms: int = 1000,
    request_id_from_trace: bool = False,
) -> None:
    """Process-wide settings of the helper: the prefix of the settings it writes (must match the
    source's ``context.settings_prefix``), and ``capture_wait_ms``, the longest a failed request
    waits, before it rolls back, for the capture daemon to decode its attempted changes (0: never
    wait; the source caps it at 30 s). It waits only on PostgreSQL 16+ while a daemon streams
    and its position can be seen (sql/await_capture.sql).

    ``report_wait_ms``: the longest a failed request waits for the report of its error over a
    second connection (a statement failed in the caller's transaction) before it re-raises; the
    report then completes in the background. Behind a transaction pooler whose server
    connections are all taken, the second connection gets one only when the caller's rollback
    frees it. Both are capped at 30 s.

    ``request_id_from_trace``: a request given no id (by the caller or the middleware) is named
    by the trace id of its trace context, when it has one; the middlewares do the same unless
    told otherwise (their ``request_id_from_trace``)."""
    global _settings_prefix, _capture_wait_ms, _report_wait_ms  # noqa: PLW0603 - process-wide configuration, set once at start-up
    capture = _milliseconds("capture_wait_ms", capture_wait_ms)
    report = _milliseconds("report_wait_ms", report_wait_ms)
    _settings_prefix = validate_setting_name(settings_prefix, "settings_prefix")
    _capture_wait_ms, _report_wait_ms = capture, report
    settings.request_id_from_trace = bool(request_id_from_trace)


@dataclass(frozen=True, slots=True)
class RequestScope:
    """What ``request()`` yields: the request's identity and the connection to use.

    ``connection`` is the connection passed in, or, for a SQLAlchemy Engine, the Connection
    opened for the block. ``xid`` is the (64-bit) id of the transaction the context was
    written in. ``session_token`` (from ``cdc.emit_context()``) lets another connection report
    this session's error. ``trace``: the trace context recorded with the request, if any.
    """

    request_id: str
    actor: str | None
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    connection: Any = None
    xid: int | None = None
    session_token: str | None = field(default=None, repr=False)
    trace: TraceContext | None = None

    def begun(self, connection: Any, row: tuple[int | None, str | None]) -> RequestScope:
        """This scope on ``connection`` once its context is written (``row``: xid, session token)."""
        return RequestScope(self.request_id, self.actor, self.extra, connection, *row, trace=self.trace)


# ============================================================================ SQL


def _trace_of(traceparent: object) -> TraceContext | None:
    """The trace context given (a TraceContext or a traceparent value; an invalid value is
    ignored, never an error), else the current one (the middleware's, or an enclosing request's)."""
    if isinstance(traceparent, TraceContext):
        return traceparent
    trace = parse_traceparent(traceparent) if traceparent is not None else None
    if trace is None and traceparent is not None:
        log.debug("cdc: ignored an invalid traceparent")
    return trace or _trace.get()


def _prepare(
    request_id: str | None, actor: str | None, extra: Mapping[str, str], traceparent: object = None
) -> RequestScope:
    """The request's claim: id, actor, extra and trace, checked (a scope not yet begun)."""
    trace = _trace_of(traceparent)
    rid = request_id if request_id else _request_id.get()
    if not rid:
        rid = trace.trace_id if trace is not None and settings.request_id_from_trace else new_request_id()
    if not isinstance(rid, str):
        raise TypeError(f"request_id must be a string, not {type(rid).__name__}")
    if actor is not None and not isinstance(actor, str):
        raise TypeError(f"actor must be a string, not {type(actor).__name__}")
    if len(extra) > MAX_EXTRA_KEYS:
        raise ValueError(f"at most {MAX_EXTRA_KEYS} extra context keys, got {len(extra)}")
    clean: dict[str, str] = {}
    for key, value in extra.items():
        name = validate_setting_name(key, "extra context key")
        if name in ("request_id", "actor") or name.startswith("_"):
            raise ValueError(f"extra context key {key!r} is reserved")
        if not isinstance(value, str):
            raise TypeError(f"extra context value for {key!r} must be a string, not {type(value).__name__}")
        clean[name] = value[:MAX_EXTRA_VALUE_CHARS]
    return RequestScope(
        rid[:MAX_ID_CHARS], (actor[:MAX_ID_CHARS] if actor else None), MappingProxyType(clean), trace=trace
    )


def _begin_params(claim: RequestScope) -> dict[str, Any]:
    prefix = _settings_prefix
    trace = {TRACEPARENT_KEY: claim.trace.traceparent} if claim.trace is not None else {}
    return {
        "k_rid": f"{prefix}.request_id",
        "k_actor": f"{prefix}.actor",
        "k_extra": f"{prefix}.",
        "k_emitted": EMITTED_SETTING,
        "rid": claim.request_id,
        "actor": claim.actor or "",
        "actor_claim": claim.actor,
        "extra": json.dumps(dict(claim.extra), separators=(",", ":"), ensure_ascii=False),
        "trace": json.dumps(trace, separators=(",", ":")),
    }


# One round trip: set the settings, emit the context through cdc.emit_context() (which stamps
# and signs it and returns the session token, column 4), with the extra settings the source is
# configured to record (context.extra_settings, through cdc.context_extra_json(): a `SET LOCAL
# cdc.tenant` made before the block is recorded too) under the ones given here and the
# traceparent (its own member of extra: not a setting), record the fingerprint the trigger
# compares (request_id US application_name, see cdc.context.context_fingerprint) and return the
# transaction id (column 1). The columns do not depend on each other, so their order of
# evaluation does not matter. Only `%(name)s` placeholders and no `::` casts: the same text
# serves psycopg and (after a placeholder rewrite) SQLAlchemy's text().
_BEGIN_SQL: Final = """
SELECT pg_catalog.set_config(CAST(%(k_rid)s AS text), CAST(%(rid)s AS text), true),
       pg_catalog.txid_current(),
       pg_catalog.set_config(CAST(%(k_actor)s AS text), CAST(%(actor)s AS text), true),
       (SELECT pg_catalog.count(pg_catalog.set_config(CAST(%(k_extra)s AS text) || e.key, e.value, true))
          FROM pg_catalog.json_each_text(CAST(%(extra)s AS json)) AS e),
       cdc.emit_context(CAST(%(rid)s AS text), CAST(%(actor_claim)s AS text),
                        CAST(pg_catalog.jsonb_strip_nulls(CAST(cdc.context_extra_json() AS jsonb))
                             || CAST(%(extra)s AS jsonb) || CAST(%(trace)s AS jsonb) AS json),
                        CAST('client' AS text)),
       pg_catalog.set_config(CAST(%(k_emitted)s AS text),
           CAST(%(rid)s AS text) || pg_catalog.chr(31) || pg_catalog.current_setting('application_name'), true)
"""

# The error message through cdc.report_error() (non-transactional, flushed on PostgreSQL 17+; it
# returns the message's end), and whether `cdc setup` installed cdc.await_capture()
# (sql/await_capture.sql).
_ERROR_SQL: Final = """
SELECT CAST(cdc.report_error(CAST(%(rid)s AS text), CAST(%(error_type)s AS text), CAST(%(message)s AS text),
                             CAST(%(location)s AS text), CAST(%(actor)s AS text), CAST(%(token)s AS text))
            AS text),
       pg_catalog.to_regprocedure('cdc.await_capture(pg_lsn,integer)') IS NOT NULL
"""


def _begun(row: Any) -> tuple[int | None, str | None]:
    """(xid, session token) from the row of _BEGIN_SQL."""
    if row is None:
        return None, None
    return (int(row[1]) if row[1] is not None else None), (str(row[4]) if row[4] else None)


def _not_set_up(exc: BaseException) -> SetupError:
    return SetupError(
        f"cdc is not set up on this database ({error_text(exc)})",
        hint="run `cdc setup` for this source: it installs cdc.emit_context() and cdc.report_error()",
    )


# Before a failed request's transaction rolls back: wait (bounded: capture_wait_ms) until the
# capture daemon's walsender has decoded past the error message. PostgreSQL 16+ streams a
# transaction's changes as it decodes them but drops them if the transaction has aborted by
# then, so without the wait the attempted changes of a failed request may never be captured.
# Only useful while the transaction is still alive (an exception raised by the application);
# after a failed statement the transaction has aborted already.
_AWAIT_SQL: Final = "SELECT cdc.await_capture(CAST(%(lsn)s AS pg_lsn), CAST(%(wait)s AS integer))"


def _error_params(scope: RequestScope, exc: BaseException) -> dict[str, Any]:
    # A driver error wrapped by SQLAlchemy: report the database's error, not the wrapper (whose
    # text also carries the SQL statement and its parameters).
    orig = getattr(exc, "orig", None)
    reported = orig if isinstance(orig, BaseException) else exc
    return {
        "rid": scope.request_id,
        "error_type": type(reported).__name__,
        "message": truncate_utf8(reported_message(reported), MAX_MESSAGE_BYTES),
        "location": error_location(exc),
        "actor": scope.actor,
        "token": scope.session_token,
    }


def _mark_reported(exc: BaseException) -> bool:
    """True the first time for ``exc``: nested request() blocks report an error once."""
    if getattr(exc, "_cdc_reported", False):
        return False
    with suppress(AttributeError):  # exceptions with __slots__
        exc._cdc_reported = True  # type: ignore[attr-defined]
    return True


def _report_failed(what: str, err: BaseException) -> None:
    log.warning("cdc: could not write the cdc.error message (%s): %s", what, type(err).__name__)


def _report_aside(what: str, report: Callable[[], None]) -> threading.Event:
    """Run ``report`` (an error report over a second connection) in a daemon thread; the event is
    set when it is done. The caller waits for it at most ``report_wait_ms``: behind a transaction
    pooler, the second connection may have to wait for a server connection that only the caller's
    own rollback frees (PgBouncer would hold it in its queue for ``query_wait_timeout``, 120 s by
    default), and the application must never stall on our account."""
    done = threading.Event()

    def run() -> None:
        try:
            report()
        except Exception as err:  # noqa: BLE001 - reporting must never mask the original error
            _report_failed(what, err)
        finally:
            done.set()

    threading.Thread(target=run, name="cdc-error-report", daemon=True).start()
    return done


async def _wait_event(done: threading.Event, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not done.is_set() and loop.time() < deadline:
        await asyncio.sleep(0.005)


def _report_separately(info: Any, params: dict[str, Any]) -> threading.Event:
    """Report over a short connection of our own to the same server (or pooler)."""
    conninfo = _separate_conninfo(info)

    def report() -> None:
        with psycopg.connect(conninfo, autocommit=True) as other:
            other.execute(_ERROR_SQL, params)

    return _report_aside("psycopg", report)


# ============================================================================ psycopg (sync)


def _usable(status: TransactionStatus) -> bool:
    return status in (TransactionStatus.INTRANS, TransactionStatus.IDLE)


def _separate_conninfo(info: Any) -> str:
    params = dict(info.get_parameters())
    password = info.password
    if password:
        params["password"] = password
    params.setdefault("connect_timeout", str(_REPORT_CONNECT_TIMEOUT))
    params["application_name"] = "cdc-error-report"
    return pg_conninfo.make_conninfo(**params)


def _emit_error_sync(conn: psycopg.Connection[Any], scope: RequestScope, exc: BaseException) -> None:
    try:
        params = _error_params(scope, exc)
        status = conn.info.transaction_status
        if _usable(status) and not conn.closed:
            started = status == TransactionStatus.IDLE and not conn.autocommit
            row = conn.execute(_ERROR_SQL, params).fetchone()
            if row is not None and row[1] and _capture_wait_ms and status == TransactionStatus.INTRANS:
                conn.execute(_AWAIT_SQL, {"lsn": row[0], "wait": _capture_wait_ms})
            if started:
                conn.rollback()  # the message is non-transactional: it is written already
            return
        _report_separately(conn.info, params).wait(_report_wait_ms / 1000)
    except Exception as err:  # noqa: BLE001 - reporting must never mask the original error
        _report_failed("psycopg", err)


@contextmanager
def _current(claim: RequestScope) -> Iterator[None]:
    """``claim``'s id and trace are the current ones (current_request_id, current_trace)."""
    rid_token = _request_id.set(claim.request_id)
    trace_token = _trace.set(claim.trace)
    try:
        yield
    finally:
        _trace.reset(trace_token)
        _request_id.reset(rid_token)


def _begin_sync(conn: psycopg.Connection[Any], claim: RequestScope) -> tuple[int | None, str | None]:
    try:
        return _begun(conn.execute(_BEGIN_SQL, _begin_params(claim)).fetchone())
    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName) as exc:
        raise _not_set_up(exc) from exc


@contextmanager
def _psycopg_request(conn: psycopg.Connection[Any], claim: RequestScope) -> Iterator[RequestScope]:
    owned = conn.autocommit
    deferred: BaseException | None = None
    scope = claim.begun(conn, (None, None))
    stack = _open_scopes.get()
    token = _open_scopes.set((*stack, (id(conn), scope)))
    try:
        with _current(claim), conn.transaction() if owned else nullcontext():
            scope = claim.begun(conn, _begin_sync(conn, claim))
            try:
                yield scope
            except Exception as exc:
                if _mark_reported(exc):
                    if _usable(conn.info.transaction_status) or not owned:
                        _emit_error_sync(conn, scope, exc)
                    else:
                        deferred = exc  # aborted: report after the rollback, on this connection
                raise
            else:
                _restore_outer_sync(conn, stack)
    except Exception as exc:
        if deferred is not None and exc is deferred:
            _emit_error_sync(conn, scope, exc)
        raise
    finally:
        _open_scopes.reset(token)


def _restore_outer_sync(conn: psycopg.Connection[Any], stack: tuple[tuple[int, RequestScope], ...]) -> None:
    """After a nested request() on the same connection, the outer request is current again."""
    if stack and stack[-1][0] == id(conn) and conn.info.transaction_status == TransactionStatus.INTRANS:
        _begin_sync(conn, stack[-1][1])


# ============================================================================ psycopg (async)


async def _emit_error_async(
    conn: psycopg.AsyncConnection[Any], scope: RequestScope, exc: BaseException
) -> None:
    try:
        params = _error_params(scope, exc)
        status = conn.info.transaction_status
        if _usable(status) and not conn.closed:
            started = status == TransactionStatus.IDLE and not conn.autocommit
            cur = await conn.execute(_ERROR_SQL, params)
            row = await cur.fetchone()
            if row is not None and row[1] and _capture_wait_ms and status == TransactionStatus.INTRANS:
                await conn.execute(_AWAIT_SQL, {"lsn": row[0], "wait": _capture_wait_ms})
            if started:
                await conn.rollback()
            return
        await _wait_event(_report_separately(conn.info, params), _report_wait_ms / 1000)
    except Exception as err:  # noqa: BLE001 - reporting must never mask the original error
        _report_failed("psycopg async", err)


async def _begin_async(
    conn: psycopg.AsyncConnection[Any], claim: RequestScope
) -> tuple[int | None, str | None]:
    try:
        cur = await conn.execute(_BEGIN_SQL, _begin_params(claim))
        return _begun(await cur.fetchone())
    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName) as exc:
        raise _not_set_up(exc) from exc


@asynccontextmanager
async def arequest(
    aconn: psycopg.AsyncConnection[Any],
    request_id: str | None = None,
    *,
    actor: str | None = None,
    traceparent: str | TraceContext | None = None,
    **extra: str,
) -> AsyncIterator[RequestScope]:
    """``request()`` for a psycopg ``AsyncConnection``."""
    if not isinstance(aconn, psycopg.AsyncConnection):
        raise TypeError(f"arequest() needs a psycopg AsyncConnection, not {type(aconn).__name__}")
    claim = _prepare(request_id, actor, extra, traceparent)
    owned = aconn.autocommit
    deferred: BaseException | None = None
    scope = claim.begun(aconn, (None, None))
    stack = _open_scopes.get()
    token = _open_scopes.set((*stack, (id(aconn), scope)))
    try:
        with _current(claim):
            async with aconn.transaction() if owned else nullcontext():
                scope = claim.begun(aconn, await _begin_async(aconn, claim))
                try:
                    yield scope
                except Exception as exc:
                    if _mark_reported(exc):
                        if _usable(aconn.info.transaction_status) or not owned:
                            await _emit_error_async(aconn, scope, exc)
                        else:
                            deferred = exc
                    raise
                else:
                    if (
                        stack
                        and stack[-1][0] == id(aconn)
                        and aconn.info.transaction_status == TransactionStatus.INTRANS
                    ):
                        await _begin_async(aconn, stack[-1][1])
    except Exception as exc:
        if deferred is not None and exc is deferred:
            await _emit_error_async(aconn, scope, exc)
        raise
    finally:
        _open_scopes.reset(token)


# ============================================================================ SQLAlchemy (sync)

_PLACEHOLDER: Final = re.compile(r"%\((\w+)\)s")


def _sa_text(sql: str) -> Any:
    sqlalchemy = importlib.import_module("sqlalchemy")
    return sqlalchemy.text(_PLACEHOLDER.sub(r":\1", sql))


def _is_sqlalchemy(obj: object) -> bool:
    return type(obj).__module__.startswith("sqlalchemy.")


def _sa_status(sa_conn: Any) -> TransactionStatus | None:
    """The libpq transaction status under a SQLAlchemy connection, when the driver tells it."""
    try:
        dbapi = sa_conn.connection.dbapi_connection
    except Exception:  # noqa: BLE001 - invalidated or closed connection
        return None
    info = getattr(dbapi, "info", None)
    status = getattr(info, "transaction_status", None)
    if isinstance(status, TransactionStatus):
        return status
    get_status = getattr(dbapi, "get_transaction_status", None)  # psycopg2
    if callable(get_status):
        try:
            return TransactionStatus(int(get_status()))
        except (TypeError, ValueError):
            return None
    return None


def _sa_begin(sa_conn: Any, claim: RequestScope) -> tuple[int | None, str | None]:
    return _begun(sa_conn.execute(_sa_text(_BEGIN_SQL), _begin_params(claim)).fetchone())


def _sa_emit_error(sa_conn: Any, scope: RequestScope, exc: BaseException, *, usable: bool) -> None:
    try:
        params = _error_params(scope, exc)
        if usable:
            row = sa_conn.execute(_sa_text(_ERROR_SQL), params).fetchone()
            if row is not None and row[1] and _capture_wait_ms:
                sa_conn.execute(_sa_text(_AWAIT_SQL), {"lsn": row[0], "wait": _capture_wait_ms})
            return
        engine = sa_conn.engine

        def report() -> None:
            with engine.connect() as other:  # another pooled connection
                other.execute(_sa_text(_ERROR_SQL), params)
                other.commit()

        _report_aside("sqlalchemy", report).wait(_report_wait_ms / 1000)
    except Exception as err:  # noqa: BLE001 - reporting must never mask the original error
        _report_failed("sqlalchemy", err)


def _sa_usable(sa_conn: Any, exc: BaseException) -> bool:
    status = _sa_status(sa_conn)
    if status is not None:
        return status == TransactionStatus.INTRANS
    sqlalchemy_exc = importlib.import_module("sqlalchemy.exc")
    return not isinstance(exc, sqlalchemy_exc.DBAPIError)  # a failed statement aborts the transaction


@contextmanager
def _sqlalchemy_request(target: Any, claim: RequestScope) -> Iterator[RequestScope]:
    sqlalchemy = importlib.import_module("sqlalchemy")
    if isinstance(target, sqlalchemy.engine.Engine):
        with target.begin() as sa_conn, _sqlalchemy_on(sa_conn, claim) as scope:
            yield scope
        return
    if not isinstance(target, sqlalchemy.engine.Connection):
        raise TypeError(f"request() supports SQLAlchemy Engine and Connection, not {type(target).__name__}")
    if target.in_transaction():
        with _sqlalchemy_on(target, claim) as scope:
            yield scope
    else:
        with target.begin(), _sqlalchemy_on(target, claim) as scope:
            yield scope


@contextmanager
def _sqlalchemy_on(sa_conn: Any, claim: RequestScope) -> Iterator[RequestScope]:
    with _current(claim):
        scope = claim.begun(sa_conn, _sa_begin(sa_conn, claim))
        try:
            yield scope
        except Exception as exc:
            if _mark_reported(exc):
                # Aborted or not, another pooled connection works; the same one only when usable.
                _sa_emit_error(sa_conn, scope, exc, usable=_sa_usable(sa_conn, exc))
            raise


# ============================================================================ request()


def request(
    conn: Any,
    request_id: str | None = None,
    *,
    actor: str | None = None,
    traceparent: str | TraceContext | None = None,
    **extra: str,
) -> AbstractContextManager[RequestScope]:
    """Run a block of database work as request ``request_id`` (see the module documentation).

    ``conn``: a psycopg 3 ``Connection``, or a SQLAlchemy ``Engine`` or ``Connection`` (any
    PostgreSQL driver). ``request_id`` defaults to :func:`current_request_id`, else (with
    ``configure(request_id_from_trace=True)``) the trace id, else a fresh id. ``traceparent``: a
    W3C ``traceparent`` value or a :class:`TraceContext` whose trace id and span id are recorded
    with the request (an invalid value is ignored); defaults to :func:`current_trace`. ``extra``
    keys become ``cdc.<key>`` settings and the message's ``extra``. Yields a :class:`RequestScope`.
    """
    claim = _prepare(request_id, actor, extra, traceparent)
    if isinstance(conn, psycopg.Connection):
        return _psycopg_request(conn, claim)
    if isinstance(conn, psycopg.AsyncConnection):
        raise TypeError("request() got an AsyncConnection: use `async with arequest(aconn, ...)`")
    if _is_sqlalchemy(conn):
        return _sqlalchemy_request(conn, claim)
    raise TypeError(
        f"request() supports psycopg Connection and SQLAlchemy Engine/Connection, not {type(conn).__name__}"
    )
