"""Least privileges (sql/grants.sql, docs/security.md) and secrets kept out of logs, metrics
and `cdc status`.

Each flavor gets its own throwaway server: the roles grants.sql creates are cluster-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from cdc import History
from cdc.cli import main as cli
from cdc.devdb import LocalPostgres
from tests.capture_env import CaptureEnv, rebuild, source_rows
from tests.conftest import _pg_params
from tests.faults.proxy import Proxy
from tests.integration.test_durability import DaemonProcess

GRANTS = Path(__file__).resolve().parents[2] / "sql" / "grants.sql"
SCHEMA = "cdc_history"


@pytest.fixture(scope="module", params=_pg_params())
def server(request: pytest.FixtureRequest) -> Iterator[LocalPostgres]:
    from cdc.errors import SetupError

    if isinstance(request.param, SetupError):
        pytest.fail(str(request.param), pytrace=False)
    pg = LocalPostgres(flavor=request.param)
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()


def apply_grants(dsn: str, **settings: str) -> None:
    """What an operator does: set cdc_grants.* for the session, run the file as a superuser."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, value in settings.items():
            conn.execute("SELECT set_config(%s, %s, false)", (f"cdc_grants.{name}", value))
        conn.execute(GRANTS.read_text(encoding="utf-8").encode())


def databases(pg: LocalPostgres) -> tuple[str, str, str]:
    suffix = uuid.uuid4().hex[:8]
    source, store = f"src_{suffix}", f"store_{suffix}"
    pg.create_database(source)
    pg.create_database(store)
    return source, store, suffix


APP_SCHEMA = """
CREATE TABLE public.orders (id int PRIMARY KEY, status text);
CREATE TABLE public.lines (order_id int, line int, qty int, PRIMARY KEY (order_id, line));
CREATE TABLE public.notes (body text);
ALTER TABLE public.notes REPLICA IDENTITY FULL;
INSERT INTO public.orders VALUES (1, 'new'), (2, 'new');
"""
TABLES = ("public.orders", "public.lines", "public.notes")


def app_changes(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO orders VALUES (3, 'new')")
        conn.execute("UPDATE orders SET status = 'paid' WHERE id = 1")
        conn.execute("UPDATE orders SET id = 10 WHERE id = 2")
        conn.execute("INSERT INTO lines VALUES (1, 1, 2), (1, 2, 5)")
        conn.execute("DELETE FROM lines WHERE line = 2")
        conn.execute("INSERT INTO notes VALUES ('a'), ('b')")
        conn.execute("DELETE FROM notes WHERE body = 'a'")


def capture_as(
    pg: LocalPostgres, source_db: str, store_db: str, capture_role: str, slot: str, tables: str | None
) -> CaptureEnv:
    env = CaptureEnv(
        pg, pg.dsn(dbname=source_db, user=capture_role), pg.dsn(dbname=store_db, user="cdc_writer"), slot=slot
    )
    env.extra_env["CDC_SOURCE__PUBLICATION"] = "cdc_pub"
    if tables is not None:
        env.extra_env["CDC_SOURCE__TABLES"] = tables
    return env


# ============================================================================ capture role


@pytest.mark.parametrize("mode", ["table-list-owner-member", "admin-publication"])
def test_non_superuser_capture_role_sets_up_and_captures(
    server: LocalPostgres, tmp_path: Path, mode: str
) -> None:
    """`cdc setup` and `cdc run` as a non-superuser with only what grants.sql gives."""
    source_db, store_db, suffix = databases(server)
    admin_source = server.dsn(dbname=source_db)
    role = f"cdc_capture_{suffix}"
    with psycopg.connect(admin_source, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(f"app_owner_{suffix}")))
        conn.execute(APP_SCHEMA)
        for table in TABLES:
            conn.execute(
                sql.SQL("ALTER TABLE {} OWNER TO {}").format(
                    sql.Identifier(*table.split(".")), sql.Identifier(f"app_owner_{suffix}")
                )
            )
    settings = {"side": "source", "capture_role": role, "tables": ",".join(TABLES)}
    if mode == "table-list-owner-member":
        settings["table_owner"] = f"app_owner_{suffix}"
    else:
        settings["publication"] = "cdc_pub"
    apply_grants(admin_source, **settings)
    apply_grants(server.dsn(dbname=store_db), side="store")

    env = capture_as(
        server,
        source_db,
        store_db,
        role,
        f"cdc_{suffix}",
        ",".join(TABLES) if mode != "admin-publication" else None,
    )
    with psycopg.connect(env.source_dsn) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert row == (False, True)
    result = CliRunner().invoke(cli, ["setup"], env={k: v for k, v in _daemon_env(env).items()})
    assert result.exit_code == 0, result.output
    proc = DaemonProcess(env, tmp_path / "daemon.log", extra=env.extra_env)
    proc.start()
    try:
        proc.wait_streaming(timeout=30)
        app_changes(admin_source)
        env.wait_caught_up()
        assert proc.stop() == 0
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
    for table in TABLES:
        assert rebuild(env, table) == source_rows(env, table), table
    with env.store() as conn:
        ops = conn.execute("SELECT count(*) FROM changes WHERE op IN ('I', 'U', 'D')").fetchone()
    assert ops is not None and ops[0] == 9
    # The context trigger is there, installed by the capture role.
    with psycopg.connect(admin_source) as conn:
        triggers = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'cdc_context'").fetchone()
    assert triggers == (3,)
    env.teardown()


