"""Migration of a large format-1 store to format 2 (cdc/store/migrate.py): wall time.

    python -m bench.migrate_v1 [--mutations 1000000] [--flavor embedded|system] [--days 10]

Builds a format-1 store (tests/data/store_v1.sql) with SQL: ``--mutations`` mutations in
transactions of 3, over ``--days`` daily partitions, 5 tables (a bigint key, a text key, a
composite key, a keyless table under REPLICA IDENTITY FULL, a keyed table under FULL), 60% of
the changes updates, 25% inserts, 15% deletes, 1% of the transactions rolled back, every
transaction with a request context (1% with a second context half way), 10,000 keyframes and
1% kept rows in ``mutations_keep``, an error on 0.1% of the requests. Then times
``migrate_v1`` (one transaction) and prints each step, the wall time and the server's CPU time
(the latter holds when other work shares the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from psycopg import sql

from bench.harness import connect, log, server, server_cpu_seconds
from cdc.logs import configure_logging
from cdc.store.migrate import MigrationStep, migrate_v1
from tests.v1_store import V1Store

SCHEMA = "cdc_history"
START = 0x1_0000_0000

TABLES = [
    # (table_name, key_columns, replica_identity, columns)
    (
        "public.users",
        ["id"],
        "d",
        [("id", 20), ("email", 25), ("name", 25), ("plan", 25), ("score", 23), ("seen", 1184)],
    ),
    ("public.orders", ["id"], "d", [("id", 25), ("status", 25), ("total", 1700), ("user_id", 20)]),
    (
        "public.line_items",
        ["order_id", "line"],
        "d",
        [("order_id", 25), ("line", 23), ("sku", 25), ("qty", 23)],
    ),
    ("public.events", [], "f", [("at", 1184), ("kind", 25), ("n", 23), ("ok", 16), ("note", 25)]),
    ("public.accounts", ["region", "id"], "f", [("region", 25), ("id", 23), ("balance", 1700)]),
]

# One image per table from the key number k and a variant v (SQL over k, v).
IMAGES = [
    "jsonb_build_object('id', k, 'email', 'user' || k || '@example.org', 'name', 'Name ' || k, "
    "'plan', (ARRAY['free','pro','team'])[1 + v % 3], 'score', v % 1000, 'seen', '2026-03-01T00:00:00+00:00')",
    "jsonb_build_object('id', 'o-' || k, 'status', (ARRAY['new','paid','sent'])[1 + v % 3], "
    "'total', (k % 997) || '.' || lpad((v % 100)::text, 2, '0'), 'user_id', k % 50000)",
    "jsonb_build_object('order_id', 'o-' || (k / 4), 'line', k % 4, 'sku', 'sku-' || (v % 5000), 'qty', 1 + v % 9)",
    "jsonb_build_object('at', '2026-03-01T00:00:00+00:00', 'kind', (ARRAY['login','logout','view'])[1 + k % 3], "
    "'n', k, 'ok', v % 2 = 0, 'note', CASE WHEN v % 5 = 0 THEN NULL ELSE 'note ' || v END)",
    "jsonb_build_object('region', (ARRAY['eu','us','ap'])[1 + k % 3], 'id', k, 'balance', (v % 10000) || '.00')",
]
KEYS = [
    "jsonb_build_object('id', k)",
    "jsonb_build_object('id', 'o-' || k)",
    "jsonb_build_object('order_id', 'o-' || (k / 4), 'line', k % 4)",
    None,  # keyless: the whole row
    "jsonb_build_object('region', (ARRAY['eu','us','ap'])[1 + k % 3], 'id', k)",
]


def _mod(query: str) -> str:
    """Modulo operators escaped for a query with parameters."""
    return query.replace(" % ", " %% ")


def build(dsn: str, mutations: int, days: int) -> None:
    with connect(dsn) as conn:
        v1 = V1Store(conn, SCHEMA)
        for day in range(days):
            v1.partition(f"2026-03-{day + 1:02d}")
        ids = []
        for i, (name, key, ri, cols) in enumerate(TABLES):
            row = conn.execute(
                sql.SQL(
                    "INSERT INTO {} (table_name, relation_oid, replica_identity, key_columns, columns, fingerprint, "
                    "first_position) VALUES (%s, %s, %s, %s, %s, md5(%s), %s) RETURNING schema_id"
                ).format(v1.t("table_schemas")),
                (name, 16384 + i, ri, key, json.dumps([{"name": c, "type_oid": o, "type_modifier": -1, "key": c in key}
                                                       for c, o in cols]), name, START),
            ).fetchone()  # fmt: skip
            assert row is not None
            ids.append(int(row[0]))
        txns = mutations // 3
        span = f"{days} days"
        conn.execute("SET search_path = " + SCHEMA)
        conn.execute("SET work_mem = '256MB'")
        t0 = time.monotonic()
        conn.execute(
            _mod(
                "INSERT INTO transactions (position, xid, version, commit_lsn, status, committed_at, mutation_count, "
                "request_ids) SELECT %(start)s + i * 256, 5000 + i, CASE WHEN i % 100 = 7 THEN NULL ELSE %(start)s + i * 256 END, "
                "%(start)s + i * 256 - 16, CASE WHEN i % 100 = 7 THEN 'rolled_back' ELSE 'committed' END, "
                "timestamptz '2026-03-01 00:00+00' + (interval '" + span + "') * (i::float8 / %(n)s), 3, "
                "ARRAY['req-' || i] FROM generate_series(0, %(n)s - 1) i"
            ),
            {"start": START, "n": txns},
        )
        # m: the mutation's number; k: its row; tb: its table; op by m
        cases_image = " ".join(f"WHEN {t} THEN {img}" for t, img in enumerate(IMAGES))
        cases_before = " ".join(
            f"WHEN {t} THEN {img.replace('v %', '(v + 1) %')}" for t, img in enumerate(IMAGES)
        )
        cases_key = " ".join(f"WHEN {t} THEN {key or IMAGES[t]}" for t, key in enumerate(KEYS))
        schema_ids = "ARRAY[" + ", ".join(map(str, ids)) + "]"
        conn.execute(
            _mod(
                "INSERT INTO mutations (position, ordinal, version, lsn, xid, committed_at, table_name, op, key, before, "
                "after, changed, status, request_id, context, schema_id, actor, actor_seq) "
                "SELECT t.position, o, t.version, t.position - 256 + 16 + o, t.xid, t.committed_at, "
                "(ARRAY['public.users','public.orders','public.line_items','public.events','public.accounts'])[tb + 1], "
                "op, CASE tb " + cases_key + " END, "
                "CASE WHEN op = 'INSERT' THEN NULL ELSE CASE tb " + cases_before + " END END, "
                "CASE WHEN op = 'DELETE' THEN NULL ELSE CASE tb " + cases_image + " END END, "
                "NULL, t.status, c.request_id, c.context, (" + schema_ids + ")[tb + 1], c.actor, i * 3 + o "
                "FROM (SELECT x.*, (x.position - %(start)s) / 256 AS i FROM transactions x) t "
                "CROSS JOIN generate_series(0, 2) o "
                "CROSS JOIN LATERAL (SELECT t.i * 3 + o AS m) mm "
                "CROSS JOIN LATERAL (SELECT CASE WHEN mm.m % 20 = 3 THEN 3 ELSE mm.m % 5 END AS tb, "
                "  (mm.m * 7919) % 50000 AS k, mm.m AS v, "
                "  CASE WHEN mm.m % 20 < 5 THEN 'INSERT' WHEN mm.m % 20 < 8 THEN 'DELETE' ELSE 'UPDATE' END AS op) r "
                "CROSS JOIN LATERAL (SELECT CASE WHEN t.i % 100 = 11 AND o = 2 THEN 'req-n-' || t.i ELSE 'req-' || t.i END "
                "  AS request_id, 'user' || (t.i % 100) AS actor) c0 "
                "CROSS JOIN LATERAL (SELECT c0.request_id, c0.actor, jsonb_build_object('request_id', c0.request_id, "
                "  'actor', c0.actor, 'application_name', 'web', 'db_user', 'app', 'client_addr', '10.0.0.' || (t.i % 250), "
                "  'backend_pid', 1000 + t.i % 500, 'source', 'guc', 'extra', jsonb_build_object('route', '/r/' || (t.i % 40))) "
                "  AS context) c"
            ),
            {"start": START},
        )
        # 1% kept rows (a longer-retention table of a pruned day) and 10,000 keyframes at the floor
        floor = START
        conn.execute(
            "INSERT INTO mutations_keep (position, ordinal, version, lsn, xid, committed_at, table_name, op, key, "
            "before, after, changed, status, request_id, context, schema_id, actor, actor_seq, keyframe) "
            "SELECT position - %(shift)s, ordinal, version - %(shift)s, lsn - %(shift)s, xid, committed_at - interval "
            "'10 days', table_name, op, key, before, after, changed, status, request_id, context, schema_id, actor, "
            "actor_seq, false FROM mutations WHERE position < %(start)s + %(kept)s * 256",
            {"shift": 2**31, "start": START, "kept": txns // 100},
        )
        conn.execute(
            _mod(
                "INSERT INTO mutations_keep (position, ordinal, version, lsn, xid, committed_at, table_name, op, key, "
                "after, changed, status, context, schema_id, keyframe) "
                "SELECT %(floor)s, 1000000000 + k, %(floor)s, %(floor)s, 0, '2026-03-01 00:00+00', 'public.users', "
                "'SNAPSHOT', jsonb_build_object('id', k), "
                + IMAGES[0].replace("v %", "k %")
                + ", NULL, 'committed', "
                "'{\"keyframe\": true}', %(sid)s, true FROM generate_series(0, 9999) k"
            ),
            {"floor": floor, "sid": ids[0]},
        )
        conn.execute(
            "INSERT INTO requests (request_id, actor, context, first_seen_at, last_seen_at, committed_count, "
            "rolled_back_count, error_type, error_message, error_at) "
            "SELECT DISTINCT ON (request_id) request_id, actor, context, committed_at, committed_at, 1, 0, "
            "CASE WHEN position % 1000 = 0 THEN 'Error' END, CASE WHEN position % 1000 = 0 THEN 'failed' END, "
            "CASE WHEN position % 1000 = 0 THEN committed_at END FROM mutations ORDER BY request_id, position"
        )
        conn.execute(
            "INSERT INTO capture_state (slot_name, acked_lsn, baseline_lsn, baseline_done, history_floor) "
            "VALUES ('cdc', %s, %s, true, %s)",
            (START + txns * 256, START, floor),
        )
        conn.execute("VACUUM ANALYZE")
        total = conn.execute(
            "SELECT (SELECT count(*) FROM mutations) + (SELECT count(*) FROM mutations_keep)"
        ).fetchone()
        size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
        assert total is not None and size is not None
        log(f"format-1 store built: {total[0]:,} rows of mutations(_keep), database {size[0]}, "
            f"{time.monotonic() - t0:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--flavor", default="embedded")
    args = parser.parse_args()
    configure_logging("warning", "console")
    with server(args.flavor) as pg:
        dsn = pg.create_database("bench_migrate")
        build(dsn, args.mutations, args.days)

        def progress(step: MigrationStep) -> None:
            if step.done:
                log(f"  {step.table:<22} {step.rows:>10,} rows {step.seconds:8.2f} s")

        with connect(dsn) as conn:
            cpu = server_cpu_seconds(pg)
            started = time.monotonic()
            report = migrate_v1(conn, SCHEMA, progress=progress)
            seconds = time.monotonic() - started
            cpu = server_cpu_seconds(pg) - cpu
            size = conn.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()
        assert size is not None
        print(
            f"migrate_v1: {report.v1_rows:,} format-1 rows in {seconds:.1f} s "
            f"({report.v1_rows / seconds:,.0f} rows/s; server CPU {cpu:.1f} s; PostgreSQL {pg.flavor}); "
            f"database now {size[0]}; load average {os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
