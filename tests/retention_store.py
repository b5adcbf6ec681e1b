"""Helpers of the retention and erasure tests (history itself: tests/store_builder.py).

An oracle independent of the query layer: :func:`replay` (a table at a version, replayed from
every committed change in ``changes_all``) and :func:`row_at` (one row at a version, read the way
docs/store.md "Reading" says); :func:`create_partitions` (daily partitions by plain DDL, until
``ensure_partitions`` knows the format-2 tables); :func:`model` (the builder's rows as a
multiset).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from cdc.store.retention import partition_name
from tests.store_builder import StoreBuilder

PARENTS = ("changes", "transactions", "context_changes")
DAY = timedelta(days=1)


def canonical(image: str | Mapping[str, Any]) -> str:
    """A row image as sorted JSON (for multiset comparisons)."""
    value = json.loads(image) if isinstance(image, str) else image
    return json.dumps(value, sort_keys=True)


def model(b: StoreBuilder, table: str, version: int | None = None) -> Counter[str]:
    """The builder's own idea of a table (now, or at ``version``) as a multiset of rows."""
    rows = b.state(table) if version is None else b.state_at(table, version)
    return Counter(canonical(r) for r in rows)


def create_partitions(conn: psycopg.Connection[Any], schema: str, first: datetime, count: int) -> None:
    """Daily partitions of the three partitioned tables (plain DDL, the names and bounds
    ensure_partitions gives them: it creates them itself once it knows the format-2 tables)."""
    with conn.transaction():
        for parent in PARENTS:
            for d in range(count):
                lo = first + d * DAY
                conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(schema, partition_name(parent, lo)), sql.Identifier(schema, parent),
                        sql.Literal(lo), sql.Literal(lo + DAY),
                    )
                )  # fmt: skip


# ============================================================================ the oracle


def _changes(
    conn: psycopg.Connection[Any], schema: str, table_id: int, version: int
) -> list[tuple[Any, ...]]:
    return conn.execute(
        sql.SQL(
            "SELECT op, key_text, image, old_key_text FROM {} WHERE table_id = %s AND flags & 1 = 0 "
            "AND position <= %s ORDER BY position, ordinal"
        ).format(sql.Identifier(schema, "changes_all")),
        (table_id, version),
    ).fetchall()


def replay(
    conn: psycopg.Connection[Any], schema: str, table_id: int, keyless: bool, version: int
) -> Counter[str]:
    """The table at ``version``, replayed from every committed change in ``changes_all`` up to
    it (keyframes included), as a multiset of canonical rows. Exact at and above the floor."""
    keyed: dict[str, str] = {}
    bag: Counter[str] = Counter()
    images: dict[str, str] = {}
    for op, key, image, old_key in _changes(conn, schema, table_id, version):
        if op == "T":
            keyed.clear()
            bag.clear()
        elif not keyless:
            if old_key is not None:
                keyed.pop(old_key, None)
            if op == "D":
                keyed.pop(key, None)
            else:
                keyed[key] = image
        else:
            if op == "D" or (op == "U" and old_key is not None):
                gone = key if op == "D" else old_key
                assert bag[gone] > 0, f"{op} of a value not in the replayed state"
                bag[gone] -= 1
                bag += Counter()
            if op in ("I", "S") or (op == "U" and old_key is not None):
                bag[key] += 1
                images[key] = image
    if not keyless:
        return Counter(canonical(i) for i in keyed.values())
    return Counter({canonical(images[k]): n for k, n in bag.items() if n > 0})


def row_at(conn: psycopg.Connection[Any], schema: str, table_id: int, key: str, version: int) -> str | None:
    """Row ``key`` at ``version`` as docs/store.md "Reading" says: the latest committed change at
    or before it with that key or old key decides; a later TRUNCATE makes it absent."""
    row = conn.execute(
        sql.SQL(
            "SELECT op, key_text, image, position, ordinal FROM {c} WHERE table_id = %(t)s AND flags & 1 = 0 "
            'AND position <= %(v)s AND ((key_hash = hashtextextended(%(k)s COLLATE "C", 0) AND key_text = %(k)s) '
            'OR (old_key_hash = hashtextextended(%(k)s COLLATE "C", 0) AND old_key_text = %(k)s)) '
            "ORDER BY position DESC, ordinal DESC LIMIT 1"
        ).format(c=sql.Identifier(schema, "changes_all")),
        {"t": table_id, "v": version, "k": key},
    ).fetchone()
    if row is None or row[1] != key or row[0] not in ("I", "U", "S"):
        return None
    truncated = conn.execute(
        sql.SQL(
            "SELECT 1 FROM {} WHERE table_id = %s AND op = 'T' AND flags & 1 = 0 AND position <= %s "
            "AND (position, ordinal) > (%s, %s)"
        ).format(sql.Identifier(schema, "changes_all")),
        (table_id, version, row[3], row[4]),
    ).fetchone()
    return None if truncated else canonical(row[2])
