"""What one prune removes: the partitions that go, the horizon, the new floor, the keyframes'
sources, and the identity a keyframe staging is checked against (docs/retention.md "Pruning").

Reads only (its callers change the store); takes the pruner's advisory lock and, for the publish,
SHARE locks on the partitions that go. Never logs a row value.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import RetentionConfig
from cdc.lsn import format_lsn
from cdc.store.keyframes import KEYFRAME, ROLLED_BACK, Source, keyless_tables
from cdc.store.retention import _ADVISORY, Partition, bucket_start, list_partitions
from cdc.store.table_refs import table_ids_named

__all__ = ["PARENTS", "PrunePlan", "PruneReport", "make_plan", "orphan_condition", "plan_identity"]

#: The partitioned tables, in the order their partitions are reported and dropped.
PARENTS = ("changes", "transactions", "context_changes")
KF = sql.Literal(KEYFRAME)
COMMITTED = sql.SQL("flags & {} = 0").format(sql.Literal(ROLLED_BACK))

Cursor = psycopg.Cursor[Any]


@dataclass
class PruneReport:
    """What one prune did (or, with ``dry_run``, would do)."""

    dry_run: bool
    now: datetime
    horizon: datetime | None  # partitions ending at or before it are dropped
    old_floor: int | None
    floor: int | None
    partitions: list[str] = field(default_factory=list)  # changes partitions dropped
    transaction_partitions: list[str] = field(default_factory=list)
    context_partitions: list[str] = field(default_factory=list)
    dropped_rows: int = 0  # estimated rows of the dropped changes partitions
    dropped_bytes: int = 0
    keyframes: int = 0  # keyframes written
    keyframes_replaced: int = 0  # older keyframes removed (superseded, truncated, deleted rows)
    kept_rows: int = 0  # changes of longer-retention tables copied to changes_keep
    expired_rows: int = 0  # kept changes whose table's own retention ended
    straggler_rows: int = 0  # changes at or below the floor outside the dropped partitions
    transactions_removed: int = 0  # transactions, context changes at or below the floor outside them
    requests_removed: int = 0  # request errors reported before the horizon
    partitions_created: list[str] = field(default_factory=list)
    staged: bool = False  # the keyframes were computed ahead (stage) and published as they were
    stage_seconds: float = 0.0  # the staging, before the locks (0 for a dry run)
    # In the locked transaction, up to the drop: floor, keyframes (publishing the staged ones, or
    # computing them inline), stragglers, bookkeeping.
    keyframe_seconds: float = 0.0
    publish_seconds: float = 0.0  # the locked transaction: its SHARE locks through the drop's commit
    drop_seconds: float = 0.0  # the DROP of the partitions (ACCESS EXCLUSIVE wait included)
    seconds: float = 0.0  # the whole prune: prepare, stage, publish, request errors

    @property
    def dropped(self) -> list[str]:
        return self.partitions + self.transaction_partitions + self.context_partitions

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.keyframes or self.expired_rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "now": self.now.isoformat(),
            "horizon": self.horizon.isoformat() if self.horizon else None,
            "old_floor": self.old_floor,
            "old_floor_lsn": format_lsn(self.old_floor) if self.old_floor is not None else None,
            "floor": self.floor,
            "floor_lsn": format_lsn(self.floor) if self.floor is not None else None,
            "partitions": self.partitions,
            "transaction_partitions": self.transaction_partitions,
            "context_partitions": self.context_partitions,
            "dropped_rows_estimate": self.dropped_rows,
            "dropped_bytes": self.dropped_bytes,
            "keyframes": self.keyframes,
            "keyframes_replaced": self.keyframes_replaced,
            "kept_rows": self.kept_rows,
            "expired_rows": self.expired_rows,
            "straggler_rows": self.straggler_rows,
            "transactions_removed": self.transactions_removed,
            "requests_removed": self.requests_removed,
            "partitions_created": self.partitions_created,
            "staged": self.staged,
            "stage_seconds": round(self.stage_seconds, 6),
            "keyframe_seconds": round(self.keyframe_seconds, 6),
            "publish_seconds": round(self.publish_seconds, 6),
            "drop_seconds": round(self.drop_seconds, 6),
            "seconds": round(self.seconds, 6),
        }


@dataclass
class PrunePlan:
    """What one prune removes (for the staging and the publish)."""

    schema: str
    old_floor: int | None
    longer: dict[int, timedelta]  # table_id -> its retention, longer than the default
    horizon: datetime | None
    drop: dict[str, list[Partition]]  # parent -> partitions that go
    keep: dict[str, list[Partition]]  # parent -> partitions that stay (DEFAULT excluded)
    default: dict[str, Partition | None]
    # Statement parameters: long, horizon, floor, orphans, protect (the floor, whose kept
    # transaction stays: it gives the floor its time).
    params: dict[str, Any]
    floor: int | None = None
    # parent -> (relation, condition) of what goes: the expired partitions, DEFAULT rows below H
    gone: dict[str, list[Source]] = field(default_factory=dict)
    orphans: list[int] = field(default_factory=list)  # kept rows of tables no longer longer
    sources: list[Source] = field(default_factory=list)  # the changes the keyframes replace
    locked_at: float | None = None  # perf_counter() when the SHARE locks were asked for

    def t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    @property
    def dropped(self) -> list[str]:
        return [p.name for parent in PARENTS for p in self.drop[parent]]

    def retained(self) -> list[Source]:
        """The changes relations that stay: kept partitions, DEFAULT rows from the horizon on."""
        out: list[Source] = [(self.t(p.name), sql.SQL("true")) for p in self.keep["changes"]]
        default = self.default["changes"]
        if default is not None:
            cond = sql.SQL("committed_at >= %(horizon)s") if self.horizon is not None else sql.SQL("true")
            out.append((self.t(default.name), cond))
        return out


def orphan_condition() -> sql.Composable:
    """Kept rows of tables whose retention is no longer longer than the default."""
    return sql.SQL(
        "flags & {} = 0 AND table_id = ANY(%(orphans)s) AND (position <= %(floor)s OR committed_at < %(horizon)s)"
    ).format(KF)


def longer_tables(cur: Cursor, schema: str, retention: RetentionConfig) -> dict[int, timedelta]:
    """The tables whose retention (``retention.tables``) is longer than the default, by id:
    every table that has (or last had) the configured name."""
    out: dict[int, timedelta] = {}
    for name, keep_for in retention.tables.items():
        if keep_for <= retention.default:
            continue
        for table_id in table_ids_named(cur.connection, schema, name):
            out[table_id] = max(keep_for, out.get(table_id, keep_for))
    return out


def archived_tables(cur: Cursor, schema: str) -> list[int]:
    """Tables with kept (non-keyframe) rows, by a skip scan of the kept rows' index."""
    rows = cur.execute(
        sql.SQL(
            "WITH RECURSIVE t AS ("
            "  (SELECT table_id FROM {k} WHERE flags & 256 = 0 ORDER BY table_id LIMIT 1) "
            "  UNION ALL "
            "  SELECT (SELECT table_id FROM {k} WHERE flags & 256 = 0 AND table_id > t.table_id "
            "          ORDER BY table_id LIMIT 1) FROM t WHERE t.table_id IS NOT NULL"
            ") SELECT table_id FROM t WHERE table_id IS NOT NULL"
        ).format(k=sql.Identifier(schema, "changes_keep"))
    ).fetchall()
    return [int(r[0]) for r in rows]


