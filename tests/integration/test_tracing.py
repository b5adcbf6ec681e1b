"""W3C trace context end to end: an HTTP request's ``traceparent`` through the WSGI and ASGI
middlewares and the client helper, into the signed context message, through the daemon into the
store, and out again in ``cdc why``, the API, the request page and the Python API."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from cdc import client
from cdc.cli import main as cli
from cdc.query import Store
from cdc.web import create_app
from tests.capture_env import CaptureEnv, stored_mutations

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"
TRACE2 = "0af7651916cd43dd8448eb211c80319c"
SPAN2 = "b7ad6b7169203331"


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def shop(capture: CaptureEnv) -> CaptureEnv:
    capture.extra_env["CDC_CONTEXT__EXTRA_SETTINGS"] = "tenant,traceparent"
    with capture.source() as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text)")
        conn.execute("INSERT INTO orders SELECT g, 'new' FROM generate_series(1, 9) g")
    capture.setup()
    capture.start()
    return capture


@pytest.fixture
def wsgi_url(shop: CaptureEnv) -> Iterator[str]:
    """A WSGI application behind cdc's middleware, served over HTTP on 127.0.0.1 (wsgiref):
    ``/orders/<id>/<status>`` updates an order inside ``client.request(conn)``; under
    ``/by-trace/`` the request id is the trace id."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        _, _, order, status = environ["PATH_INFO"].strip("/").split("/")
        with psycopg.connect(shop.source_dsn, autocommit=True) as conn, client.request(conn) as scope:
            conn.execute("UPDATE orders SET status = %s WHERE id = %s", (status, int(order)))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"{scope.request_id} {scope.trace.trace_id if scope.trace else '-'}".encode()]

    by_header = client.WSGIMiddleware(app)
    by_trace = client.WSGIMiddleware(app, request_id_from_trace=True)

    def route(environ: dict[str, Any], start_response: Any) -> Any:
        chosen = by_trace if environ["PATH_INFO"].startswith("/by-trace/") else by_header
        return chosen(environ, start_response)

    server: WSGIServer = make_server("127.0.0.1", 0, route, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def get(url: str, headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return response.read().decode(), dict(response.headers)


def test_wsgi_traceparent_reaches_the_store_why_api_and_page(shop: CaptureEnv, wsgi_url: str) -> None:
    body, headers = get(
        f"{wsgi_url}/x/orders/1/paid", {"X-Request-ID": "req-traced", "traceparent": TRACEPARENT}
    )
    assert body == f"req-traced {TRACE}" and headers["X-Request-ID"] == "req-traced"
    body, headers = get(f"{wsgi_url}/by-trace/orders/2/paid", {"traceparent": f"00-{TRACE2}-{SPAN2}-00"})
    assert body == f"{TRACE2} {TRACE2}" and headers["X-Request-ID"] == TRACE2
    # An invalid traceparent is ignored: no trace, no error for the application.
    body, _ = get(
        f"{wsgi_url}/by-trace/orders/3/paid", {"X-Request-ID": "req-bad", "traceparent": TRACEPARENT.upper()}
    )
    assert body == "req-bad -"
    # SQL applications: SET LOCAL cdc.traceparent, recorded because context.extra_settings names it.
    with shop.source() as conn, conn.transaction():
        conn.execute("SET LOCAL cdc.request_id = 'req-sql'")
        conn.execute(f"SET LOCAL cdc.traceparent = '00-{TRACE2}-{SPAN}-01'")
        conn.execute("UPDATE orders SET status = 'sql' WHERE id = 4")
    shop.wait_caught_up()

    stored = {m.key["id"]: m for m in stored_mutations(shop, "orders") if m.op == "UPDATE"}  # type: ignore[index]
    assert stored[1].request_id == "req-traced"
    assert (stored[1].context or {})["trace_id"] == TRACE and (stored[1].context or {})["span_id"] == SPAN
    assert "traceparent" not in (stored[1].context or {}).get("extra", {})
    assert stored[2].request_id == TRACE2 and (stored[2].context or {})["span_id"] == SPAN2
    assert stored[3].request_id == "req-bad" and "trace_id" not in (stored[3].context or {})
    assert stored[4].request_id == "req-sql" and (stored[4].context or {})["trace_id"] == TRACE2
    assert (stored[4].context or {})["source"] == "setting"

    with Store(shop.store_dsn, schema=shop.schema) as store:
        record = store.request("req-traced")
    assert (record.trace_id, record.span_id, record.traces) == (TRACE, SPAN, ((TRACE, SPAN),))

    why = CliRunner().invoke(cli, ["why", "req-traced", "--store", shop.store_dsn])
    assert why.exit_code == 0, why.output
    assert "TRACE" in why.output and f"{TRACE}  span {SPAN}" in why.output
    by_trace = CliRunner().invoke(cli, ["why", TRACE2, "--store", shop.store_dsn, "--format", "json"])
    assert by_trace.exit_code == 0, by_trace.output
    assert f'"trace_id": "{TRACE2}"' in by_trace.output and f'"span_id": "{SPAN2}"' in by_trace.output
    untraced = CliRunner().invoke(cli, ["why", "req-bad", "--store", shop.store_dsn])
    assert untraced.exit_code == 0 and "TRACE" not in untraced.output

    with TestClient(create_app(shop.store_dsn, open_access=True)) as web:
        data = web.get("/api/v1/requests/req-traced").json()
        assert (data["trace_id"], data["span_id"]) == (TRACE, SPAN)
        assert data["traces"] == [{"trace_id": TRACE, "span_id": SPAN}]
        assert data["context"]["trace_id"] == TRACE
        assert web.get("/api/v1/requests/req-bad").json()["trace_id"] is None
        page = web.get("/requests/req-traced")
        assert page.status_code == 200
        assert "trace id" in page.text and TRACE in page.text and SPAN in page.text
    assert shop.stop() == 0


def test_asgi_traceparent_with_a_failing_async_request(shop: CaptureEnv) -> None:
    """The ASGI middleware and arequest(): the trace of a request that fails (the application's
    exception rolls its transaction back) is recorded with its context and its error."""

    class PaymentDeclinedError(Exception):
        pass

    async def pay(request: Request) -> PlainTextResponse:
        order = int(request.path_params["order"])
        async with await psycopg.AsyncConnection.connect(shop.source_dsn, autocommit=True) as conn:
            try:
                async with client.arequest(conn, actor="billing"):
                    await conn.execute("UPDATE orders SET status = 'paying' WHERE id = %s", (order,))
                    if order == 6:
                        raise PaymentDeclinedError("card declined")
            except PaymentDeclinedError:
                return PlainTextResponse("declined", status_code=402)
        return PlainTextResponse("ok")

    app = client.ASGIMiddleware(Starlette(routes=[Route("/pay/{order}", pay, methods=["POST"])]))
    with TestClient(app) as web:
        ok = web.post("/pay/5", headers={"X-Request-ID": "req-async", "traceparent": TRACEPARENT})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-async"
        declined = web.post(
            "/pay/6", headers={"X-Request-ID": "req-declined", "traceparent": f"00-{TRACE2}-{SPAN2}-01"}
        )
        assert declined.status_code == 402
    shop.wait_caught_up()

    with Store(shop.store_dsn, schema=shop.schema) as store:
        done = store.request("req-async")
        failed = store.request("req-declined")
    assert done.traces == ((TRACE, SPAN),) and done.outcome == "committed"
    assert failed.error_type == "PaymentDeclinedError" and failed.error_message == "card declined"
    why = CliRunner().invoke(cli, ["why", "req-declined", "--store", shop.store_dsn])
    assert why.exit_code == 0, why.output
    assert "card declined" in why.output
    if shop.pg.version >= 16 and failed.mutations:
        # The helper waited (bounded) for capture before the rollback: the attempt and its context.
        assert failed.traces == ((TRACE2, SPAN2),) and failed.outcome == "rolled_back"
        assert [(m.status, (m.context or {}).get("trace_id")) for m in failed.mutations] == [
            ("rolled_back", TRACE2)
        ]
        assert f"{TRACE2}  span {SPAN2}" in why.output
    else:
        # PostgreSQL 14-15 do not stream a small transaction that rolls back (nor does 16+ when
        # capture lagged past the helper's bound): its context, and so its trace, is never
        # decoded; the reported error is all that is stored of the request.
        assert failed.traces == () and failed.context is None
    assert shop.stop() == 0
