"""The application-side helper (cdc.client) on a real server: request(), arequest(), the
SQLAlchemy support and the WSGI/ASGI middlewares."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc import client
from cdc.context import (
    CONTEXT_PREFIX,
    DEFAULT_APPLICATION_NAME_PATTERN,
    ERROR_PREFIX,
    ContextKeys,
    parse_context,
    parse_error,
)
from cdc.devdb import LocalPostgres
from cdc.source_context import install_context, read_context_keys

HAS_SQLALCHEMY = importlib.util.find_spec("sqlalchemy") is not None


class PaymentTimeout(Exception):  # noqa: N818 - the seed's error type
    pass


# ============================================================================ WAL reading


@dataclass(frozen=True)
class Item:
    kind: str  # BEGIN, COMMIT, message, change
    text: str
    transactional: bool = False
    prefix: str = ""
    content: str = ""
    keys: ContextKeys | None = None  # the source's signing keys, to verify the messages


_MESSAGE = re.compile(r"message: transactional: (\d) prefix: ([^,]*), sz: \d+ content:(.*)", re.S)


class Slot:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.name = f"cl_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [self.name])

    def items(self) -> list[Item]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET synchronous_commit = on")  # decoding stops at the flushed WAL
            conn.execute("SELECT pg_logical_emit_message(true, 'test.flush', '')")
            rows = conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", [self.name])
            keys = read_context_keys(conn)
            out: list[Item] = []
            for (line,) in rows:
                if line.startswith(("BEGIN", "COMMIT")):
                    out.append(Item(line.split()[0], line))
                elif m := _MESSAGE.match(line):
                    if m.group(2) != "test.flush":
                        out.append(Item("message", line, m.group(1) == "1", m.group(2), m.group(3), keys))
                else:
                    out.append(Item("change", line))
            return out


def shape(items: list[Item]) -> list[str]:
    """Context messages as 'ctx:<source>:<request_id>', errors as 'error:<request_id>', changes
    as 'change'; transactions as '[' ... ']' (empty ones dropped)."""
    out: list[str] = []
    for i in items:
        if i.kind == "BEGIN":
            out.append("[")
        elif i.kind == "COMMIT":
            if out and out[-1] == "[":
                out.pop()
            else:
                out.append("]")
        elif i.kind == "change":
            out.append("change")
        elif i.prefix == CONTEXT_PREFIX:
            ctx = parse_context(i.content.encode(), i.keys)
            out.append(f"ctx:{ctx.source}:{ctx.request_id}")
        elif i.prefix == ERROR_PREFIX:
            out.append(f"error:{parse_error(i.content.encode(), i.keys).request_id}")
    return out


def contexts(items: list[Item]) -> list[Any]:
    return [parse_context(i.content.encode(), i.keys) for i in items if i.prefix == CONTEXT_PREFIX]


def errors(items: list[Item]) -> list[Any]:
    found = [i for i in items if i.prefix == ERROR_PREFIX]
    assert all(not i.transactional for i in found)
    return [parse_error(i.content.encode(), i.keys) for i in found]


# ============================================================================ fixtures


@pytest.fixture
def source(pg: LocalPostgres, fresh_dbname: str) -> Iterator[str]:
    dsn = pg.create_database(fresh_dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        conn.execute("CREATE TABLE plain (id int PRIMARY KEY, v text)")  # no trigger on this one
        install_context(conn, [("public", "t")], application_name_pattern=DEFAULT_APPLICATION_NAME_PATTERN)
    yield dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        for (name,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        ):
            conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
        conn.execute("DROP EVENT TRIGGER IF EXISTS cdc_context_attach")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(fresh_dbname)))


@pytest.fixture
def slot(source: str) -> Slot:
    return Slot(source)


def value(dsn: str, id_: int = 1) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT v FROM t WHERE id = %s", [id_]).fetchone()
        assert row is not None
        return str(row[0])


# ============================================================================ request(): psycopg


def test_context_message_with_source_client(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True, application_name="web-1") as conn:
        with client.request(conn, "r-client", actor="bob", tenant="acme") as scope:
            assert client.current_request_id() == "r-client"
            conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
            conn.execute("UPDATE t SET v = 'y' WHERE id = 2")  # the trigger stays quiet
            settings = conn.execute(
                "SELECT current_setting('cdc.request_id'), current_setting('cdc.actor'), current_setting('cdc.tenant')"
            ).fetchone()
        assert client.current_request_id() is None
        assert settings == ("r-client", "bob", "acme")
        assert scope.request_id == "r-client" and scope.connection is conn and scope.xid
        # transaction-local: nothing is left in the session (safe behind a pooler)
        after = conn.execute(
            "SELECT current_setting('cdc.request_id', true), current_setting('cdc.tenant', true)"
        )
        assert after.fetchone() in (("", ""), (None, None))
    items = slot.items()
    assert shape(items) == ["[", "ctx:client:r-client", "change", "change", "]"]
    (ctx,) = contexts(items)
    assert (ctx.actor, dict(ctx.extra), ctx.application_name, ctx.db_user) == (
        "bob",
        {"tenant": "acme"},
        "web-1",
        "postgres",
    )
    assert ctx.client_addr == "127.0.0.1" and ctx.backend_pid > 0
    assert value(source) == "x"  # committed


def test_configured_extra_settings_recorded_by_the_helper(source: str, slot: Slot) -> None:
    """context.extra_settings: what the session set (SET LOCAL before the block) is recorded
    too, under what the block names itself; unset names are left out."""
    with psycopg.connect(source, autocommit=True) as conn:
        install_context(conn, [("public", "t")], extra_settings=["tenant", "region", "shard"])
    with psycopg.connect(source) as conn:  # the caller's transaction
        conn.execute("SET LOCAL cdc.region = 'eu'")
        conn.execute("SET LOCAL cdc.tenant = 'from-session'")
        with client.request(conn, "r-extras", tenant="acme"):
            conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
    (ctx,) = contexts(slot.items())
    assert dict(ctx.extra) == {"tenant": "acme", "region": "eu"}


def test_in_the_callers_transaction(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:  # not autocommit: request() uses the open transaction
        conn.execute("UPDATE t SET v = 'before' WHERE id = 2")
        with client.request(conn, "r-open"):
            conn.execute("UPDATE t SET v = 'inside' WHERE id = 1")
        # not committed by request(): the caller owns the transaction
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.commit()
    assert shape(slot.items()) == ["[", "ctx:none:None", "change", "ctx:client:r-open", "change", "]"]


def test_nested_requests_restore_the_outer_context(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn, client.request(conn, "outer"):
        conn.execute("UPDATE t SET v = 'o1' WHERE id = 1")
        with client.request(conn, "inner"):
            assert client.current_request_id() == "inner"
            conn.execute("UPDATE t SET v = 'i' WHERE id = 2")
        assert client.current_request_id() == "outer"
        conn.execute("UPDATE t SET v = 'o2' WHERE id = 1")
    assert shape(slot.items()) == [
        "[", "ctx:client:outer", "change", "ctx:client:inner", "change", "ctx:client:outer", "change", "]",
    ]  # fmt: skip


def test_raising_block_reports_the_error_and_rolls_back(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        with pytest.raises(PaymentTimeout), client.request(conn, "r-fail", actor="billing") as scope:
            conn.execute("UPDATE t SET v = 'lost' WHERE id = 1")
            line = sys._getframe().f_lineno + 1
            raise PaymentTimeout("Stripe API timeout after 10s")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert value(source) == "a"  # rolled back
    items = slot.items()
    assert shape(items) == ["error:r-fail"]  # the rolled-back transaction is not decoded; the error is
    (err,) = errors(items)
    assert (err.error_type, err.message, err.actor) == (
        "PaymentTimeout",
        "Stripe API timeout after 10s",
        "billing",
    )
    assert err.location == f"tests/integration/test_client.py:{line}"
    assert err.xid == scope.xid and err.xid is not None
    assert err.at.tzinfo is not None


def test_failed_request_waits_for_the_capture_before_rolling_back(source: str, slot: Slot) -> None:
    # cdc setup installs cdc.await_capture() (sql/await_capture.sql); a stand-in counts the calls
    # with a sequence (not rolled back) and checks it is called before the rollback.
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE SEQUENCE await_calls")
        conn.execute(
            "CREATE FUNCTION cdc.await_capture(target pg_lsn, timeout_ms integer DEFAULT 2000) RETURNS boolean"
            " LANGUAGE sql AS $$ SELECT nextval('await_calls') > 0"
            " AND target <= pg_current_wal_insert_lsn() AND txid_current_if_assigned() IS NOT NULL $$"
        )
        with pytest.raises(PaymentTimeout), client.request(conn, "r-wait"):
            conn.execute("UPDATE t SET v = 'lost' WHERE id = 1")
            raise PaymentTimeout("late")
        with pytest.raises(psycopg.errors.DivisionByZero), client.request(conn, "r-no-wait"):
            conn.execute("SELECT 1 / 0")  # aborted already: waiting would not help
        calls = conn.execute("SELECT last_value, is_called FROM await_calls").fetchone()
    assert calls == (1, True)
    assert [e.request_id for e in errors(slot.items())] == ["r-wait", "r-no-wait"]


def test_sql_error_inside_the_block_still_reports(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), client.request(conn, "r-div"):
            conn.execute("UPDATE t SET v = 'lost' WHERE id = 1")
            line = sys._getframe().f_lineno + 1
            conn.execute("SELECT 1 / 0")
        conn.execute("SELECT 1")  # usable again
    assert value(source) == "a"
    (err,) = errors(slot.items())
    assert (err.error_type, err.request_id) == ("DivisionByZero", "r-div")
    assert "division by zero" in err.message
    assert err.location == f"tests/integration/test_client.py:{line}"


def test_sql_error_in_the_callers_transaction_reports_over_another_connection(
    source: str, slot: Slot
) -> None:
    with psycopg.connect(source) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero), client.request(conn, "r-caller"):
            conn.execute("UPDATE t SET v = 'lost' WHERE id = 1")
            conn.execute("SELECT 1 / 0")
        # request() does not roll back a transaction it does not own
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
    (err,) = errors(slot.items())
    assert (err.error_type, err.request_id) == ("DivisionByZero", "r-caller")


def test_python_error_in_the_callers_transaction(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:
        with pytest.raises(KeyError), client.request(conn, "r-key"):
            conn.execute("UPDATE t SET v = 'kept?' WHERE id = 1")
            raise KeyError("plan")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.rollback()
    (err,) = errors(slot.items())
    assert (err.error_type, err.message) == ("KeyError", "'plan'")


def test_nested_error_is_reported_once(source: str, slot: Slot) -> None:
    with (
        psycopg.connect(source, autocommit=True) as conn,
        pytest.raises(ValueError, match="once"),
        client.request(conn, "outer"),
        client.request(conn, "inner"),
    ):
        raise ValueError("once")
    assert [e.request_id for e in errors(slot.items())] == ["inner"]


def test_error_reporting_never_masks_the_error(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> str:
        raise OSError("the report cannot be written")

    monkeypatch.setattr(client, "_error_params", broken)
    with psycopg.connect(source, autocommit=True) as conn:
        with pytest.raises(RuntimeError, match="original"), client.request(conn, "r-x"):
            raise RuntimeError("original")
        with pytest.raises(psycopg.errors.DivisionByZero), client.request(conn, "r-y"):
            conn.execute("SELECT 1 / 0")


def test_table_without_trigger_still_gets_the_context(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn, client.request(conn, "r-plain"):
        conn.execute("INSERT INTO plain VALUES (1, 'x')")
    assert shape(slot.items()) == ["[", "ctx:client:r-plain", "change", "]"]


def test_request_id_defaults(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        with client.request(conn) as scope:
            conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        assert re.fullmatch(r"[0-9a-f]{32}", scope.request_id)
        token = client._request_id.set("from-middleware")
        try:
            with client.request(conn) as scope2:
                pass
        finally:
            client._request_id.reset(token)
        assert scope2.request_id == "from-middleware"
    assert [c.request_id for c in contexts(slot.items())] == [scope.request_id, "from-middleware"]


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="psycopg Connection"):
        client.request(object(), "r")
    with pytest.raises(ValueError, match="reserved"):
        client.request(object(), "r", _emitted="x")
    with pytest.raises(ValueError, match="extra context key"):
        client.request(object(), "r", **{"not-valid": "x"})
    with pytest.raises(TypeError, match="must be a string"):
        client.request(object(), "r", tenant=3)  # type: ignore[arg-type]
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="report_wait_ms"):
            client.configure(report_wait_ms=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="capture_wait_ms"):
            client.configure(capture_wait_ms=bad)  # type: ignore[arg-type]


def test_configured_settings_prefix(source: str) -> None:
    client.configure(settings_prefix="app")
    try:
        with psycopg.connect(source, autocommit=True) as conn, client.request(conn, "r-app"):
            row = conn.execute(
                "SELECT current_setting('app.request_id', true), current_setting('cdc.request_id', true)"
            )
            assert row.fetchone() in (("r-app", None), ("r-app", ""))
    finally:
        client.configure(settings_prefix="cdc")


# ============================================================================ arequest()


def test_async_request(source: str, slot: Slot) -> None:
    async def main() -> int | None:
        async with await psycopg.AsyncConnection.connect(source, autocommit=True) as aconn:
            async with client.arequest(aconn, "r-async", actor="worker") as scope:
                assert client.current_request_id() == "r-async"
                await aconn.execute("UPDATE t SET v = 'async' WHERE id = 1")
            with pytest.raises(psycopg.errors.DivisionByZero):
                async with client.arequest(aconn, "r-async-fail"):
                    await aconn.execute("UPDATE t SET v = 'lost' WHERE id = 2")
                    await aconn.execute("SELECT 1 / 0")
            return scope.xid

    xid = asyncio.run(main())
    assert xid is not None
    items = slot.items()
    assert shape(items) == ["[", "ctx:client:r-async", "change", "]", "error:r-async-fail"]
    (err,) = errors(items)
    assert err.error_type == "DivisionByZero" and err.location and "test_client.py:" in err.location
    assert value(source) == "async" and value(source, 2) == "b"


def test_async_needs_an_async_connection(source: str) -> None:
    async def main() -> None:
        with psycopg.connect(source) as conn, pytest.raises(TypeError, match="AsyncConnection"):
            async with client.arequest(conn, "r"):  # type: ignore[arg-type]
                pass
        async with await psycopg.AsyncConnection.connect(source) as aconn:
            with pytest.raises(TypeError, match="arequest"):
                client.request(aconn, "r")

    asyncio.run(main())


# ============================================================================ SQLAlchemy


@pytest.mark.skipif(not HAS_SQLALCHEMY, reason="sqlalchemy is not installed")
def test_sqlalchemy_engine_and_connection(source: str, slot: Slot) -> None:
    import sqlalchemy as sa

    url = sa.engine.make_url("postgresql+psycopg://")
    params = psycopg.conninfo.conninfo_to_dict(source)
    url = url.set(
        host=params["host"], port=int(params["port"]), database=params["dbname"], username=params["user"]
    )
    engine = sa.create_engine(url)
    try:
        with client.request(engine, "r-engine") as scope:
            scope.connection.execute(sa.text("UPDATE t SET v = 'engine' WHERE id = 1"))
        with engine.connect() as conn:
            with client.request(conn, "r-conn"):  # not in a transaction: request() begins and commits one
                conn.execute(sa.text("UPDATE t SET v = 'conn' WHERE id = 2"))
            conn.execute(sa.text("SELECT 1"))
            with client.request(conn, "r-open"):  # in the caller's transaction
                conn.execute(sa.text("UPDATE t SET v = 'open' WHERE id = 2"))
            conn.rollback()
            with pytest.raises(sa.exc.DBAPIError), client.request(conn, "r-sa-fail"):
                conn.execute(sa.text("SELECT 1 / 0"))
            with pytest.raises(PaymentTimeout), client.request(engine, "r-sa-py"):
                raise PaymentTimeout("late")
    finally:
        engine.dispose()
    items = slot.items()
    assert shape(items) == [
        "[", "ctx:client:r-engine", "change", "]",
        "[", "ctx:client:r-conn", "change", "]",
        "error:r-sa-fail",
        "error:r-sa-py",
    ]  # fmt: skip
    assert [e.error_type for e in errors(items)] == ["DivisionByZero", "PaymentTimeout"]
    assert value(source) == "engine" and value(source, 2) == "conn"


# ============================================================================ trace context

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_traceparent_is_signed_with_the_context(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        with client.request(conn, "r-traced", traceparent=f"00-{TRACE}-{SPAN}-01") as scope:
            assert (
                scope.trace == client.TraceContext(TRACE, SPAN, 1) and client.current_trace() == scope.trace
            )
            conn.execute("UPDATE t SET v = 'traced' WHERE id = 1")
            with client.request(conn, "r-inner"):  # inherits the trace of the enclosing request
                conn.execute("UPDATE t SET v = 'inner' WHERE id = 2")
        assert client.current_trace() is None
        with client.request(conn, "r-invalid", traceparent=f"00-{TRACE.upper()}-{SPAN}-01") as scope:
            assert scope.trace is None  # ignored: no error
            conn.execute("UPDATE t SET v = 'invalid' WHERE id = 1")
        other = client.TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", 0)
        client.configure(request_id_from_trace=True)
        try:
            with client.request(conn, traceparent=other) as scope:
                conn.execute("UPDATE t SET v = 'by-trace' WHERE id = 1")
            assert scope.request_id == other.trace_id
        finally:
            client.configure()
    found = [(c.request_id, c.trace_id, c.span_id, dict(c.extra)) for c in contexts(slot.items())]
    assert found == [
        ("r-traced", TRACE, SPAN, {}),
        ("r-inner", TRACE, SPAN, {}),
        ("r-traced", TRACE, SPAN, {}),  # the outer request again after the nested one
        ("r-invalid", None, None, {}),
        (other.trace_id, other.trace_id, other.span_id, {}),
    ]


@pytest.mark.skipif(not HAS_SQLALCHEMY, reason="sqlalchemy is not installed")
def test_sqlalchemy_request_records_the_trace(source: str, slot: Slot) -> None:
    import sqlalchemy as sa

    params = psycopg.conninfo.conninfo_to_dict(source)
    url = sa.engine.make_url("postgresql+psycopg://").set(
        host=params["host"], port=int(params["port"]), database=params["dbname"], username=params["user"]
    )
    engine = sa.create_engine(url)
    try:
        with client.request(engine, "r-sa-trace", traceparent=f"00-{TRACE}-{SPAN}-01") as scope:
            scope.connection.execute(sa.text("UPDATE t SET v = 'sa' WHERE id = 1"))
    finally:
        engine.dispose()
    [ctx] = contexts(slot.items())
    assert (ctx.request_id, ctx.trace_id, ctx.span_id) == ("r-sa-trace", TRACE, SPAN)


# ============================================================================ middlewares


def _wsgi_app(seen: list[Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        seen.append(("app", client.current_request_id(), environ["cdc.request_id"]))
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Request-ID", "stale")])

        def body() -> Iterator[bytes]:
            seen.append(("body", client.current_request_id()))
            yield b"ok"

        return body()

    return app


def test_wsgi_middleware() -> None:
    seen: list[Any] = []
    mw = client.WSGIMiddleware(_wsgi_app(seen))
    responses: list[Any] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        responses.append((status, headers))

    body = mw({"HTTP_X_REQUEST_ID": "abc-123"}, start_response)
    assert b"".join(body) == b"ok"
    assert client.current_request_id() is None  # nothing leaks out of the request
    assert seen == [("app", "abc-123", "abc-123"), ("body", "abc-123")]
    status, headers = responses[0]
    assert status == "200 OK"
    assert [v for k, v in headers if k.lower() == "x-request-id"] == ["abc-123"]

    seen.clear()
    for environ in ({}, {"HTTP_X_REQUEST_ID": "bad\r\nheader"}, {"HTTP_X_REQUEST_ID": "x" * 200}):
        b"".join(mw(environ, start_response))
        rid = seen[-2][1]
        assert re.fullmatch(r"[0-9a-f]{32}", rid)
        assert responses[-1][1][-1] == ("X-Request-ID", rid)

    custom = client.WSGIMiddleware(_wsgi_app(seen), header="X-Correlation-ID")
    b"".join(custom({"HTTP_X_CORRELATION_ID": "corr-1"}, start_response))
    assert seen[-1] == ("body", "corr-1")
    assert ("X-Correlation-ID", "corr-1") in responses[-1][1]


def test_asgi_middleware() -> None:
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((client.current_request_id(), scope["state"]["request_id"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-request-id", b"stale")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def run(headers: list[tuple[bytes, bytes]], header: str = "X-Request-ID") -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        mw = client.ASGIMiddleware(app, header=header)
        await mw({"type": "http", "headers": headers}, receive, send)
        assert client.current_request_id() is None
        return sent

    sent = asyncio.run(run([(b"x-request-id", b"req-9")]))
    assert seen[-1] == ("req-9", "req-9")
    assert sent[0]["headers"] == [(b"x-request-id", b"req-9")]
    assert sent[1] == {"type": "http.response.body", "body": b"ok"}

    sent = asyncio.run(run([]))
    rid = seen[-1][0]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert sent[0]["headers"] == [(b"x-request-id", rid.encode())]

    sent = asyncio.run(run([(b"X-Trace", b"t-1")], header="X-Trace"))
    assert seen[-1][0] == "t-1"
    assert (b"x-trace", b"t-1") in sent[0]["headers"]

    async def lifespan() -> None:
        called: list[str] = []

        async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
            called.append(scope["type"])

        await client.ASGIMiddleware(inner)({"type": "lifespan"}, receive, None)
        assert called == ["lifespan"]

    asyncio.run(lifespan())


def test_middleware_id_reaches_request(source: str, slot: Slot) -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with psycopg.connect(source, autocommit=True) as conn, client.request(conn):
            conn.execute("UPDATE t SET v = 'web' WHERE id = 1")
        start_response("204 No Content", [])
        return []

    list(client.WSGIMiddleware(app)({"HTTP_X_REQUEST_ID": "web-42"}, lambda *a: None))
    assert [c.request_id for c in contexts(slot.items())] == ["web-42"]