def make_plan(
    cur: Cursor, schema: str, retention: RetentionConfig, report: PruneReport, *, lock: bool, work_mem: str
) -> PrunePlan:
    """What a prune at ``report.now`` removes, its horizon and floor, and the keyframes'
    sources (also written into ``report``); with ``lock``, the partitions that go are locked IN
    SHARE MODE first. Takes the pruner's advisory lock (transaction level)."""
    conn = cur.connection
    cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_ADVISORY + schema,))
    cur.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(work_mem)))
    row = cur.execute(
        sql.SQL("SELECT max(history_floor) FROM {}").format(sql.Identifier(schema, "capture_state"))
    ).fetchone()
    old_floor = int(row[0]) if row and row[0] is not None else None
    report.old_floor = report.floor = old_floor
    longer = longer_tables(cur, schema, retention)
    interval = retention.partition_interval

    parts = {p: list_partitions(conn, schema, p) for p in PARENTS}
    cutoff = report.now - retention.default
    drop = {
        p: [x for x in ps if not x.default and x.hi is not None and x.hi <= cutoff] for p, ps in parts.items()
    }
    keep = {p: [x for x in ps if not x.default and x not in drop[p]] for p, ps in parts.items()}
    default = {p: next((x for x in ps if x.default), None) for p, ps in parts.items()}
    horizon = max((x.hi for ps in drop.values() for x in ps if x.hi is not None), default=None)
    # Rows still in a DEFAULT partition (a dry run, or prepare() could not move them) count as
    # if they were in the partitions of their intervals.
    for d in default.values():
        if d is None:
            continue
        found = cur.execute(
            sql.SQL("SELECT max(committed_at) FROM {} WHERE committed_at < %s").format(
                sql.Identifier(schema, d.name)
            ),
            (bucket_start(cutoff, interval),),
        ).fetchone()
        if found and found[0] is not None:
            horizon = max(horizon or found[0], bucket_start(found[0], interval) + interval)
    report.horizon = horizon
    report.partitions = [p.name for p in drop["changes"]]
    report.transaction_partitions = [p.name for p in drop["transactions"]]
    report.context_partitions = [p.name for p in drop["context_changes"]]
    params: dict[str, Any] = {"long": sorted(longer), "horizon": horizon, "protect": old_floor or -1}
    plan = PrunePlan(schema=schema, old_floor=old_floor, longer=longer, horizon=horizon, drop=drop, keep=keep,
                     default=default, params=params)  # fmt: skip
    if horizon is None:
        return plan
    locked = [*plan.dropped, *(d.name for d in default.values() if d is not None)]
    if lock and locked:
        # No write may land in a partition between the keyframes computed from it and its
        # drop (a backlog replayed with old commit times would), nor in a DEFAULT partition
        # whose rows below the horizon go: SHARE blocks writers into these partitions only,
        # never readers, and first waits for writes in flight.
        plan.locked_at = time.perf_counter()
        cur.execute("SET LOCAL lock_timeout = '10s'")
        cur.execute(
            sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.SQL(", ").join(plan.t(n) for n in locked))
        )
        cur.execute("SET LOCAL lock_timeout = 0")
    if drop["changes"]:
        size = cur.execute(
            "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::bigint, "
            "coalesce(sum(pg_total_relation_size(oid)), 0)::bigint FROM pg_class WHERE oid = ANY(%s::regclass[])",
            ([plan.t(p.name).as_string(conn) for p in drop["changes"]],),
        ).fetchone()
        assert size is not None
        report.dropped_rows, report.dropped_bytes = int(size[0]), int(size[1])

    # What goes: the expired partitions whole, and the DEFAULT partitions' rows below the horizon.
    for parent in PARENTS:
        gone: list[Source] = [(plan.t(p.name), sql.SQL("true")) for p in drop[parent]]
        d = default[parent]
        if d is not None:
            gone.append((plan.t(d.name), sql.SQL("committed_at < %(horizon)s")))
        plan.gone[parent] = gone
    # The floor: the last committed transaction in what goes.
    maxima = [
        sql.SQL("SELECT max(position) AS m FROM {} WHERE {} AND {}").format(rel, cond, COMMITTED)
        for rel, cond in plan.gone["changes"]
    ] + [
        sql.SQL("SELECT max(position) AS m FROM {} WHERE {} AND status = 'c'").format(rel, cond)
        for rel, cond in plan.gone["transactions"]
    ]
    found = cur.execute(
        sql.SQL("SELECT max(m) FROM ({}) x").format(sql.SQL(" UNION ALL ").join(maxima)), params
    ).fetchone()
    floor = old_floor
    if found and found[0] is not None:
        floor = max(floor or 0, int(found[0]))
    report.floor = plan.floor = floor
    params["floor"] = params["protect"] = floor if floor is not None else -1
    if floor is None:
        return plan
    # The keyframes' sources. Removed: what goes, anything else at or below the floor
    # (stragglers: commit times are not exactly in WAL order), and the kept rows of a table
    # whose retention is no longer longer than the default.
    plan.orphans = orphans = sorted(set(archived_tables(cur, schema)) - set(longer))
    params["orphans"] = orphans
    not_long = sql.SQL(" AND table_id <> ALL(%(long)s)")
    sources: list[Source] = [
        (rel, sql.SQL("{}{}").format(cond, not_long)) for rel, cond in plan.gone["changes"]
    ]
    sources += [
        (rel, sql.SQL("{} AND position <= %(floor)s{}").format(cond, not_long))
        for rel, cond in plan.retained()
    ]
    if orphans:
        sources.append((plan.t("changes_keep"), orphan_condition()))
    plan.sources = sources
    return plan


