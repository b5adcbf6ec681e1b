"""Benchmark: prune one day out of a large synthetic format-2 store (docs/retention.md "Benchmark").

    python -m bench.retention_prune DSN [--changes N] [--days D] [--hot H] [--cold C] [--keep-schema]

Builds ``changes`` changes spread evenly over ``days`` daily partitions (transactions of 10),
then prunes the oldest day as the daemon's pruner does and prints the build time and the prune's
parts. The target: the locked part (``publish_seconds``) of pruning one day of a 10M-change store
under 1 s.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import RetentionConfig
from cdc.errors import UsageError
from cdc.store.prune import Pruner
from cdc.store.retention import AHEAD, bucket_start, ensure_partitions, partition_name
from cdc.store.stats import retention_stats

STORE_SQL = Path(__file__).resolve().parents[1] / "sql" / "store.sql"
PARENTS = ("changes", "transactions", "context_changes")
DAY = timedelta(days=1)


def day_zero(days: int) -> datetime:
    """Midnight UTC of the first day of a store of ``days`` days that ends yesterday."""
    return bucket_start(datetime.now(UTC), DAY) - (days + 1) * DAY


def create_partitions(conn: psycopg.Connection[Any], schema: str, first: datetime, count: int) -> None:
    """Daily partitions of the three partitioned tables from ``first`` on: by ``ensure_partitions``
    when it knows the format-2 tables, else by plain DDL with the same names and bounds."""
    try:
        with conn.transaction():
            ensure_partitions(conn, schema, first, first + (count - 1) * DAY)
            if all(
                conn.execute(
                    "SELECT to_regclass(%s) IS NOT NULL",
                    (sql.Identifier(schema, partition_name(p, first)).as_string(conn),),
                ).fetchone()
                == (True,)
                for p in PARENTS
            ):
                return
    except psycopg.errors.UndefinedTable:
        pass
    with conn.transaction():
        for parent in PARENTS:
            for d in range(count):
                lo = first + d * DAY
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
                    ).format(
                        sql.Identifier(schema, partition_name(parent, lo)),
                        sql.Identifier(schema, parent),
                        sql.Literal(lo),
                        sql.Literal(lo + DAY),
                    )
                )


def bench_prune(
    dsn: str,
    *,
    schema: str = "cdc_bench_prune",
    changes: int = 10_000_000,
    days: int = 10,
    hot: int = 100_000,
    cold: int = 100_000,
    keep_schema: bool = False,
) -> dict[str, Any]:
    """Build a store of ``changes`` changes over ``days`` daily partitions, prune the oldest day,
    and return sizes and timings.

    One keyed table: day one INSERTs ``hot + cold`` rows; every other change is an UPDATE of one
    of the ``hot`` rows (so each is changed every day; the ``cold`` ones never again). Pruning the
    oldest day writes one keyframe per row changed that day: ``hot + cold`` (a hot row's keyframe
    is replaced by the next prune, a cold row's stays). ``stage_seconds`` is the keyframe
    computation ahead of the locks; ``publish_seconds`` the locked transaction, from its SHARE locks
    through the commit of the drop, of which ``keyframe_seconds`` up to the drop and
    ``drop_seconds`` the DROP of the partitions; ``prune_seconds`` the whole prune. ``schema`` is
    dropped first, and at the end unless ``keep_schema`` (then the next days can be pruned with
    ``Pruner(...).prune(day_zero(days) + timedelta(days=days + n, hours=1))``).
    """
    per_day = changes // days
    if hot + cold > per_day or hot <= 0:
        raise UsageError("bench_prune: need 0 < hot and hot + cold <= changes / days")
    day0 = day_zero(days)
    result: dict[str, Any] = {
        "changes": per_day * days,
        "days": days,
        "per_day": per_day,
        "hot": hot,
        "cold": cold,
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))
            conn.execute(STORE_SQL.read_bytes())
        create_partitions(conn, schema, day0, days + AHEAD + 2)
        t = {
            n: sql.Identifier(schema, n)
            for n in ("tables", "table_names", "table_schemas", "changes", "transactions")
        }
        conn.execute(
            sql.SQL("INSERT INTO {} (table_id, relation_oid, first_position) VALUES (1, 16384, 0)").format(
                t["tables"]
            )
        )
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'public', 'bench', 0)").format(t["table_names"]))
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (schema_id, table_id, replica_identity, key_columns, columns, fingerprint, first_position) "
                "VALUES (1, 1, 'd', '{{id}}', %s, 'bench', 0)"
            ).format(t["table_schemas"]),
            (
                json.dumps(
                    [
                        {"name": "id", "type_oid": 20, "type_modifier": -1, "key": True},
                        {"name": "v", "type_oid": 20, "type_modifier": -1, "key": False},
                    ]
                ),
            ),
        )
        built = time.perf_counter()
        step = 86_400_000_000 / per_day  # microseconds between changes
        params: dict[str, Any] = {"day0": day0, "step": step, "born": hot + cold, "hot": hot}
        for day in range(days):
            params.update(lo=day * per_day, hi=(day + 1) * per_day - 1)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {c} (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, key_text, image) "
                    "SELECT 1000000 + (g / 10) * 100, g %% 10, "
                    "%(day0)s + make_interval(secs => ((g / 10) * 10 * %(step)s) / 1e6), 1, 1, "
                    "CASE WHEN g < %(born)s THEN 'I' ELSE 'U' END, 0, 1000000 + g, "
                    "'[' || k || ']', '{{\"id\": ' || k || ', \"v\": ' || g || '}}' "
                    "FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g, "
                    "LATERAL (SELECT CASE WHEN g < %(born)s THEN g ELSE g %% %(hot)s END AS k) k"
                ).format(c=t["changes"]),
                params,
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {t} (position, committed_at, xid, commit_lsn, status, change_count) "
                    "SELECT 1000000 + x * 100, %(day0)s + make_interval(secs => (x * 10 * %(step)s) / 1e6), x, "
                    "1000000 + x * 100 - 16, 'c', 10 "
                    "FROM generate_series(%(lo)s::bigint / 10, %(hi)s::bigint / 10) x"
                ).format(t=t["transactions"]),
                params,
            )
        last = 1000000 + ((per_day * days - 1) // 10) * 100
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (slot_name, acked_lsn, baseline_lsn, baseline_done, history_floor) "
                "VALUES ('bench', %s, 1000000, true, 1000000)"
            ).format(sql.Identifier(schema, "capture_state")),
            (last,),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(t["changes"]))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(t["transactions"]))
        result["build_seconds"] = round(time.perf_counter() - built, 1)
        result["store_bytes"] = retention_stats(conn, schema).bytes
    # As of one hour into day ``days`` with a retention of ``days - 1`` days: the first day expires.
    retention = RetentionConfig(default=(days - 1) * DAY, partition_interval=DAY)
    with Pruner(dsn, schema, retention) as pruner:
        report = pruner.prune(day0 + days * DAY + timedelta(hours=1))
    result.update(
        partitions=report.dropped,
        dropped_rows=report.dropped_rows,
        dropped_bytes=report.dropped_bytes,
        keyframes=report.keyframes,
        staged=report.staged,
        stage_seconds=round(report.stage_seconds, 3),
        publish_seconds=round(report.publish_seconds, 3),
        keyframe_seconds=round(report.keyframe_seconds, 3),
        drop_seconds=round(report.drop_seconds, 3),
        prune_seconds=round(report.seconds, 3),
        floor=report.floor,
    )
    if not keep_schema:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.retention_prune", description=__doc__)
    parser.add_argument("dsn")
    parser.add_argument("--schema", default="cdc_bench_prune")
    parser.add_argument("--changes", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--hot", type=int, default=100_000)
    parser.add_argument("--cold", type=int, default=100_000)
    parser.add_argument("--keep-schema", action="store_true")
    parser.add_argument(
        "--more-days", type=int, default=0, help="then prune this many more days, one at a time"
    )
    args = parser.parse_args(argv)
    result = bench_prune(
        args.dsn, schema=args.schema, changes=args.changes, days=args.days, hot=args.hot, cold=args.cold,
        keep_schema=args.keep_schema or args.more_days > 0,
    )  # fmt: skip
    print(json.dumps(result, indent=2, default=str))
    if args.more_days:
        retention = RetentionConfig(default=(args.days - 1) * DAY, partition_interval=DAY)
        with Pruner(args.dsn, args.schema, retention) as pruner:
            for n in range(1, args.more_days + 1):
                report = pruner.prune(day_zero(args.days) + (args.days + n) * DAY + timedelta(hours=1))
                keys = ("keyframes", "keyframes_replaced", "staged", "stage_seconds", "publish_seconds",
                        "keyframe_seconds", "drop_seconds", "seconds")  # fmt: skip
                print(json.dumps({"day": n, **{k: report.to_json()[k] for k in keys}}))
        if not args.keep_schema:
            with psycopg.connect(args.dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(args.schema)))


if __name__ == "__main__":
    main()
