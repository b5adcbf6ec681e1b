"""Request context behind a real PgBouncer in transaction pooling mode.

Several application clients share fewer server connections, so consecutive transactions of one
client run on different backends and one backend serves many clients. Each way of naming a request
(``SET LOCAL cdc.request_id``, ``application_name`` as a startup parameter or set in the session,
the client helper, a failing client request) must tag exactly its own transaction's changes, and
nothing may leak to the next client of the same backend: every stored change's request id is
checked against the tag its client wrote into the row.

Needs Debian's ``pgbouncer`` (/usr/sbin/pgbouncer, installed by ``make system-deps``). Skipped
when it is missing, unless ``CI`` is set: then its absence is a failure.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from cdc import client
from cdc.cli import main as cli
from cdc.devdb import LocalPostgres
from cdc.errors import NotFoundError
from cdc.query import Store
from tests.capture_env import CaptureEnv, stored_mutations
from tests.pgbouncer import PGBOUNCER, PgBouncer, pgbouncer_available

POOL_SIZE = 2
CLIENTS = 6
ROUNDS = 10
# Round kinds: how a client names the request of one transaction.
KINDS = ("set_local", "startup_application_name", "set_application_name", "client", "none", "client_fails")


class CheckoutFailed(Exception):  # noqa: N818 - an application error, as applications name them
    pass


@pytest.fixture(scope="module")
def pgbouncer_binary() -> str:
    if pgbouncer_available():
        return PGBOUNCER
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{PGBOUNCER} is missing (apt-get install pgbouncer); CI is set, so this is a failure")
    pytest.skip(f"{PGBOUNCER} is missing (apt-get install pgbouncer)")


@pytest.fixture
def bouncer(pg: LocalPostgres, pgbouncer_binary: str) -> Iterator[PgBouncer]:
    with PgBouncer(pg, pool_mode="transaction", pool_size=POOL_SIZE, binary=pgbouncer_binary) as b:
        yield b


def pooled(bouncer: PgBouncer, dbname: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """An application connection through PgBouncer, as psycopg documents it for transaction
    pooling (no server-side prepared statements)."""
    return psycopg.connect(bouncer.dsn(dbname), autocommit=True, prepare_threshold=None, **kwargs)


def dbname_of(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"])


def streams_in_progress(env: CaptureEnv) -> bool:
    return env.pg.version >= 16


def _write(conn: psycopg.Connection[Any], row_id: int, tag: str, rng: random.Random) -> None:
    """Two statements in the current transaction, with a pause between them (other clients' transactions
    run on the other server connection meanwhile)."""
    conn.execute("INSERT INTO items (id, tag, n) VALUES (%s, %s, 0)", (row_id, tag))
    threading.Event().wait(rng.uniform(0, 0.004))
    conn.execute("UPDATE items SET n = n + 1 WHERE id = %s", (row_id,))


def _client(
    bouncer: PgBouncer,
    dbname: str,
    index: int,
    expected: dict[int, tuple[str, str]],
    errors: list[BaseException],
) -> None:
    rng = random.Random(index)
    try:
        with pooled(bouncer, dbname, application_name=f"app-{index}") as conn:
            for k in range(ROUNDS):
                kind = KINDS[(index + k) % len(KINDS)]
                row_id = index * 1000 + k
                rid = f"c{index}-{kind}-{k}"
                if kind == "set_local":
                    with conn.transaction():
                        conn.execute(sql.SQL("SET LOCAL cdc.request_id = {}").format(sql.Literal(rid)))
                        _write(conn, row_id, rid, rng)
                elif kind == "startup_application_name":
                    with pooled(bouncer, dbname, application_name=f"req:{rid}") as other, other.transaction():
                        _write(other, row_id, rid, rng)
                elif kind == "set_application_name":
                    conn.execute(sql.SQL("SET application_name = {}").format(sql.Literal(f"req:{rid}")))
                    with conn.transaction():
                        _write(conn, row_id, rid, rng)
                    conn.execute(sql.SQL("SET application_name = {}").format(sql.Literal(f"app-{index}")))
                elif kind == "client":
                    with client.request(conn, rid, actor=f"client-{index}"):
                        _write(conn, row_id, rid, rng)
                elif kind == "none":
                    with conn.transaction():
                        _write(conn, row_id, "", rng)
                else:
                    try:
                        with client.request(conn, rid, actor=f"client-{index}"):
                            _write(conn, row_id, rid, rng)
                            raise CheckoutFailed(f"checkout {rid} failed")
                    except CheckoutFailed:
                        pass
                expected[row_id] = (kind, rid if kind != "none" else "")
    except BaseException as exc:
        errors.append(exc)


def test_each_way_tags_its_own_request_and_nothing_leaks(capture: CaptureEnv, bouncer: PgBouncer) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, tag text NOT NULL, n int NOT NULL)")
    capture.setup()
    capture.start()
    dbname = dbname_of(capture.source_dsn)

    expected: dict[int, tuple[str, str]] = {}
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=_client, args=(bouncer, dbname, i, expected, errors), name=f"client-{i}")
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(expected) == CLIENTS * ROUNDS
    capture.wait_caught_up()

    changes = [m for m in stored_mutations(capture, "items") if m.op != "SNAPSHOT"]
    by_row: dict[int, list[Any]] = defaultdict(list)
    for m in changes:
        by_row[int(m.key["id"])].append(m)  # type: ignore[index]
    wrong = []
    pids_of_client: dict[int, set[int]] = defaultdict(set)
    clients_of_pid: dict[int, set[int]] = defaultdict(set)
    failed_attempts: list[int] = []
    for row_id, (kind, rid) in sorted(expected.items()):
        stored = by_row.get(row_id, [])
        ops = [m.op for m in stored]
        if kind != "client_fails":
            assert ops == ["INSERT", "UPDATE"], (row_id, kind, stored)
        elif streams_in_progress(capture):
            # The helper waits (bounded) for capture before rolling back: all of the attempt, unless
            # the machine was too slow for the bound; never more, never another request's.
            assert ops in (["INSERT", "UPDATE"], ["INSERT"], []), (row_id, kind, stored)
            failed_attempts.append(len(ops))
        else:
            assert ops == [], (row_id, kind, stored)
        for m in stored:
            tag = (m.after or {}).get("tag")
            assert tag == rid
            want = rid or None
            if m.request_id != want:
                wrong.append((row_id, kind, m.op, want, m.request_id, m.context))
            status = "rolled_back" if kind == "client_fails" else "committed"
            assert m.status == status, (row_id, kind, m.status)
            source = (m.context or {}).get("source")
            want_source = {
                "set_local": "setting",
                "startup_application_name": "application_name",
                "set_application_name": "application_name",
                "client": "client",
                "client_fails": "client",
                "none": "none",
            }[kind]
            if source != want_source:
                wrong.append((row_id, kind, m.op, "source", want_source, source))
            if m.context and kind != "startup_application_name":
                client_index = row_id // 1000
                pids_of_client[client_index].add(int(m.context["backend_pid"]))
                clients_of_pid[int(m.context["backend_pid"])].add(client_index)
    assert not wrong, "\n".join(map(str, wrong))
    assert not streams_in_progress(capture) or 2 in failed_attempts, failed_attempts
    # The pooler did pool: a few server connections, each serving several clients, and the
    # transactions of one client on more than one of them.
    assert len(clients_of_pid) <= POOL_SIZE, clients_of_pid
    assert any(len(c) > 1 for c in clients_of_pid.values()), clients_of_pid
    assert any(len(p) > 1 for p in pids_of_client.values()), pids_of_client

    # Each failed request: its own error, attributed to it (its session wrote its context, on
    # whichever server connection), visible in `cdc why`.
    failed = [rid for kind, rid in expected.values() if kind == "client_fails"]
    assert failed
    with Store(capture.store_dsn, schema=capture.schema) as store:
        for rid in failed:
            record = store.request(rid)
            assert record.error_type == "CheckoutFailed", (rid, record.errors)
            assert record.error_message == f"checkout {rid} failed"
            assert [e.attribution for e in record.errors] == ["own_session"], record.errors
    why = CliRunner().invoke(
        cli, ["why", failed[0], "--store", capture.store_dsn], env={"CDC_STORE__SCHEMA": capture.schema}
    )
    assert why.exit_code == 0, why.output
    assert f"checkout {failed[0]} failed" in why.output
    assert capture.stop() == 0


def _wait_for_error(store: Store, request_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if store.request(request_id).errors:
                return
        except NotFoundError:  # PostgreSQL < 16: the error is all that is stored of it
            pass
        assert time.monotonic() < deadline, f"no error stored for {request_id}"
        time.sleep(0.1)


def test_sql_failures_behind_the_pooler_are_reported_as_the_requests_own(
    capture: CaptureEnv, bouncer: PgBouncer
) -> None:
    """A statement that fails aborts the transaction: the helper reports after the rollback (its
    own transaction: on the same client connection, which the pooler may put on another server
    connection) or over a second connection (the caller's transaction). Either way the session
    token proves the error is the request's own, and no later transaction carries its context.

    With every server connection taken (one by the caller's aborted transaction), the second
    connection gets one only after the caller rolls back: the application waits no longer than
    ``report_wait_ms`` for it, and the report completes after the rollback."""
    with capture.source() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, tag text NOT NULL, n int NOT NULL)")
        conn.execute("INSERT INTO items VALUES (1, 'seed', 0)")
    capture.setup()
    capture.start()
    dbname = dbname_of(capture.source_dsn)
    with pooled(bouncer, dbname) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation), client.request(conn, "dup-owned"):
            conn.execute("UPDATE items SET n = n + 1 WHERE id = 1")
            conn.execute("INSERT INTO items VALUES (1, 'dup-owned', 0)")
        with pooled(bouncer, dbname) as busy, busy.transaction():
            busy.execute("SELECT 1")  # holds the other server connection meanwhile
            conn.autocommit = False
            started = time.monotonic()
            with pytest.raises(psycopg.errors.UniqueViolation), client.request(conn, "dup-caller"):
                conn.execute("INSERT INTO items VALUES (1, 'dup-caller', 0)")
            waited = time.monotonic() - started
            conn.rollback()
            conn.autocommit = True
        assert waited < 3, f"the failed request stalled the application for {waited:.1f} s"
        conn.execute("INSERT INTO items VALUES (2, '', 0)")  # no request: must not inherit one

    with Store(capture.store_dsn, schema=capture.schema) as store:
        _wait_for_error(store, "dup-caller")
        capture.wait_caught_up()
        for rid in ("dup-owned", "dup-caller"):
            record = store.request(rid)
            assert record.error_type == "UniqueViolation", (rid, record.errors)
            assert "duplicate key value" in (record.error_message or "")
            assert [(e.attribution, e.proven) for e in record.errors] == [("own_session", True)], (
                record.errors
            )
    changes = [m for m in stored_mutations(capture, "items") if m.op != "SNAPSHOT"]
    assert [(m.op, m.key, m.request_id) for m in changes if m.status == "committed"] == [
        ("INSERT", {"id": 2}, None)
    ]
    # Rolled-back attempts (PostgreSQL 16+, when the walsender decoded them before the abort: the
    # failed INSERTs' heap tuples too) carry their own request.
    for m in changes:
        if m.status == "rolled_back":
            want = "dup-owned" if m.op == "UPDATE" else (m.after or {}).get("tag")
            assert m.request_id == want, (m.op, m.after, m.request_id)
    assert capture.stop() == 0


def test_async_sql_failure_in_the_callers_transaction_does_not_stall_behind_a_full_pool(
    capture: CaptureEnv, bouncer: PgBouncer
) -> None:
    """arequest(): the same bounded wait for the second connection's report, without blocking the
    event loop (another task runs meanwhile), and the report lands after the rollback."""
    with capture.source() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, tag text NOT NULL, n int NOT NULL)")
        conn.execute("INSERT INTO items VALUES (1, 'seed', 0)")
    capture.setup()
    capture.start()
    dsn = bouncer.dsn(dbname_of(capture.source_dsn))

    async def scenario() -> tuple[float, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with (
            await psycopg.AsyncConnection.connect(dsn, prepare_threshold=None) as conn,
            await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=None) as busy,
            busy.transaction(),
        ):
            await busy.execute("SELECT 1")  # holds the other server connection
            task = asyncio.create_task(ticker())
            started = time.monotonic()
            with pytest.raises(psycopg.errors.UniqueViolation):
                async with client.arequest(conn, "dup-async"):
                    await conn.execute("INSERT INTO items VALUES (1, 'dup-async', 0)")
            waited = time.monotonic() - started
            task.cancel()
            await conn.rollback()
        return waited, ticks

    waited, ticks = asyncio.run(scenario())
    assert waited < 3, f"the failed request stalled the application for {waited:.1f} s"
    assert ticks > 10, "the event loop was blocked while the helper waited"
    with Store(capture.store_dsn, schema=capture.schema) as store:
        _wait_for_error(store, "dup-async")
        [error] = store.request("dup-async").errors
    assert (error.error_type, error.attribution, error.proven) == ("UniqueViolation", "own_session", True)
    assert capture.stop() == 0
