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

``arequest(aconn, ...)`` is the same for psycopg's AsyncConnection. ``WSGIMiddleware`` and
``ASGIMiddleware`` take the request id from a header (or make one), expose it through
:func:`current_request_id` and echo it in the response; ``request(conn)`` without an id uses it.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import json
import logging
import os
import re
import site
import sys
import sysconfig
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType
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
from cdc.errors import SetupError, error_text, reported_message

__all__ = [
    "ASGIMiddleware",
    "RequestScope",
    "WSGIMiddleware",
    "arequest",
    "configure",
    "current_request_id",
    "new_request_id",
    "request",
]

log = logging.getLogger("cdc.client")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("cdc_request_id", default=None)
# The request() scopes open in this context, innermost last: (id(connection), scope).
_open_scopes: contextvars.ContextVar[tuple[tuple[int, RequestScope], ...]] = contextvars.ContextVar(
    "cdc_open_scopes", default=()
)

_settings_prefix = "cdc"
#: The longest a failed request waits for capture before it rolls back (cdc.await_capture).
_capture_wait_ms = 2000
#: The longest a failed request waits for its error report over a second connection.
_report_wait_ms = 1000

#: Incoming request ids accepted from a header; anything else is replaced by a fresh id.
_HEADER_ID: Final = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_REPORT_CONNECT_TIMEOUT: Final = 5


