"""Measurement 5: reads through the query layer (`cdc.query.Store`) on a large store.

The store schema is created by the store DDL (`sql/store.sql`, format 2, as `cdc setup` applies
it) and filled directly with generate_series: R rows (80 % in `public.accounts`, 20 % in
`public.orders`, one-column integer keys), each inserted once and then updated 9 times (10
versions a row; the updates of consecutive transactions touch rows spread over the whole key
range), 4 changes a transaction, a request id (and actor) on one transaction in three, one
5-column image a change as the capture side writes it (compact JSON text, `key_text` `[id]`),
the context once per transaction, commit times spread over 14 days in one partition a day of
`changes`, `transactions` and `context_changes` (as the writer creates them). The secondary
indexes are built after the load, then ANALYZE of every partition.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from bench.harness import Background, connect, log, percentile, server
from bench.model import Context, Figure, Measurement, Target
from cdc.query import Store
from cdc.setup import apply_store_schema

SCHEMA = "hist_reads"
SLOT = "bench_reads"
BASE = 1 << 32  # the first transaction's position
STEP = 1024  # positions of consecutive transactions
PER_TXN = 4
VERSIONS = 10
ACCOUNTS_SHARE = 0.8
SAMPLES = 200
WARMUP = 20
ROW_TARGET = Target("<", 5.0)
START = "2026-01-01 00:00:00+00"  # the first commit time; the history spans SPAN
SPAN = timedelta(days=14)
PARTITIONED = ("changes", "transactions", "context_changes")
OTHER_TABLES = (
    "changes_keep",
    "transactions_keep",
    "tables",
    "table_names",
    "table_schemas",
    "capture_state",
)

COLUMNS = [
    {"name": "id", "type_oid": 20, "type_modifier": -1, "key": True},
    {"name": "name", "type_oid": 25, "type_modifier": -1, "key": False},
    {"name": "balance", "type_oid": 1700, "type_modifier": -1, "key": False},
    {"name": "status", "type_oid": 25, "type_modifier": -1, "key": False},
    {"name": "updated_at", "type_oid": 1184, "type_modifier": -1, "key": False},
]

# One change per row of the inner select: row `id` of table `tid` at its version `k` (0: INSERT).
CHANGES_SQL = f"""
INSERT INTO changes (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, key_text, image)
SELECT pos, ord, ts, tid, sid, CASE WHEN k = 0 THEN 'I' ELSE 'U' END, 0, pos - 512 + ord * 64,
       '[' || id || ']',
       format('{{"id":%%s,"name":"customer %%s","balance":"%%s.00","status":"%%s","updated_at":"%%s"}}',
              id, id, k * 10 + id %% 7, (ARRAY['new', 'active', 'suspended'])[k %% 3 + 1],
              ts - (9 - k) * interval '1 hour')
FROM (
    SELECT ord, pos, ts, k,
           CASE WHEN r <= %(accounts)s THEN %(tid_a)s ELSE %(tid_o)s END AS tid,
           CASE WHEN r <= %(accounts)s THEN r ELSE r - %(accounts)s END AS id,
           CASE WHEN r <= %(accounts)s THEN %(sid_a)s ELSE %(sid_o)s END AS sid
    FROM (
        SELECT (i %% {PER_TXN})::int AS ord, %(base)s + (i / {PER_TXN}) * {STEP} AS pos,
               timestamptz '{START}' + (i / {PER_TXN}) * %(step_us)s * interval '1 microsecond' AS ts,
               CASE WHEN i < %(rows)s THEN i + 1 ELSE (i * 7919) %% %(rows)s + 1 END AS r,
               (i / %(rows)s)::int AS k
        FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i
    ) a
) b
"""

TRANSACTIONS_SQL = f"""
INSERT INTO transactions (position, committed_at, xid, commit_lsn, status, flags, change_count, request_id,
                          actor, actor_seq, context)
SELECT %(base)s + t * {STEP}, timestamptz '{START}' + t * %(step_us)s * interval '1 microsecond', 1000 + t,
       %(base)s + t * {STEP} - 64, 'c', 0, {PER_TXN}, req, actor, CASE WHEN req IS NOT NULL THEN t END,
       json_build_object('request_id', req, 'actor', actor, 'application_name', 'shop', 'db_user', 'app',
                         'client_addr', '10.0.0.7', 'backend_pid', 4000 + t %% 64,
                         'source', CASE WHEN req IS NOT NULL THEN 'setting' ELSE 'none' END)::text
FROM (SELECT t, CASE WHEN t %% 3 = 0 THEN 'req-' || substr(md5(t::text), 1, 16) END AS req,
             CASE WHEN t %% 3 = 0 THEN 'user-' || (t %% 50) END AS actor
      FROM generate_series(0::bigint, %(txns)s::bigint - 1) AS t) x