def plan_identity(cur: Cursor, plan: PrunePlan, retention: RetentionConfig) -> dict[str, Any] | None:
    """What a staging depends on, as JSON: equal at publish time (under the SHARE locks) means
    the staged keyframes are exactly what the inline computation would write. None when there is
    nothing to stage, or the keyframes could not be hidden (the floor does not move: pending
    keyframes are told apart by their position above the visible floor)."""
    if plan.horizon is None or plan.floor is None:
        return None
    if plan.old_floor is not None and plan.floor <= plan.old_floor:
        return None
    # The writer writes in position order: a row written into what goes after this point
    # raises one of these maxima (all rows, rolled back ones included).
    marks = []
    for rel, cond in plan.gone["changes"]:
        row = cur.execute(
            sql.SQL("SELECT max(position) FROM {} WHERE {}").format(rel, cond), plan.params
        ).fetchone()
        marks.append(int(row[0]) if row and row[0] is not None else None)
    return {
        "partitions": plan.dropped,
        "default": [d.name for d in plan.default.values() if d is not None],
        "horizon": plan.horizon.isoformat(),
        "old_floor": plan.old_floor,
        "floor": plan.floor,
        "long": sorted(plan.longer),
        "orphans": plan.orphans,
        "keyless": keyless_tables(cur, plan.schema),
        "keyframe_on_prune": retention.keyframe_on_prune,
        "marks": marks,
    }