def _milliseconds(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return min(value, 30_000)


def configure(
    *, settings_prefix: str = "cdc", capture_wait_ms: int = 2000, report_wait_ms: int = 1000
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
    frees it. Both are capped at 30 s."""
    global _settings_prefix, _capture_wait_ms, _report_wait_ms  # noqa: PLW0603 - process-wide configuration, set once at start-up
    capture = _milliseconds("capture_wait_ms", capture_wait_ms)
    report = _milliseconds("report_wait_ms", report_wait_ms)
    _settings_prefix = validate_setting_name(settings_prefix, "settings_prefix")
    _capture_wait_ms, _report_wait_ms = capture, report


def current_request_id() -> str | None:
    """The request id of the current HTTP request (set by the middlewares) or ``request()`` block."""
    return _request_id.get()


def new_request_id() -> str:
    """A fresh request id: 32 hex digits (uuid4)."""
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class RequestScope:
    """What ``request()`` yields: the request's identity and the connection to use.

    ``connection`` is the connection passed in, or, for a SQLAlchemy Engine, the Connection
    opened for the block. ``xid`` is the (64-bit) id of the transaction the context was
    written in. ``session_token`` (from ``cdc.emit_context()``) lets another connection report
    this session's error.
    """

    request_id: str
    actor: str | None
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    connection: Any = None
    xid: int | None = None
    session_token: str | None = field(default=None, repr=False)


# ============================================================================ SQL


def _prepare(
    request_id: str | None, actor: str | None, extra: Mapping[str, str]
) -> tuple[str, str | None, dict[str, str]]:
    rid = request_id if request_id else (_request_id.get() or new_request_id())
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
    return rid[:MAX_ID_CHARS], (actor[:MAX_ID_CHARS] if actor else None), clean


def _begin_params(rid: str, actor: str | None, extra: Mapping[str, str]) -> dict[str, Any]:
    prefix = _settings_prefix
    return {
        "k_rid": f"{prefix}.request_id",
        "k_actor": f"{prefix}.actor",
        "k_extra": f"{prefix}.",
        "k_emitted": EMITTED_SETTING,
        "rid": rid,
        "actor": actor or "",
        "actor_claim": actor,
        "extra": json.dumps(dict(extra), separators=(",", ":"), ensure_ascii=False),
    }


# One round trip: set the settings, emit the context through cdc.emit_context() (which stamps
# and signs it and returns the session token, column 4), with the extra settings the source is
# configured to record (context.extra_settings, through cdc.context_extra_json(): a `SET LOCAL
# cdc.tenant` made before the block is recorded too) under the ones given here, record the
# fingerprint the trigger
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
                             || CAST(%(extra)s AS jsonb) AS json),
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


# ============================================================================ error location

_THIS_FILE: Final = os.path.normcase(os.path.abspath(__file__))


def _library_dirs() -> tuple[str, ...]:
    dirs: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(path)
    with suppress(AttributeError):  # some virtualenv layouts have no getsitepackages()
        dirs.update(site.getsitepackages())
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user_site, str):
        dirs.add(user_site)
    return tuple(sorted({os.path.normcase(os.path.abspath(d)) for d in dirs}, key=len, reverse=True))


_LIBRARY_DIRS: Final = _library_dirs()


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen ...>, <string>
        return True
    path = os.path.normcase(os.path.abspath(filename))
    if path == _THIS_FILE:
        return True
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(path.startswith(d + os.sep) for d in _LIBRARY_DIRS)


def _display_path(filename: str) -> str:
    path = os.path.abspath(filename)
    cwd = os.getcwd()
    if path.startswith(cwd + os.sep):
        return os.path.relpath(path, cwd)
    best: str | None = None
    for entry in sys.path:
        root = os.path.abspath(entry or cwd)
        if path.startswith(root + os.sep):
            rel = os.path.relpath(path, root)
            if best is None or len(rel) < len(best):
                best = rel
    return best or os.path.basename(path)


def error_location(exc: BaseException) -> str | None:
    """``file.py:42`` of the innermost application frame in ``exc``'s traceback.

    Application frames are those outside this module, the standard library and installed
    packages; when there is none, the innermost frame outside this module is used.
    """
    tb: TracebackType | None = exc.__traceback__
    app: tuple[str, int] | None = None
    fallback: tuple[str, int] | None = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        lineno = tb.tb_lineno
        if os.path.normcase(os.path.abspath(filename)) != _THIS_FILE:
            fallback = (filename, lineno)
            if not _is_library(filename):
                app = (filename, lineno)
        tb = tb.tb_next
    chosen = app or fallback
    if chosen is None:
        return None
    return f"{_display_path(chosen[0])}:{chosen[1]}"


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


def _begin_sync(
    conn: psycopg.Connection[Any], rid: str, actor: str | None, extra: Mapping[str, str]
) -> tuple[int | None, str | None]:
    try:
        return _begun(conn.execute(_BEGIN_SQL, _begin_params(rid, actor, extra)).fetchone())
    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName) as exc:
        raise _not_set_up(exc) from exc


@contextmanager
def _psycopg_request(
    conn: psycopg.Connection[Any], rid: str, actor: str | None, extra: Mapping[str, str]
) -> Iterator[RequestScope]:
    owned = conn.autocommit
    deferred: BaseException | None = None
    scope = RequestScope(rid, actor, MappingProxyType(dict(extra)), conn)
    stack = _open_scopes.get()
    token = _open_scopes.set((*stack, (id(conn), scope)))
    rid_token = _request_id.set(rid)
    try:
        with conn.transaction() if owned else nullcontext():
            scope = RequestScope(rid, actor, scope.extra, conn, *_begin_sync(conn, rid, actor, extra))
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
        _request_id.reset(rid_token)
        _open_scopes.reset(token)


def _restore_outer_sync(conn: psycopg.Connection[Any], stack: tuple[tuple[int, RequestScope], ...]) -> None:
    """After a nested request() on the same connection, the outer request is current again."""
    if stack and stack[-1][0] == id(conn) and conn.info.transaction_status == TransactionStatus.INTRANS:
        outer = stack[-1][1]
        _begin_sync(conn, outer.request_id, outer.actor, outer.extra)


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
    conn: psycopg.AsyncConnection[Any], rid: str, actor: str | None, extra: Mapping[str, str]
) -> tuple[int | None, str | None]:
    try:
        cur = await conn.execute(_BEGIN_SQL, _begin_params(rid, actor, extra))
        return _begun(await cur.fetchone())
    except (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName) as exc:
        raise _not_set_up(exc) from exc


@asynccontextmanager
async def arequest(
    aconn: psycopg.AsyncConnection[Any],
    request_id: str | None = None,
    *,
    actor: str | None = None,
    **extra: str,
) -> AsyncIterator[RequestScope]:
    """``request()`` for a psycopg ``AsyncConnection``."""
    if not isinstance(aconn, psycopg.AsyncConnection):
        raise TypeError(f"arequest() needs a psycopg AsyncConnection, not {type(aconn).__name__}")
    rid, actor, clean = _prepare(request_id, actor, extra)
    owned = aconn.autocommit
    deferred: BaseException | None = None
    scope = RequestScope(rid, actor, MappingProxyType(dict(clean)), aconn)
    stack = _open_scopes.get()
    token = _open_scopes.set((*stack, (id(aconn), scope)))
    rid_token = _request_id.set(rid)
    try:
        async with aconn.transaction() if owned else nullcontext():
            scope = RequestScope(
                rid, actor, scope.extra, aconn, *(await _begin_async(aconn, rid, actor, clean))
            )
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
                    outer = stack[-1][1]
                    await _begin_async(aconn, outer.request_id, outer.actor, outer.extra)
    except Exception as exc:
        if deferred is not None and exc is deferred:
            await _emit_error_async(aconn, scope, exc)
        raise
    finally:
        _request_id.reset(rid_token)
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


def _sa_begin(
    sa_conn: Any, rid: str, actor: str | None, extra: Mapping[str, str]
) -> tuple[int | None, str | None]:
    return _begun(sa_conn.execute(_sa_text(_BEGIN_SQL), _begin_params(rid, actor, extra)).fetchone())


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
def _sqlalchemy_request(
    target: Any, rid: str, actor: str | None, extra: Mapping[str, str]
) -> Iterator[RequestScope]:
    sqlalchemy = importlib.import_module("sqlalchemy")
    if isinstance(target, sqlalchemy.engine.Engine):
        with target.begin() as sa_conn, _sqlalchemy_on(sa_conn, rid, actor, extra, owned=True) as scope:
            yield scope
        return
    if not isinstance(target, sqlalchemy.engine.Connection):
        raise TypeError(f"request() supports SQLAlchemy Engine and Connection, not {type(target).__name__}")
    if target.in_transaction():
        with _sqlalchemy_on(target, rid, actor, extra, owned=False) as scope:
            yield scope
    else:
        with target.begin(), _sqlalchemy_on(target, rid, actor, extra, owned=True) as scope:
            yield scope


@contextmanager
def _sqlalchemy_on(
    sa_conn: Any, rid: str, actor: str | None, extra: Mapping[str, str], *, owned: bool
) -> Iterator[RequestScope]:
    rid_token = _request_id.set(rid)
    try:
        scope = RequestScope(
            rid, actor, MappingProxyType(dict(extra)), sa_conn, *_sa_begin(sa_conn, rid, actor, extra)
        )
        try:
            yield scope
        except Exception as exc:
            if _mark_reported(exc):
                # Aborted or not, another pooled connection works; the same one only when usable.
                _sa_emit_error(sa_conn, scope, exc, usable=_sa_usable(sa_conn, exc))
            raise
    finally:
        _request_id.reset(rid_token)


# ============================================================================ request()


def request(
    conn: Any,
    request_id: str | None = None,
    *,
    actor: str | None = None,
    **extra: str,
) -> AbstractContextManager[RequestScope]:
    """Run a block of database work as request ``request_id`` (see the module documentation).

    ``conn``: a psycopg 3 ``Connection``, or a SQLAlchemy ``Engine`` or ``Connection`` (any
    PostgreSQL driver). ``request_id`` defaults to :func:`current_request_id`, else a fresh id.
    ``extra`` keys become ``cdc.<key>`` settings and the message's ``extra``. Yields a
    :class:`RequestScope`.
    """
    rid, actor, clean = _prepare(request_id, actor, extra)
    if isinstance(conn, psycopg.Connection):
        return _psycopg_request(conn, rid, actor, clean)
    if isinstance(conn, psycopg.AsyncConnection):
        raise TypeError("request() got an AsyncConnection: use `async with arequest(aconn, ...)`")
    if _is_sqlalchemy(conn):
        return _sqlalchemy_request(conn, rid, actor, clean)
    raise TypeError(
        f"request() supports psycopg Connection and SQLAlchemy Engine/Connection, not {type(conn).__name__}"
    )


# ============================================================================ middlewares

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ASGIApp = Callable[
    [Mapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


def _accept(value: str | None) -> str:
    if value is not None:
        value = value.strip()
        if _HEADER_ID.fullmatch(value):
            return value
    return new_request_id()


class _ContextIterable:
    """A WSGI response body iterated inside the request's context (so the id stays visible)."""

    def __init__(self, body: Iterable[bytes], ctx: contextvars.Context) -> None:
        self._body = body
        self._iter: Iterator[bytes] | None = None
        self._ctx = ctx

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iter is None:
            self._iter = self._ctx.run(iter, self._body)
        return self._ctx.run(next, self._iter)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if callable(close):
            self._ctx.run(close)


class WSGIMiddleware:
    """Take the request id from ``header`` (or make one), expose it, echo it in the response.

    The id is visible through :func:`current_request_id` while the application runs and while
    its response body is iterated, and in ``environ["cdc.request_id"]``. An incoming id that
    is not 1-128 characters of ``A-Z a-z 0-9 . _ : @ / + = -`` is replaced by a fresh one.
    """

    def __init__(self, app: WSGIApp, header: str = "X-Request-ID") -> None:
        self.app = app
        self.header = header
        self._environ_key = "HTTP_" + header.upper().replace("-", "_")

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        rid = _accept(environ.get(self._environ_key))
        environ["cdc.request_id"] = rid
        lowered = self.header.lower()

        def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers = [(k, v) for k, v in headers if k.lower() != lowered]
            headers.append((self.header, rid))
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        ctx = contextvars.copy_context()
        ctx.run(_request_id.set, rid)
        body = ctx.run(self.app, environ, _start_response)
        return _ContextIterable(body, ctx)


class ASGIMiddleware:
    """The ASGI version of :class:`WSGIMiddleware` (HTTP and WebSocket scopes).

    The id is also put in ``scope["state"]["request_id"]`` (Starlette's ``request.state``).
    """

    def __init__(self, app: Any, header: str = "X-Request-ID") -> None:
        self.app = app
        self.header = header
        self._header_bytes = header.lower().encode("latin-1")

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming: str | None = None
        for name, value in scope.get("headers") or ():
            if bytes(name).lower() == self._header_bytes:
                incoming = bytes(value).decode("latin-1")
                break
        rid = _accept(incoming)
        new_scope = dict(scope)
        state = dict(scope.get("state") or {})
        state["request_id"] = rid
        new_scope["state"] = state
        echo = (self._header_bytes, rid.encode("latin-1"))

        async def _send(message: Mapping[str, Any]) -> None:
            if message.get("type") in ("http.response.start", "websocket.accept"):
                headers = [
                    (k, v) for k, v in message.get("headers") or () if bytes(k).lower() != self._header_bytes
                ]
                headers.append(echo)
                message = {**message, "headers": headers}
            await send(message)

        token = _request_id.set(rid)
        try:
            await self.app(new_scope, receive, _send)
        finally:
            _request_id.reset(token)
