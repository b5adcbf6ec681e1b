"""The steps of a prune's locked transaction besides the keyframes (docs/retention.md
"Pruning"): rows of longer-retention tables copied to the ``*_keep`` tables and expired there,
stragglers at or below the new floor removed, the floor's stand-in transaction.

Each runs in the caller's transaction (:meth:`cdc.store.prune.Pruner.prune`) and adds its counts
to the report. Never logs a row value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from cdc.store.keyframes import CHANGE_COLUMNS, Mode, Source
from cdc.store.prune_plan import COMMITTED, KF, PrunePlan, PruneReport, orphan_condition

__all__ = ["copy_longer", "expire_longer", "remove_stragglers", "remove_transactions"]

Cursor = psycopg.Cursor[Any]
#: (cursor, sources, params, floor, horizon, mode) -> (keyframes written, retired)
KeyframeFn = Callable[
    [Cursor, Sequence[Source], Mapping[str, Any], int, datetime | None, Mode], tuple[int, int]
]


def copy_longer(cur: Cursor, report: PruneReport, plan: PrunePlan) -> None:
    """Rows of longer-retention tables: copied unchanged out of what goes into ``changes_keep``,
    with their transactions and context changes (``transactions_keep``, ``context_changes_keep``)."""
    if not plan.longer:
        return
    params = plan.params
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in CHANGE_COLUMNS)
    if report.dry_run:
        for rel, cond in plan.gone["changes"]:
            counted = cur.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE {} AND table_id = ANY(%(long)s)").format(rel, cond),
                params,
            ).fetchone()
            report.kept_rows += int(counted[0]) if counted else 0
        return
    cur.execute("DROP TABLE IF EXISTS _kept_positions")
    cur.execute("CREATE TEMP TABLE _kept_positions (position bigint PRIMARY KEY) ON COMMIT DROP")
    for rel, cond in plan.gone["changes"]:
        copied = cur.execute(
            sql.SQL(
                "WITH c AS (INSERT INTO {k} ({c}) SELECT {c} FROM {r} WHERE {cond} AND table_id = ANY(%(long)s) "
                "ON CONFLICT DO NOTHING RETURNING position), "
                "p AS (INSERT INTO _kept_positions SELECT DISTINCT position FROM c ON CONFLICT DO NOTHING) "
                "SELECT count(*) FROM c"
            ).format(k=plan.t("changes_keep"), c=cols, r=rel, cond=cond),
            params,
        ).fetchone()
        report.kept_rows += int(copied[0]) if copied else 0
    for parent, target in (
        ("transactions", "transactions_keep"),
        ("context_changes", "context_changes_keep"),
    ):
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in _columns(cur, plan.schema, target))
        for rel, cond in plan.gone[parent]:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {k} ({c}) SELECT {c} FROM {r} WHERE {cond} "
                    "AND position IN (SELECT position FROM _kept_positions) ON CONFLICT DO NOTHING"
                ).format(k=plan.t(target), c=columns, r=rel, cond=cond),
                params,
            )


def remove_stragglers(cur: Cursor, report: PruneReport, plan: PrunePlan) -> None:
    """Changes at or below the floor outside what goes (commit times follow WAL order only to a
    few milliseconds; rolled-back rows), and the kept rows of tables no longer longer."""
    params = plan.params
    for rel, cond in plan.retained():
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE {} AND position <= %(floor)s AND table_id <> ALL(%(long)s)").format(
                rel, cond
            ),
            params,
        )
        report.straggler_rows += max(cur.rowcount, 0)
    if plan.orphans:
        report.straggler_rows += _delete_kept(cur, plan, orphan_condition(), params)


def _delete_kept(cur: Cursor, plan: PrunePlan, condition: sql.Composable, params: Mapping[str, Any]) -> int:
    """Delete kept changes (not keyframes) matching ``condition``, and the kept transactions and
    context changes no kept change refers to any more (but the floor's: it gives the floor its
    time). Returns the changes deleted."""
    cur.execute("CREATE TEMP TABLE IF NOT EXISTS _unkept (position bigint) ON COMMIT DROP")
    cur.execute("TRUNCATE _unkept")
    cur.execute(
        sql.SQL(
            "WITH d AS (DELETE FROM {k} WHERE {c} RETURNING position) INSERT INTO _unkept SELECT position FROM d"
        ).format(k=plan.t("changes_keep"), c=condition),
        params,
    )
    count = max(cur.rowcount, 0)
    if count:
        for target in ("transactions_keep", "context_changes_keep"):
            cur.execute(
                sql.SQL(
                    "DELETE FROM {t} t WHERE t.position IN (SELECT DISTINCT position FROM _unkept) "
                    "AND t.position <> %(protect)s "
                    "AND NOT EXISTS (SELECT 1 FROM {k} k WHERE k.position = t.position AND k.flags & {kf} = 0)"
                ).format(t=plan.t(target), k=plan.t("changes_keep"), kf=KF),
                params,
            )
    return count


def remove_transactions(cur: Cursor, report: PruneReport, plan: PrunePlan, written: int) -> None:
    """What goes of the partitions outside the dropped ones: DEFAULT rows below the horizon (the
    longer-retention ones were copied), transactions and context changes at or below the floor
    whose changes are gone; then one transaction row at the floor, at the horizon, so that the
    floor keeps a commit time (unless the floor's own transaction is kept)."""
    params = plan.params
    d = plan.default["changes"]
    if d is not None:
        cur.execute(sql.SQL("DELETE FROM {} WHERE committed_at < %(horizon)s").format(plan.t(d.name)), params)
        report.straggler_rows += max(cur.rowcount, 0)
    if plan.floor is None:
        return
    for parent in ("transactions", "context_changes"):
        for p in [*plan.keep[parent], plan.default[parent]]:
            if p is None:
                continue
            cur.execute(
                sql.SQL(
                    "DELETE FROM {} t WHERE t.committed_at < %(horizon)s OR (t.position <= %(floor)s "
                    "AND NOT EXISTS (SELECT 1 FROM {c} c WHERE c.position = t.position))"
                ).format(plan.t(p.name), c=plan.t("changes")),
                params,
            )
            report.transactions_removed += max(cur.rowcount, 0)
    cur.execute(
        sql.SQL(
            "INSERT INTO {t} (position, committed_at, xid, commit_lsn, status, flags, origin, change_count) "
            "SELECT %(floor)s, %(horizon)s, 0, NULL, 'c', 0, 'cdc.prune', %(written)s "
            "WHERE NOT EXISTS (SELECT 1 FROM {tk} WHERE position = %(floor)s) ON CONFLICT DO NOTHING"
        ).format(t=plan.t("transactions"), tk=plan.t("transactions_keep")),
        {**params, "written": written},
    )


def expire_longer(cur: Cursor, report: PruneReport, plan: PrunePlan, keyframes: KeyframeFn) -> None:
    """Longer-retention tables whose own retention ended: their kept rows up to
    ``now - retention`` go, with keyframes at the table's own floor (its last committed position
    among them)."""
    for table_id, keep_for in sorted(plan.longer.items()):
        expired, written, replaced = _expire_kept(
            cur, plan, table_id, report.now - keep_for, report.dry_run, keyframes
        )
        report.expired_rows += expired
        report.keyframes += written
        report.keyframes_replaced += replaced


def _expire_kept(
    cur: Cursor, plan: PrunePlan, table_id: int, horizon: datetime, dry_run: bool, keyframes: KeyframeFn
) -> tuple[int, int, int]:
    keep = plan.t("changes_keep")
    row = cur.execute(
        sql.SQL(
            "SELECT max(position) FILTER (WHERE {ok}), count(*) FROM {k} "
            "WHERE flags & {kf} = 0 AND table_id = %s AND committed_at < %s"
        ).format(ok=COMMITTED, k=keep, kf=KF),
        (table_id, horizon),
    ).fetchone()
    if row is None or not row[1]:
        return 0, 0, 0
    floor = int(row[0]) if row[0] is not None else None
    params = {**plan.params, "t": table_id, "h": horizon, "f": floor if floor is not None else -1}
    kept = sql.SQL(
        "flags & {} = 0 AND table_id = %(t)s AND (committed_at < %(h)s OR position <= %(f)s)"
    ).format(KF)
    # What stays in the partitions at or below the table's floor (not what goes now: its rows of
    # this table were just copied to changes_keep).
    in_partitions = [
        (rel, sql.SQL("{} AND table_id = %(t)s AND position <= %(f)s").format(cond))
        for rel, cond in plan.retained()
    ]
    written = replaced = 0
    if floor is not None:
        written, replaced = keyframes(
            cur, [(keep, kept), *in_partitions], params, floor, horizon, "dry_run" if dry_run else "write"
        )
    if dry_run:
        return int(row[1]), written, replaced
    count = _delete_kept(cur, plan, kept, params)
    for rel, cond in in_partitions:
        cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(rel, cond), params)
        count += max(cur.rowcount, 0)
    return count, written, replaced


def _columns(cur: Cursor, schema: str, table: str) -> list[str]:
    """The columns of ``schema.table`` in order (generated columns left out)."""
    rows = cur.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
        "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
        (sql.Identifier(schema, table).as_string(cur.connection),),
    ).fetchall()
    return [str(r[0]) for r in rows]
