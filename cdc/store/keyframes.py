"""Keyframes: the image, at a history floor, of each row whose last change is being removed.

Used by the pruner (:mod:`cdc.store.prune`) on a format-2 store (docs/retention.md
"Keyframes"). A keyframe is a ``changes_keep`` row with ``op = 'S'``, ``flags`` KEYFRAME (256),
``position = lsn =`` the floor, ``committed_at =`` the horizon, ordinals from
:data:`KEYFRAME_ORDINAL_BASE` up, the ``key_text``, ``image`` and ``schema_id`` of the change it
stands for. Set-based statements over the removed changes; never a row at a time, never a table
lock, never a value in a log line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from cdc.store.format import ChangeFlag

__all__ = [
    "CHANGE_COLUMNS",
    "KEYFRAME",
    "KEYFRAME_ORDINAL_BASE",
    "ROLLED_BACK",
    "Source",
    "compute_keyframes",
    "keyless_tables",
]

#: changes.flags bits (docs/store.md "Change flags"; declared in cdc.store.format).
ROLLED_BACK = int(ChangeFlag.ROLLED_BACK)
INCOMPLETE = int(ChangeFlag.INCOMPLETE)
OVERSIZE = int(ChangeFlag.OVERSIZE)
KEYFRAME = int(ChangeFlag.KEYFRAME)
#: Keyframes take ordinals from here up at their position: after any real change there.
KEYFRAME_ORDINAL_BASE = 1_000_000_000
#: The columns of ``changes`` a writer sends (the key hashes are generated).
CHANGE_COLUMNS = (
    "position",
    "ordinal",
    "committed_at",
    "table_id",
    "schema_id",
    "op",
    "flags",
    "lsn",
    "xid",
    "key_text",
    "image",
    "before",
    "old_key_text",
    "pending",
)

#: (relation, condition): removed changes. Conditions use the caller's named parameters.
Source = tuple[sql.Composable, sql.Composable]
Mode = Literal["write", "stage", "dry_run"]
Cursor = psycopg.Cursor[Any]

_TEMP = ("_kf_trunc", "_kf_ev", "_kf_last", "_kf_kl", "_kf_count", "_kf_new")


def keyless_tables(cur: Cursor, schema: str) -> list[int]:
    """Tables without a key, by their latest schema, as the readers decide."""
    return [
        int(r[0])
        for r in cur.execute(
            sql.SQL(
                "SELECT table_id FROM (SELECT DISTINCT ON (table_id) table_id, key_columns FROM {} "
                "ORDER BY table_id, first_position DESC, schema_id DESC) s WHERE key_columns = '{{}}' ORDER BY 1"
            ).format(sql.Identifier(schema, "table_schemas"))
        ).fetchall()
    ]


def compute_keyframes(
    cur: Cursor,
    schema: str,
    sources: Sequence[Source],
    params: Mapping[str, Any],
    floor: int,
    horizon: datetime | None,
    mode: Mode,
    *,
    keyless: list[int],
    write: bool = True,
) -> tuple[int, int]:
    """Keyframes at ``floor`` for the rows whose last change up to ``floor`` is among the removed
    changes (``sources``) and that still exist there; the older keyframes they replace are
    retired. Returns (keyframes, retired).

    ``mode``: ``"write"`` deletes the retired keyframes and inserts the new ones; ``"stage"``
    inserts the new ones (pending: ``floor`` is above the visible floor) and lists the retired
    ones in ``keyframes_retire`` for the publish to delete; ``"dry_run"`` only counts the new
    ones. ``write=False`` (``retention.keyframe_on_prune: false``) writes none, still retires.

    Keyed tables: per source, the last committed change per row in the order of the
    ``changes_row`` index (``DISTINCT ON (table_id, key_hash, key_text)``), plus the key-changing
    UPDATEs leaving a key; across sources the last per row wins. A row gets a keyframe when that
    last change is an image at its key (I, U, S), no TRUNCATE of its table follows it, and no newer
    keyframe covers it. Tables without a key are multisets: a row value present N times at the
    floor gets N keyframes (its keyframes after the last TRUNCATE, +1 per I/S and per U reaching
    it, -1 per D and per U leaving it).
    """
    keep = sql.Identifier(schema, "changes_keep")
    for name in _TEMP:
        cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
    args = {**params, "keyless": keyless}
    committed = sql.SQL("flags & {} = 0").format(sql.Literal(ROLLED_BACK))
    cur.execute(
        sql.SQL(
            "CREATE TEMP TABLE _kf_trunc ON COMMIT DROP AS "
            "SELECT DISTINCT ON (table_id) table_id, position, ordinal FROM ({}) r "
            "ORDER BY table_id, position DESC, ordinal DESC"
        ).format(
            sql.SQL(" UNION ALL ").join(
                sql.SQL("SELECT table_id, position, ordinal FROM {r} WHERE {c} AND op = 'T' AND {ok}").format(
                    r=rel, c=cond, ok=committed
                )
                for rel, cond in sources
            )
        ),
        args,
    )
    cur.execute(
        "CREATE TEMP TABLE _kf_ev (table_id integer, key_hash bigint, key_text text, at_key boolean, "
        'op "char", image text, schema_id integer, flags smallint, position bigint, ordinal integer) '
        "ON COMMIT DROP"
    )
    contributing = 0
    for rel, cond in sources:
        cur.execute(
            sql.SQL(
                "INSERT INTO _kf_ev SELECT DISTINCT ON (table_id, key_hash, key_text) table_id, key_hash, key_text, "
                "true, op, image, schema_id, flags, position, ordinal FROM {r} WHERE {c} AND {ok} "
                "AND key_text IS NOT NULL AND table_id <> ALL(%(keyless)s) "
                "ORDER BY table_id, key_hash, key_text, position DESC, ordinal DESC"
            ).format(r=rel, c=cond, ok=committed),
            args,
        )
        contributing += cur.rowcount > 0
        cur.execute(
            sql.SQL(
                "INSERT INTO _kf_ev SELECT table_id, old_key_hash, old_key_text, false, op, NULL, schema_id, flags, "
                "position, ordinal FROM {r} WHERE {c} AND {ok} AND old_key_text IS NOT NULL "
                "AND table_id <> ALL(%(keyless)s)"
            ).format(r=rel, c=cond, ok=committed),
            args,
        )
        contributing += 2 * (cur.rowcount > 0)
    if contributing <= 1:  # one source of plain changes: already one row per key
        cur.execute("ALTER TABLE _kf_ev RENAME TO _kf_last")
    else:  # the last per row across sources
        cur.execute(
            "CREATE TEMP TABLE _kf_last ON COMMIT DROP AS SELECT DISTINCT ON (table_id, key_hash, key_text) * "
            "FROM _kf_ev ORDER BY table_id, key_hash, key_text, position DESC, ordinal DESC"
        )
    cur.execute("ANALYZE _kf_last")
    cur.execute(
        "CREATE TEMP TABLE _kf_count (table_id integer, key_hash bigint, key_text text, n bigint) ON COMMIT DROP"
    )
    cur.execute(
        "CREATE TEMP TABLE _kf_kl (table_id integer, key_hash bigint, key_text text, position bigint, "
        "ordinal integer, schema_id integer, flags smallint, d integer, image text) ON COMMIT DROP"
    )
    if keyless:
        _count_keyless(cur, keep, sources, args, committed)
    newer: sql.Composable = sql.SQL("")
    older = cur.execute(
        sql.SQL(
            "SELECT (SELECT min(position) FROM _kf_last) <= "
            "(SELECT max(position) FROM {} WHERE flags & {} <> 0)"
        ).format(keep, sql.Literal(KEYFRAME))
    ).fetchone()
    if older and older[0]:
        # A newer keyframe exists only when a removed change is older than the newest keyframe
        # (kept rows of a table whose retention was shortened): checked only then.
        newer = sql.SQL(
            "AND NOT EXISTS (SELECT 1 FROM {keep} k WHERE k.flags & {kf} <> 0 AND k.table_id = l.table_id "
            "  AND k.key_hash = l.key_hash AND k.key_text = l.key_text "
            "  AND (k.position, k.ordinal) > (l.position, l.ordinal)) "
        ).format(keep=keep, kf=sql.Literal(KEYFRAME))
    carried = sql.Literal(INCOMPLETE | OVERSIZE)
    cur.execute(
        sql.SQL(
            "CREATE TEMP TABLE _kf_new ON COMMIT DROP AS "
            "SELECT l.table_id, l.key_text, l.image, l.schema_id, l.flags & {carried} AS flags, 1::bigint AS n "
            "FROM _kf_last l LEFT JOIN _kf_trunc t ON t.table_id = l.table_id "
            "WHERE l.at_key AND l.op IN ('I', 'U', 'S') "
            "AND (t.table_id IS NULL OR (l.position, l.ordinal) > (t.position, t.ordinal)) {newer}"
            "UNION ALL "
            "SELECT c.table_id, c.key_text, i.image, i.schema_id, i.flags & {carried}, c.n FROM _kf_count c "
            "CROSS JOIN LATERAL (SELECT image, schema_id, flags FROM ("
            "  SELECT e.image, e.schema_id, e.flags, e.position, e.ordinal FROM _kf_kl e "
            "  WHERE e.table_id = c.table_id AND e.key_hash = c.key_hash AND e.key_text = c.key_text "
            "  AND e.image IS NOT NULL "
            "  UNION ALL "
            "  SELECT k.image, k.schema_id, k.flags, k.position, k.ordinal FROM {keep} k "
            "  WHERE k.flags & {kf} <> 0 AND k.table_id = c.table_id AND k.key_hash = c.key_hash "
            "  AND k.key_text = c.key_text"
            ") x ORDER BY position DESC, ordinal DESC LIMIT 1) i "
            "WHERE c.n > 0"
        ).format(carried=carried, newer=newer, keep=keep, kf=sql.Literal(KEYFRAME))
    )
    row = cur.execute("SELECT coalesce(sum(n), 0)::bigint FROM _kf_new").fetchone()
    written = int(row[0]) if row and write else 0
    if mode == "dry_run":
        return written, 0
    replaced = _retire(cur, schema, keep, mode)
    if written:
        base = cur.execute(
            sql.SQL("SELECT greatest(%s, coalesce(max(ordinal) + 1, 0)) FROM {} WHERE position = %s").format(
                keep
            ),
            (KEYFRAME_ORDINAL_BASE, floor),
        ).fetchone()
        assert base is not None
        cur.execute(
            sql.SQL(
                "INSERT INTO {keep} (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, "
                "key_text, image, before, old_key_text, pending) "
                "SELECT %(f)s, %(base)s + row_number() OVER () - 1, %(h)s, n.table_id, n.schema_id, 'S', "
                "n.flags | {kf}, %(f)s, NULL, n.key_text, n.image, NULL, NULL, NULL "
                "FROM _kf_new n CROSS JOIN LATERAL generate_series(1, n.n) AS g(i)"
            ).format(keep=keep, kf=sql.Literal(KEYFRAME)),
            {"f": floor, "base": int(base[0]), "h": horizon},
        )
    return written, replaced


def _count_keyless(
    cur: Cursor,
    keep: sql.Identifier,
    sources: Sequence[Source],
    args: Mapping[str, Any],
    committed: sql.Composable,
) -> None:
    """``_kf_count``: how many copies of each touched row value of a keyless table exist at the
    floor (``_kf_kl``: the events, with an image of the value where the change has one)."""
    for rel, cond in sources:
        cur.execute(
            sql.SQL(
                "INSERT INTO _kf_kl "
                "SELECT table_id, key_hash, key_text, position, ordinal, schema_id, flags, "
                "  CASE WHEN op = 'D' THEN -1 WHEN op = 'U' AND old_key_text IS NULL THEN 0 ELSE 1 END, image "
                "FROM {r} WHERE {c} AND {ok} AND key_text IS NOT NULL AND table_id = ANY(%(keyless)s) "
                "UNION ALL "
                "SELECT table_id, old_key_hash, old_key_text, position, ordinal, schema_id, flags, -1, before "
                "FROM {r} WHERE {c} AND {ok} AND old_key_text IS NOT NULL AND table_id = ANY(%(keyless)s)"
            ).format(r=rel, c=cond, ok=committed),
            args,
        )
    cur.execute(
        sql.SQL(
            "INSERT INTO _kf_count "
            "WITH kf AS ("
            "  SELECT k.table_id, k.key_hash, k.key_text, count(*) AS n, max(k.position) AS position, "
            "    max(k.ordinal) AS ordinal FROM {keep} k "
            "  WHERE k.flags & {kf} <> 0 AND k.table_id = ANY(%(keyless)s) "
            "  AND (k.table_id, k.key_hash, k.key_text) IN (SELECT table_id, key_hash, key_text FROM _kf_kl) "
            "  GROUP BY 1, 2, 3"
            ") "
            "SELECT e.table_id, e.key_hash, e.key_text, "
            "  CASE WHEN kf.key_text IS NOT NULL AND (t.table_id IS NULL OR (kf.position, kf.ordinal) > "
            "    (t.position, t.ordinal)) THEN kf.n ELSE 0 END "
            "  + coalesce(sum(e.d) FILTER (WHERE (t.table_id IS NULL OR (e.position, e.ordinal) > "
            "    (t.position, t.ordinal)) AND (kf.key_text IS NULL OR (e.position, e.ordinal) > "
            "    (kf.position, kf.ordinal))), 0) "
            "FROM _kf_kl e LEFT JOIN _kf_trunc t ON t.table_id = e.table_id "
            "LEFT JOIN kf ON kf.table_id = e.table_id AND kf.key_hash = e.key_hash AND kf.key_text = e.key_text "
            "GROUP BY e.table_id, e.key_hash, e.key_text, kf.key_text, kf.n, kf.position, kf.ordinal, "
            "t.table_id, t.position, t.ordinal"
        ).format(keep=keep, kf=sql.Literal(KEYFRAME)),
        args,
    )


def _retire(cur: Cursor, schema: str, keep: sql.Identifier, mode: Mode) -> int:
    """The older keyframes the new ones replace: superseded by a removed change, killed by a
    removed TRUNCATE, or (keyless) recounted. Deleted now, or (staging) listed for the publish."""
    kf = sql.Literal(KEYFRAME)
    retire = [  # (other relation, condition): k are the older keyframes
        (
            "_kf_last l",
            "k.table_id = l.table_id AND k.key_hash = l.key_hash AND k.key_text = l.key_text "
            "AND (k.position, k.ordinal) < (l.position, l.ordinal)",
        ),
        ("_kf_trunc t", "k.table_id = t.table_id AND (k.position, k.ordinal) < (t.position, t.ordinal)"),
        ("_kf_count c", "k.table_id = c.table_id AND k.key_hash = c.key_hash AND k.key_text = c.key_text"),
    ]
    replaced = 0
    for other, condition in retire:
        if mode == "stage":
            statement = sql.SQL(
                "INSERT INTO {r} SELECT k.position, k.ordinal FROM {keep} k, {o} WHERE k.flags & {kf} <> 0 AND {c} "
                "ON CONFLICT DO NOTHING"
            ).format(
                r=sql.Identifier(schema, "keyframes_retire"),
                keep=keep,
                o=sql.SQL(other),
                c=sql.SQL(condition),
                kf=kf,
            )
        else:
            statement = sql.SQL("DELETE FROM {keep} k USING {o} WHERE k.flags & {kf} <> 0 AND {c}").format(
                keep=keep, o=sql.SQL(other), c=sql.SQL(condition), kf=kf
            )
        cur.execute(statement)
        replaced += max(cur.rowcount, 0)
    return replaced