"""


def _secondary_indexes(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT i.indexrelid::regclass::text FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND NOT i.indisprimary "
        "AND NOT i.indisunique AND c.relname = ANY(%s)",
        (SCHEMA, list(PARTITIONED)),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _create_partitions(conn: psycopg.Connection[Any]) -> int:
    """One partition a day over the history's span, as the writer creates them."""
    first = datetime.fromisoformat(START)
    days = SPAN.days + 1
    for table in PARTITIONED:
        for d in range(days):
            lo = first + timedelta(days=d)
            conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                    sql.Identifier(f"{table}_p{lo:%Y%m%d}"),
                    sql.Identifier(table),
                    sql.Literal(lo),
                    sql.Literal(lo + timedelta(days=1)),
                )
            )
    return days


def _register(conn: psycopg.Connection[Any], name: str, oid: int) -> tuple[int, int]:
    """A captured table and its schema, as the capture side registers them: (table_id, schema_id)."""
    row = conn.execute(
        "INSERT INTO tables (relation_oid, first_position) VALUES (%s, %s) RETURNING table_id",
        (oid, BASE - STEP),
    ).fetchone()
    assert row is not None
    table_id = int(row[0])
    conn.execute(
        "INSERT INTO table_names (table_id, schema_name, table_name, from_position) VALUES (%s, 'public', %s, %s)",
        (table_id, name, BASE - STEP),
    )
    found = conn.execute(
        "INSERT INTO table_schemas (table_id, replica_identity, key_columns, columns, fingerprint, first_position) "
        "VALUES (%s, 'd', ARRAY['id'], %s, %s, %s) RETURNING schema_id",
        (table_id, Jsonb(COLUMNS), f"bench-{name}", BASE - STEP),
    ).fetchone()
    assert found is not None
    return table_id, int(found[0])


