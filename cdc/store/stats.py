"""Cheap figures about what a format-2 history store retains (the ``cdc_retention_*`` gauges).

Catalog estimates and index probes only: never a scan of the history, never a row value.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["RetentionStats", "retention_stats"]


@dataclass(frozen=True)
class RetentionStats:
    partitions: int  # of changes, the DEFAULT one included
    rows: int  # estimated (pg_class.reltuples): changes partitions + changes_keep
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
        rows=int(row[1]) + keep_rows,
        bytes=int(row[2]) + keep_bytes,
        oldest=oldest[0] if oldest else None,
        default_rows=int(row[3]),
        keep_rows=keep_rows,
    )