def _daemon_env(env: CaptureEnv) -> dict[str, str]:
    return {
        "CDC_SOURCE_DSN": env.source_dsn,
        "CDC_STORE_DSN": env.store_dsn,
        "CDC_SOURCE__SLOT": env.slot,
        "CDC_SOURCE__PUBLICATION": env.slot,  # as DaemonProcess names it
        "CDC_STORE__SCHEMA": env.schema,
        **env.extra_env,
    }


def test_for_all_tables_needs_a_superuser_as_documented(server: LocalPostgres) -> None:
    """Without source.tables and without a publication, a non-superuser's setup fails clearly."""
    source_db, store_db, suffix = databases(server)
    role = f"cdc_capture_{suffix}"
    with psycopg.connect(server.dsn(dbname=source_db), autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
    apply_grants(server.dsn(dbname=source_db), side="source", capture_role=role, tables=",".join(TABLES))
    apply_grants(server.dsn(dbname=store_db), side="store")
    env = capture_as(server, source_db, store_db, role, f"cdc_{suffix}", None)
    result = CliRunner().invoke(cli, ["setup"], env=_daemon_env(env))
    assert result.exit_code != 0
    assert "must be superuser to create FOR ALL TABLES publication" in result.output + str(result.exception)


def test_setup_explains_a_missing_privilege(server: LocalPostgres) -> None:
    source_db, store_db, suffix = databases(server)
    role = f"cdc_capture_{suffix}"
    with psycopg.connect(server.dsn(dbname=source_db), autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
    apply_grants(server.dsn(dbname=source_db), side="source", capture_role=role, tables=",".join(TABLES))
    apply_grants(server.dsn(dbname=store_db), side="store")
    env = capture_as(server, source_db, store_db, role, f"cdc_{suffix}", None)
    result = subprocess.run(
        [sys.executable, "-m", "cdc", "setup"],
        check=False,
        env={**os.environ, **_daemon_env(env)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    assert "source.tables" in result.stderr or "grants.sql" in result.stderr


@pytest.mark.parametrize("read_all_stats", ["on", "off"])
def test_a_failed_request_never_stalls_under_least_privilege(
    server: LocalPostgres, tmp_path: Path, read_all_stats: str
) -> None:
    """With the roles of grants.sql, a request failing through the client helper waits for capture
    only as long as capture needs (pg_read_all_stats: it sees the walsender's position), or not at
    all (without it; setup warns): never the whole bound, as it did when it polled a NULL."""
    from cdc import client

    source_db, store_db, suffix = databases(server)
    admin_source = server.dsn(dbname=source_db)
    role, app = f"cdc_capture_{suffix}", f"app_{suffix}"
    with psycopg.connect(admin_source, autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(app)))
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE ON public.orders TO {}").format(sql.Identifier(app))
        )
    apply_grants(
        admin_source,
        side="source",
        capture_role=role,
        tables=",".join(TABLES),
        publication="cdc_pub",
        read_all_stats=read_all_stats,
    )
    apply_grants(server.dsn(dbname=store_db), side="store")
    env = capture_as(server, source_db, store_db, role, f"cdc_{suffix}", None)
    result = CliRunner().invoke(cli, ["setup"], env=_daemon_env(env))
    assert result.exit_code == 0, result.output
    warned = "cannot read the walsender's position" in result.output
    assert warned == (read_all_stats == "off" and server.version >= 16), result.output
    proc = DaemonProcess(env, tmp_path / "daemon.log", extra=env.extra_env)
    proc.start()
    took = []
    try:
        proc.wait_streaming(timeout=30)
        with psycopg.connect(server.dsn(dbname=source_db, user=app), autocommit=True) as conn:
            for n in range(5):
                started = time.monotonic()
                with pytest.raises(RuntimeError), client.request(conn, f"fail-{suffix}-{n}"):
                    conn.execute("UPDATE orders SET status = 'attempt' WHERE id = 1")
                    raise RuntimeError("payment declined")
                took.append(time.monotonic() - started)
        env.wait_caught_up()
        assert proc.stop() == 0
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
    assert max(took) < 1.0, took  # the bound is 2 s; caught up, it takes milliseconds
    with env.store() as conn:
        attempts = conn.execute(
            "SELECT count(*) FROM transactions WHERE status = 'r' AND request_id LIKE %s",
            [f"fail-{suffix}-%"],
        ).fetchone()
    if server.version >= 16 and read_all_stats == "on":
        assert attempts == (5,)  # each attempted change captured before its rollback
    env.teardown()


# ============================================================================ store roles


def test_reader_reads_history_but_cannot_write(server: LocalPostgres) -> None:
    source_db, store_db, suffix = databases(server)
    admin_source = server.dsn(dbname=source_db)
    with psycopg.connect(admin_source, autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
    apply_grants(server.dsn(dbname=store_db), side="store")
    # The writer owns the schema: `cdc setup` (store side) and the daemon run as cdc_writer.
    env = CaptureEnv(
        server, admin_source, server.dsn(dbname=store_db, user="cdc_writer"), slot=f"cdc_{suffix}"
    )
    env.setup()
    env.start()
    try:
        app_changes(admin_source)
        env.wait_caught_up()
    finally:
        env.teardown()

    reader = server.dsn(dbname=store_db, user="cdc_reader")
    for args in (
        ["state", "history", "orders", "--id", "1"],
        ["state", "history", "lines", "--id", '{"order_id": 1, "line": 2}'],
        ["state", "blame", "orders", "--id", "1"],
    ):
        result = CliRunner().invoke(cli, [*args, "--store", reader, "--format", "json"])
        assert result.exit_code == 0, result.output
    history = CliRunner().invoke(
        cli, ["state", "history", "orders", "--id", "1", "--store", reader, "--format", "json"]
    )
    rows = json.loads(history.output)
    assert sorted(r["op"] for r in rows) == ["SNAPSHOT", "UPDATE"]
    with History(reader) as history_api:  # the Python API reads with the reader role too
        version = history_api.current_version()
        assert version is not None
        row = history_api.at(version=version).table("orders").get(1)
        assert row is not None and row["status"] == "paid"

    with psycopg.connect(server.dsn(dbname=store_db), autocommit=True) as admin:
        tables = [
            (str(name), str(column))
            for name, column in admin.execute(
                "SELECT c.relname, (SELECT attname FROM pg_attribute WHERE attrelid = c.oid AND attnum = 1) "
                "FROM pg_class c WHERE c.relnamespace = %s::regnamespace AND c.relkind IN ('r', 'p') ORDER BY 1",
                (SCHEMA,),
            ).fetchall()
        ]
    assert {"changes", "capture_state", "request_errors"} <= {t for t, _ in tables}
    attempts = 0
    with psycopg.connect(reader, autocommit=True) as conn:
        for table, column in tables:
            target = sql.Identifier(SCHEMA, table)
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target))  # readable, every table
            for statement in (
                sql.SQL("INSERT INTO {} DEFAULT VALUES").format(target),
                sql.SQL("UPDATE {} SET {} = {}").format(
                    target, sql.Identifier(column), sql.Identifier(column)
                ),
                sql.SQL("DELETE FROM {}").format(target),
                sql.SQL("TRUNCATE {}").format(target),
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
                attempts += 1
    assert attempts == 4 * len(tables)

    # Tables the writer creates later (new partitions) are readable without running grants.sql again.
    with psycopg.connect(server.dsn(dbname=store_db, user="cdc_writer"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (x int)").format(sql.Identifier(SCHEMA, "later_partition")))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(sql.Identifier(SCHEMA, "later_partition")))
    with psycopg.connect(reader, autocommit=True) as conn:
        assert conn.execute(
            sql.SQL("SELECT x FROM {}").format(sql.Identifier(SCHEMA, "later_partition"))
        ).fetchall() == [(1,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(SCHEMA, "later_partition")))


def test_grants_are_idempotent_and_take_over_an_existing_history(server: LocalPostgres) -> None:
    """A history created by a superuser's `cdc setup` is handed to cdc_writer by grants.sql."""
    source_db, store_db, suffix = databases(server)
    with psycopg.connect(server.dsn(dbname=source_db), autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
    env = CaptureEnv(server, server.dsn(dbname=source_db), server.dsn(dbname=store_db), slot=f"cdc_{suffix}")
    env.setup()  # as the superuser
    for _ in range(2):
        apply_grants(server.dsn(dbname=store_db), side="store")
    with psycopg.connect(server.dsn(dbname=store_db)) as conn:
        owners = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class WHERE relnamespace = %s::regnamespace",
            (SCHEMA,),
        ).fetchall()
    assert owners == [("cdc_writer",)]
    env.store_dsn = server.dsn(dbname=store_db, user="cdc_writer")
    env.start()
    try:
        app_changes(server.dsn(dbname=source_db))
        env.wait_caught_up()
    finally:
        env.teardown()
    assert rebuild(env, "public.orders") == source_rows(env, "public.orders")


def test_grants_sql_refuses_to_run_without_a_side(server: LocalPostgres) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match=r"cdc_grants\.side"):
        apply_grants(server.dsn())


# ============================================================================ secrets


def test_passwords_never_reach_logs_metrics_or_status(server: LocalPostgres, tmp_path: Path) -> None:
    secret = f"Pw-{uuid.uuid4().hex}"
    source_db, store_db, suffix = databases(server)
    role = f"cdc_secret_{suffix}"
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(secret)
            )
        )
    with psycopg.connect(server.dsn(dbname=source_db), autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
    # The test server trusts 127.0.0.1: the password is not checked, but it is in every DSN.
    source = server.dsn(dbname=source_db, user=role, password=secret)
    store = server.dsn(dbname=store_db, user=role, password=secret)
    env = CaptureEnv(server, source, store, slot=f"cdc_{suffix}")
    setup = CliRunner().invoke(cli, ["setup"], env=_daemon_env(env))
    assert setup.exit_code == 0 and secret not in setup.output

    # The daemon first meets an unreachable source (the error messages carry the DSN), then a
    # reachable one; it logs at debug level to say as much as it can.
    proxy = Proxy("127.0.0.1", server.port).start()
    proxy.cut()
    log_path = tmp_path / "daemon.log"
    proc = DaemonProcess(
        env,
        log_path,
        extra={"CDC_SOURCE_DSN": proxy.dsn(source), "CDC_LOGGING__LEVEL": "debug"},
    )
    proc.start()
    try:
        deadline = time.monotonic() + 30
        while "capture_interrupted" not in log_path.read_text():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        proxy.restore()
        proc.wait_streaming(timeout=30)
        app_changes(source)
        env.wait_caught_up()
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port()}/metrics", timeout=5) as response:
            metrics = response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port()}/readyz", timeout=5) as response:
            ready = response.read().decode()
        outputs: dict[str, Any] = {"metrics": metrics, "readyz": ready}
        for fmt in ("json", "table"):
            status = CliRunner().invoke(
                cli,
                ["status", "--source", source, "--store", store, "--format", fmt],
                env={"CDC_SOURCE__SLOT": env.slot},
            )
            assert status.exit_code == 0, status.output
            outputs[f"status {fmt}"] = status.output
        assert json.loads(outputs["status json"])["last_error"], "the source failure should be on record"
        assert proc.stop() == 0
    finally:
        proxy.close()
        if proc.proc is not None and proc.proc.poll() is None:
            proc.proc.kill()
        env.teardown()
    outputs["daemon log"] = log_path.read_text()
    assert "cannot reach the source" in outputs["daemon log"]
    assert "password=***" in outputs["daemon log"] or "***" in outputs["status json"]
    for name, text in outputs.items():
        assert secret not in text, f"the password leaked into the {name}"
