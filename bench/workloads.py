"""The tables and write workloads the capture benchmarks run on the source."""

from __future__ import annotations

from pathlib import Path

import psycopg

from bench.harness import MARKER_DDL, connect, pgbench, write_script
from cdc.devdb import LocalPostgres

ACCOUNTS = 10_000

SOURCE_DDL = [
    MARKER_DDL,
    "CREATE TABLE bench_accounts (id int PRIMARY KEY, balance bigint NOT NULL, note text, "
    "updated_at timestamptz NOT NULL)",
    "CREATE TABLE bench_history (id bigserial PRIMARY KEY, aid int NOT NULL, delta int NOT NULL, "
    "at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE bench_big (id bigint PRIMARY KEY, a text, b numeric, c timestamptz)",
    f"INSERT INTO bench_accounts SELECT g, 0, 'account ' || g, now() FROM generate_series(1, {ACCOUNTS}) g",
]

#: One small transaction, pgbench style: a request id (SET LOCAL through set_config), two
#: account updates (in key order: no deadlocks between clients) and one insert.
SMALL_SCRIPT = f"""\\set aid random(1, {ACCOUNTS})
\\set bid random(1, {ACCOUNTS})
\\set lo least(:aid, :bid)
\\set hi greatest(:aid, :bid)
BEGIN;
SELECT set_config('cdc.request_id', 'bench-' || :client_id || '-' || :aid, true);
UPDATE bench_accounts SET balance = balance + 1, updated_at = now() WHERE id = :lo;
UPDATE bench_accounts SET balance = balance - 1, updated_at = now() WHERE id = :hi;
INSERT INTO bench_history (aid, delta) VALUES (:aid, 1);
END;
"""
SMALL_CHANGES_PER_TXN = 3


def create_source_tables(source_dsn: str) -> None:
    with connect(source_dsn) as conn:
        for statement in SOURCE_DDL:
            conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("ANALYZE")


def small_script(directory: Path) -> Path:
    return write_script(directory, "small.sql", SMALL_SCRIPT)


def run_small(pg: LocalPostgres, script: Path, dbname: str, transactions: int, clients: int = 2) -> str:
    """``transactions`` small transactions in all, over ``clients`` connections."""
    per_client = max(1, transactions // clients)
    return pgbench(
        pg, ["-n", "-f", str(script), "-t", str(per_client), "-c", str(clients), "-j", str(clients)], dbname
    )


def run_large(source_dsn: str, rows: int, first_id: int) -> None:
    """One transaction inserting ``rows`` rows into bench_big, ids from ``first_id``."""
    with connect(source_dsn) as conn:
        conn.execute(
            "INSERT INTO bench_big SELECT g, md5(g::text), g * 1.5, now() "
            "FROM generate_series(%s::bigint, %s::bigint) g",
            (first_id, first_id + rows - 1),
        )


def count_changes(conn: psycopg.Connection[object], after: int, through: int) -> int:
    """Row changes a store holds in (after, through], the marker rows left out."""
    row = conn.execute(
        "SELECT count(*) FROM changes WHERE position > %s AND position <= %s AND table_id NOT IN "
        "(SELECT table_id FROM table_names WHERE schema_name = 'public' AND table_name = 'bench_marker')",
        (after, through),
    ).fetchone()
    return int(row[0]) if row else 0
