"""Cheap figures about what a format-2 history store retains (the ``cdc_retention_*`` gauges).

Catalog estimates and index probes, and a count that stops at COUNT_LIMIT rows (beyond, the
planner's estimate): never a scan of a large history, never a row value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["COUNT_LIMIT", "RetentionStats", "count_stored", "retention_stats"]

#: Up to this many rows a table is counted; beyond, its size comes from the planner's estimate.
COUNT_LIMIT = 1_000_000

#: What ``count_stored`` counts: a table of the store and the rows of it that count.
_COUNTED = {
    "changes": ("changes", "true"),
    "changes_keep": ("changes_keep", "flags & 256 = 0"),  # keyframes (256) are not changes
    "transactions": ("transactions", "true"),
    "transactions_keep": ("transactions_keep", "true"),
}


@dataclass(frozen=True)
class RetentionStats:
    partitions: int  # of changes, the DEFAULT one included
    rows: int  # changes retained (count_stored: counted, or the planner's estimate when large)
    bytes: int  # total relation size of the changes partitions and changes_keep
    oldest: datetime | None  # oldest retained commit time (transactions, kept changes)
    default_rows: int  # estimated rows in the DEFAULT partition of changes (should be 0)
    keep_rows: int  # estimated rows of changes_keep (keyframes and longer-retention rows)


def retention_stats(conn: psycopg.Connection[Any], schema: str) -> RetentionStats:
    """What the store holds now, from the catalog and a few index probes (the oldest commit)."""
    row = conn.execute(
        "SELECT count(*), coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint, "
        "coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint, "
        "coalesce(sum(greatest(c.reltuples, 0)) FILTER (WHERE pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'), 0)::bigint "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
        (sql.Identifier(schema, "changes").as_string(conn),),
    ).fetchone()
    keep = conn.execute(
        "SELECT greatest(reltuples, 0)::bigint, pg_total_relation_size(oid) FROM pg_class WHERE oid = to_regclass(%s)",
        (sql.Identifier(schema, "changes_keep").as_string(conn),),
    ).fetchone()
    # The kept rows' oldest: the first entry per table of the kept rows' (table_id, committed_at)
    # index, by a skip scan.
    oldest = conn.execute(
        sql.SQL(
            "WITH RECURSIVE k AS ("
            "  (SELECT table_id, committed_at FROM {k} WHERE flags & 256 = 0 ORDER BY table_id, committed_at LIMIT 1) "
            "  UNION ALL "
            "  SELECT n.table_id, n.committed_at FROM k CROSS JOIN LATERAL (SELECT table_id, committed_at FROM {k} "
            "    WHERE flags & 256 = 0 AND table_id > k.table_id ORDER BY table_id, committed_at LIMIT 1) n"
            ") SELECT least((SELECT min(committed_at) FROM {t}), (SELECT min(committed_at) FROM k))"
        ).format(t=sql.Identifier(schema, "transactions"), k=sql.Identifier(schema, "changes_keep"))
    ).fetchone()
    assert row is not None
    keep_rows, keep_bytes = (int(keep[0]), int(keep[1])) if keep else (0, 0)
    return RetentionStats(
        partitions=int(row[0]),
        rows=count_stored(conn, schema, "changes", "changes_keep")[0],
        bytes=int(row[2]) + keep_bytes,
        oldest=oldest[0] if oldest else None,
        default_rows=int(row[3]),
        keep_rows=keep_rows,
    )


def count_stored(conn: psycopg.Connection[Any], schema: str, *tables: str) -> tuple[int, bool]:
    """(rows, exact) of ``tables`` (``changes``, ``changes_keep``, ``transactions``,
    ``transactions_keep``; keyframes are not changes): a count when there are at most
    :data:`COUNT_LIMIT` rows (a scan stopped there), else the planner's estimate (the rows per
    page of the last ANALYZE or VACUUM, times the pages the tables have now) and ``exact`` False."""
    total, exact = 0, True
    for name in tables:
        table, where = _COUNTED[name]
        relation = sql.Identifier(schema, table)
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM (SELECT FROM {} WHERE {} LIMIT %s) AS r").format(
                relation, sql.SQL(where)
            ),
            (COUNT_LIMIT + 1,),
        ).fetchone()
        counted = int(row[0]) if row else 0
        if counted <= COUNT_LIMIT:
            total += counted
            continue
        exact = False
        total += max(COUNT_LIMIT + 1, _planner_estimate(conn, relation.as_string(conn)))
    return total, exact


def _planner_estimate(conn: psycopg.Connection[Any], relation: str) -> int:
    """Rows of ``relation`` (the leaves of a partitioned one) as the planner estimates them:
    reltuples / relpages of the last ANALYZE (or VACUUM), scaled to the pages there are now."""
    row = conn.execute(
        "SELECT coalesce(sum(CASE WHEN c.reltuples > 0 AND c.relpages > 0 "
        "  THEN c.reltuples / c.relpages * (pg_catalog.pg_relation_size(c.oid) / "
        "    current_setting('block_size')::int) ELSE 0 END), 0)::bigint "
        "FROM pg_catalog.pg_partition_tree(pg_catalog.to_regclass(%s)) p "
        "JOIN pg_catalog.pg_class c ON c.oid = p.relid WHERE p.isleaf",
        (relation,),
    ).fetchone()
    return int(row[0]) if row else 0
