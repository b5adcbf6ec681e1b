"""`cdc demo`: the whole product on a throwaway PostgreSQL, in about ten seconds.

Starts a server (the embedded PostgreSQL 18 wheel, else the system's), creates a small
shop database, runs `cdc setup` and the daemon, plays the request scenario of the
product's docs (context from SET LOCAL, from application_name and from the client
helper, and a request that fails and rolls back), then prints what was captured with
the same commands a user would type. For demonstration only.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import click
import psycopg
from prometheus_client import CollectorRegistry

from cdc import client
from cdc.config import load_config
from cdc.daemon import Daemon
from cdc.devdb import LocalPostgres
from cdc.errors import CdcError
from cdc.logs import cli_level
from cdc.lsn import parse_lsn
from cdc.metrics import Metrics
from cdc.setup import setup

SCHEMA = """
CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text, plan text);
CREATE TABLE orders (id text PRIMARY KEY, user_id int REFERENCES users, status text, total numeric(12,2));
INSERT INTO users VALUES (7, 'old@b.com', 'Olga', 'pro');
INSERT INTO orders VALUES ('81b2', 7, 'pending', 129.90);
"""


class PaymentTimeout(Exception):  # noqa: N818 - the name the demo's history shows
    """Stands in for the third-party failure that makes the last request roll back."""


def play_scenario(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        with conn.transaction():
            conn.execute("SET LOCAL cdc.request_id = '1a2b3c4d'")
            conn.execute("SET LOCAL cdc.actor = 'signup-service'")
            conn.execute("INSERT INTO users (id, email, plan) VALUES (42, 'a@b.com', 'free')")
        conn.commit()
    with psycopg.connect(dsn, application_name="req:a3c91ef0") as conn:
        conn.execute("UPDATE users SET name = 'Alice Smith' WHERE id = 42")
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        with client.request(conn, "4f9a3b2c", actor="billing"):
            conn.execute("UPDATE users SET plan = 'pro' WHERE id = 42")
        try:
            with client.request(conn, "550e8400", actor="billing"):
                conn.execute("UPDATE users SET plan = NULL WHERE id = 42")
                conn.execute("UPDATE orders SET status = NULL WHERE id = '81b2'")
                raise PaymentTimeout("Stripe API timeout after 10s")
        except PaymentTimeout:
            pass


def wait_caught_up(source_dsn: str, store_dsn: str, schema: str, timeout: float = 30) -> None:
    with psycopg.connect(source_dsn, autocommit=True) as src:
        row = src.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        target = parse_lsn(row[0])
    deadline = time.monotonic() + timeout
    with psycopg.connect(store_dsn, autocommit=True) as store:
        while time.monotonic() < deadline:
            found = store.execute(f"SELECT max(acked_lsn) FROM {schema}.capture_state").fetchone()
            if found and found[0] is not None and found[0] >= target:
                return
            time.sleep(0.1)
    raise CdcError("the demo daemon did not catch up in time")


def run_demo(cli: click.Command, *, keep: bool = False) -> None:
    """The demo; ``cli`` is the `cdc` command (cdc.cli.main), run in-process for the readers."""
    server = LocalPostgres(stop_at_exit=not keep)
    click.secho("starting a throwaway PostgreSQL...", dim=True)
    server.start()
    click.secho(f"PostgreSQL {server.version} on 127.0.0.1:{server.port} ({server.flavor})", dim=True)
    source = server.create_database("shop")
    store = server.create_database("cdc_store")
    # The daemon's store writer process logs at the config's level: the command line's, here.
    env = {"CDC_SOURCE_DSN": source, "CDC_STORE_DSN": store, "CDC_LOGGING__LEVEL": cli_level("warning")}
    config = load_config(None, env=env)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(SCHEMA)
    report = setup(config)
    for step in report.steps:
        click.secho(f"  setup: {step}", dim=True)
    daemon = Daemon(config, metrics=Metrics(CollectorRegistry()))
    thread = threading.Thread(target=daemon.run, name="cdc-daemon", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not daemon.streaming and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)  # requests before the stream is open would race its start
        play_scenario(source)
        wait_caught_up(source, store, config.store.schema_name)
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
    os.environ["CDC_STORE_DSN"] = store
    for _title, args in (
        ("Row history", ["state", "history", "users", "--id", "42"]),
        ("Per-column blame", ["state", "blame", "users", "--id", "42"]),
        ("Why did request 550e8400 fail?", ["why", "550e8400"]),
        ("Everything request 550e8400 touched", ["state", "history", "--request", "550e8400"]),
    ):
        click.secho(f"\n$ cdc {' '.join(args)}", bold=True)
        _invoke(cli, args)
    if server.version < 16:
        click.secho(
            "\n(PostgreSQL < 16 streams only large transactions: the rolled-back attempt's row "
            "changes are not visible, its reported error is.)",
            dim=True,
        )
    if keep:
        click.echo("\n" + next_steps(server, source, store))
    else:
        server.cleanup()
        click.echo(
            "\nThe demo's server is gone. To explore what it captured (the page, the API, the Python API),\n"
            f"keep it running:  {_program('cdc')} demo --keep   (make demo KEEP=1); it prints what to try."
        )


def next_steps(server: LocalPostgres, source: str, store: str) -> str:
    """What to try once the demo is over, as commands to paste (the server keeps running)."""
    cdc, python = _program("cdc"), _program("python")
    history = "http://127.0.0.1:8400/api/v1/tables/users/rows/42/history"
    lines = [
        "What to try next (the demo's server keeps running):",
        f"  export CDC_SOURCE_DSN='{source}'",
        f"  export CDC_STORE_DSN='{store}'",
        f"  {cdc} serve --open                 # the page: http://127.0.0.1:8400/ (Ctrl-C stops it)",
        f"  curl -s {history}   # the API, from another terminal (OpenAPI: /openapi.json)",
        f"  {python} -c \"import os; from cdc import History; h = History(os.environ['CDC_STORE_DSN']); "
        'print(h.at(version=h.current_version()).users.get(42))"   # the Python API',
        f"  {cdc} run --no-http                # capture what you change next in the shop database",
        f"  {cdc} status                       # slot, daemon, lag, versions",
        f"  kill {server.pid} && rm -rf {server.base_dir}   # stop the server, remove its data",
    ]
    return "\n".join(lines)


def _program(name: str) -> str:
    """How to run ``name`` of this Python environment (cdc, python) from the current directory:
    its bare name when it is the one on PATH, else its path."""
    path = Path(sys.executable).parent / name
    found = shutil.which(name)
    if found is not None and Path(found).resolve() == path.resolve():
        return name
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else str(path)


def _invoke(cli: click.Command, args: list[str]) -> None:
    try:
        cli.main(args=args, prog_name="cdc", standalone_mode=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise CdcError(f"`cdc {' '.join(args)}` failed") from exc