def fill_store(dsn: str, mutations: int) -> dict[str, Any]:
    """Create and fill the store schema; return its shape and how long each step took."""
    rows = mutations // VERSIONS
    accounts = int(rows * ACCOUNTS_SHARE)
    txns = mutations // PER_TXN
    step_us = int(SPAN.total_seconds() * 1e6 / txns)
    timings: dict[str, float] = {}
    started = time.monotonic()
    with connect(dsn) as conn:
        apply_store_schema(conn, SCHEMA)
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(SCHEMA)))
        partitions = _create_partitions(conn)
        for index in _secondary_indexes(conn):
            conn.execute(f"DROP INDEX {index}")
        ids = {name: _register(conn, name, 16384 + i) for i, name in enumerate(("accounts", "orders"))}
        conn.execute(
            "INSERT INTO capture_state (slot_name, source_system_id, source_database, acked_lsn, baseline_lsn, "
            "baseline_done, history_floor) VALUES (%s, 'bench', 'bench', %s, %s, true, %s)",
            (SLOT, BASE + (txns - 1) * STEP, BASE - STEP, BASE - STEP),
        )
    half = (txns // 2) * PER_TXN

    def load(lo: int, hi: int) -> None:
        with connect(dsn) as conn:
            conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(SCHEMA)))
            conn.execute(
                CHANGES_SQL,  # type: ignore[arg-type]
                {
                    "lo": lo,
                    "hi": hi,
                    "rows": rows,
                    "accounts": accounts,
                    "tid_a": ids["accounts"][0],
                    "tid_o": ids["orders"][0],
                    "sid_a": ids["accounts"][1],
                    "sid_o": ids["orders"][1],
                    "base": BASE,
                    "step_us": step_us,
                },
            )

    def load_rest() -> None:
        with connect(dsn) as conn:
            conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(SCHEMA)))
            conn.execute(TRANSACTIONS_SQL, {"base": BASE, "txns": txns, "step_us": step_us})  # type: ignore[arg-type]

    workers = [
        Background(lambda: load(0, half), "fill-1"),
        Background(lambda: load(half, txns * PER_TXN), "fill-2"),
    ]
    for worker in workers:
        worker.start()
    load_rest()
    for worker in workers:
        worker.value()
    timings["load_s"] = time.monotonic() - started
    log(f"reads: {txns * PER_TXN:,} changes loaded in {timings['load_s']:.0f} s; building indexes")
    started = time.monotonic()
    with connect(dsn) as conn:
        apply_store_schema(conn, SCHEMA)  # CREATE INDEX IF NOT EXISTS: the indexes dropped above
    timings["index_s"] = time.monotonic() - started
    started = time.monotonic()
    with connect(dsn) as conn:
        leaves = [
            str(r[0])
            for table in (*PARTITIONED, *OTHER_TABLES)
            for r in conn.execute(
                "SELECT relid::regclass::text FROM pg_partition_tree(%s::regclass) WHERE isleaf "
                "ORDER BY pg_relation_size(relid) DESC",
                (f"{SCHEMA}.{table}",),
            ).fetchall()
        ]
        size = conn.execute(
            "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree(%s::regclass)",
            (f"{SCHEMA}.changes",),
        ).fetchone()

    def analyze(tables: list[str]) -> None:
        with connect(dsn) as conn:
            for table in tables:
                conn.execute(f"ANALYZE {table}")

    # ANALYZE, no VACUUM (none of the queries can be index-only), of the leaf tables only, as
    # autovacuum would (it never analyzes a partitioned parent). Two sessions (2 cores), the
    # largest tables dealt out in turn.
    workers = [Background(lambda part=leaves[i::2]: analyze(part), f"analyze-{i}") for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.value()
    timings["analyze_s"] = time.monotonic() - started
    return {
        "mutations": txns * PER_TXN,
        "rows": rows,
        "transactions": txns,
        "versions_per_row": VERSIONS,
        "history_span_days": SPAN.days,
        "partitions_per_table": partitions,
        "changes_table_mb": round(int(size[0]) / 1024**2) if size else None,
        **{k: round(v, 1) for k, v in timings.items()},
    }


def _timed(fn: Callable[[], Any], samples: int, budget_s: float) -> list[float]:
    """``samples`` timings in ms after the warm-up; fewer (at least 3) when over ``budget_s``."""
    deadline = time.monotonic() + budget_s
    for _ in range(WARMUP):
        fn()
        if time.monotonic() > deadline:
            break
    out: list[float] = []
    deadline = time.monotonic() + budget_s
    for _ in range(samples):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
        if len(out) >= 3 and time.monotonic() > deadline:
            break
    return out


def measure(ctx: Context) -> Measurement:
    mutations = 1_000_000 if ctx.quick else 10_000_000
    budget = 10.0 if ctx.quick else 30.0  # seconds per query kind, for the warm-up and again the samples
    m = Measurement(
        "reads",
        "Reads on a large store (query layer)",
        method=(
            "A store of format 2 filled directly (see `bench/reads.py`): 10 versions per row, 80 % of the "
            "rows in one table and 20 % in another, 4 changes per transaction, a request id on one "
            "transaction in three, one 5-column image per change, the context once per transaction, "
            "commit times spread over 14 days in a partition a day; indexes from `sql/store.sql`; "
            "ANALYZE of every table (of each partition, as autovacuum does). "
            f"Each call through `cdc.query.Store` on one connection, {WARMUP} warm-up calls then "
            f"{SAMPLES} timed samples with random rows, versions, requests and cursors. Times are "
            "wall-clock in the client, Python decoding included."
        ),
    )
    with server(ctx.flavor) as pg:
        dsn = pg.create_database("bench_reads")
        log(f"reads: filling a store with {mutations:,} mutations")
        m.params = fill_store(dsn, mutations)
        m.params["server_version"] = pg.version
        rows, txns = m.params["rows"], m.params["transactions"]
        accounts = int(rows * ACCOUNTS_SHARE)
        rng = random.Random(42)

        def random_row() -> tuple[str, int]:
            r = rng.randint(1, rows)
            return ("accounts", r) if r <= accounts else ("orders", r - accounts)

        def random_version() -> int:
            return BASE + rng.randrange(txns) * STEP

        def random_request() -> str:
            import hashlib

            t = rng.randrange(0, txns, 3)
            return "req-" + hashlib.md5(str(t).encode()).hexdigest()[:16]

        with Store(dsn, schema=SCHEMA) as store:
            cases: dict[str, tuple[str, Callable[[], Any], bool]] = {
                "row_at": (
                    "row at a version (`row_at`)",
                    lambda: store.row_at(*random_row(), random_version()),
                    True,
                ),
                "row_history": (
                    "row history (`row_history`)",
                    lambda: store.row_history(*random_row()),
                    True,
                ),
                "blame": ("blame (`blame`)", lambda: store.blame(*random_row()), True),
                "request": ("request record (`request`)", lambda: store.request(random_request()), False),
                "table_at": (
                    "table page at a version, 100 rows (`table_at`)",
                    lambda: store.table_at(
                        "accounts", random_version(), after_key=rng.randint(1, accounts), limit=100
                    ),
                    False,
                ),
                "mutation_log": (
                    "mutation log page, 100 mutations (`mutation_log`)",
                    lambda: store.mutation_log(limit=100, before=(random_version(), 0)),
                    False,
                ),
            }
            for name, (label, fn, targeted) in cases.items():
                times = _timed(fn, SAMPLES, budget)
                run = {
                    "query": name,
                    "samples": len(times),
                    "p50_ms": percentile(times, 50),
                    "p99_ms": percentile(times, 99),
                    "max_ms": max(times),
                }
                m.runs.append(run)
                log(f"reads: {name}: p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms")
                if len(times) < SAMPLES:
                    m.notes.append(
                        f"{name}: {len(times)} samples instead of {SAMPLES}, cut at the {budget:.0f} s "
                        "time budget of each query kind."
                    )
                m.figures.append(
                    Figure(
                        f"reads.{name}.p50",
                        f"{label}, p50",
                        "ms",
                        [run["p50_ms"]],
                        note=f"{len(times)} samples",
                    )
                )
                m.figures.append(
                    Figure(
                        f"reads.{name}.p99",
                        f"{label}, p99",
                        "ms",
                        [run["p99_ms"]],
                        target=ROW_TARGET if targeted else None,
                    )
                )
    return m
