# ruff: noqa: I001
"""Retention: time partitions, pruning with keyframes and the history floor; capture while pruning.

Two kinds of stores: synthetic history written with tests/store_builder.py over many days (its
rows land in the DEFAULT partition; the pruner moves them into daily partitions first), and real
capture whose history is moved into the past before the pruner runs beside the daemon.

The oracle of a table's state at a version is ``rebuild()`` of tests/capture_env.py over the
stored mutations, taken BEFORE pruning (and cross-checked with the builder's own model).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from psycopg import sql

# Format-1 writer and assembler: this module is ported to store format 2 on the retention branch.
pytest.importorskip("cdc.assembler", reason="written for store format 1 (ported on the retention branch)")

from cdc.assembler import COMMITTED, ROLLED_BACK, Mutation
from cdc.config import RetentionConfig
from cdc.devdb import LocalPostgres
from cdc.history import History
from cdc.metrics import Metrics
from cdc.query import Store
from cdc.store.retention import (
    KEYFRAME_ORDINAL_BASE,
    Pruner,
    bucket_start,
    ensure_partitions,
    list_partitions,
    partition_name,
)
from cdc.store.writer import Batch, StoreWriter, TransactionRow
from tests.capture_env import CaptureEnv, rebuild, source_rows
from tests.store_builder import INT4, INT8, TEXT, StoreBuilder, Txn

SCHEMA = "cdc_history"
START = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)
USERS = {"id": INT8, "email": TEXT, "plan": TEXT}
PAIRS = {"a": INT4, "b": TEXT, "v": TEXT}
LOOSE = {"x": INT4, "y": TEXT}
AUDIT = {"id": INT8, "note": TEXT}
TABLES = ("public.users", "public.pairs", "public.loose", "public.audit")


# ============================================================================ helpers


class _StoreOnly:
    """What ``rebuild()`` needs of a CaptureEnv: a connection to the store."""

    def __init__(self, dsn: str, schema: str = SCHEMA) -> None:
        self.dsn = dsn
        self.schema = schema

    def store(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.dsn, autocommit=True)
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
        return conn


def oracle(dsn: str, table: str, version: int) -> Counter[str]:
    return rebuild(_StoreOnly(dsn), table, version)  # type: ignore[arg-type]


def rows_counter(rows: list[dict[str, Any]] | None) -> Counter[str]:
    assert rows is not None
    return Counter(json.dumps(r, sort_keys=True) for r in rows)


def rebuild_all(dsn: str, table: str, schema: str = SCHEMA) -> Counter[str]:
    """The table now, replayed from every stored mutation, keyframes included (they come first:
    position = floor), as rebuild() does from the unpruned history."""
    rows: Counter[str] = Counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
        found = conn.execute(
            "SELECT op, before, after FROM mutations_all WHERE table_name = %s AND version IS NOT NULL "
            "ORDER BY position, ordinal",
            (table,),
        ).fetchall()
    for op, before, after in found:
        if op == "TRUNCATE":
            rows.clear()
            continue
        if before is not None and op in ("UPDATE", "DELETE"):
            text = json.dumps(before, sort_keys=True)
            assert rows[text] > 0, f"{op} of a row not in the rebuilt state: {text}"
            rows[text] -= 1
            if rows[text] == 0:
                del rows[text]
        if after is not None:
            rows[json.dumps(after, sort_keys=True)] += 1
    return rows


def store_dump(dsn: str, schema: str = SCHEMA) -> dict[str, list[Any]]:
    """Every row of every table of the schema (for "nothing changed" checks)."""
    out: dict[str, list[Any]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY 1",
                (schema,),
            ).fetchall()
        ]
        for name in names:
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {} t ORDER BY 1").format(sql.Identifier(schema, name))
            ).fetchall()
            out[name] = [r[0] for r in rows]
    return out


@pytest.fixture(scope="module")
def database(pg: LocalPostgres) -> Iterator[Any]:
    names: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:8]}"
        names.append(name)
        return pg.create_database(name)

    yield make
    for name in names:
        pg.drop_database(name)


# ============================================================================ synthetic history


class History10:
    """Ten days of random history (plus a baseline the day before) with every kind of change."""

    def __init__(self, dsn: str, *, days: int = 10, per_day: int = 12, seed: int = 5) -> None:
        self.b = StoreBuilder(dsn)
        self.rng = random.Random(seed)
        self.next_id = 1000
        self.model: dict[int, dict[str, Counter[str]]] = {}  # version -> table -> rows (the builder's model)
        self.times: dict[int, datetime] = {}  # committed position -> commit time
        b = self.b
        b.table("users", USERS)
        b.table("pairs", PAIRS, key=["a", "b"])
        b.table("loose", LOOSE, key=[])
        b.table("audit", AUDIT)
        baseline = START - timedelta(hours=1)
        with b.txn(baseline) as t:
            for i in range(1, 21):
                t.snapshot("users", {"id": i, "email": f"u{i}@x.org", "plan": "free"})
            for a in range(3):
                t.snapshot("pairs", {"a": a, "b": "k", "v": "0"})
            for _ in range(3):
                t.snapshot("loose", {"x": 1, "y": "p"})  # three identical rows
            t.snapshot("loose", {"x": 2, "y": None})
            t.snapshot("audit", {"id": 1, "note": "created"})
        self._record(baseline)
        self.baseline = b.positions[-1]
        for day in range(days):
            self.day(START + day * DAY, per_day, truncate_pairs=day == 2, truncate_loose=day == 7)
        b.finish(baseline=self.baseline, floor=self.baseline)

    def _record(self, when: datetime) -> None:
        position = self.b.positions[-1]
        if position in self.times:
            return
        self.times[position] = when
        self.model[position] = {
            f"public.{name}": Counter(json.dumps(r, sort_keys=True) for r in self.b.state(name))
            for name in ("users", "pairs", "loose", "audit")
        }

    def day(
        self, day: datetime, per_day: int, *, truncate_pairs: bool = False, truncate_loose: bool = False
    ) -> None:
        for k in range(per_day):
            when = day + k * (DAY / per_day) + timedelta(minutes=7)
            rolled_back = self.rng.random() < 0.08
            with self.b.txn(
                when, f"req-{uuid.uuid4().hex[:12]}", status="rolled_back" if rolled_back else "committed"
            ) as t:
                if truncate_pairs and k == per_day // 2:
                    t.truncate("pairs")
                    t.insert("pairs", {"a": 9, "b": "after-truncate", "v": "1"})
                elif truncate_loose and k == per_day // 2:
                    t.truncate("loose")
                    t.insert("loose", {"x": 7, "y": "q"})
                else:
                    for _ in range(self.rng.randint(1, 4)):
                        self.op(t)
            if not rolled_back:
                self._record(when)

    def op(self, t: Txn) -> None:
        rng = self.rng
        users = t._t("users").rows
        action = rng.random()
        if action < 0.18 or len(users) < 3:
            self.next_id += 1
            t.insert("users", {"id": self.next_id, "email": f"n{self.next_id}@x.org", "plan": "free"})
        elif action < 0.36:
            row = rng.choice(list(users.values()))
            t.update("users", row["id"], {"plan": rng.choice(["free", "pro", "team", None])})
        elif action < 0.44:
            row = rng.choice(list(users.values()))
            self.next_id += 1
            t.update("users", row["id"], {"id": self.next_id})  # key change
        elif action < 0.52:
            row = rng.choice(list(users.values()))
            t.delete("users", row["id"])
        elif action < 0.64:
            pairs = t._t("pairs").rows
            a, b = rng.randint(0, 4), rng.choice(["k", "l"])
            if json.dumps({"a": a, "b": b}, sort_keys=True) in pairs:
                if rng.random() < 0.5:
                    t.update("pairs", {"a": a, "b": b}, {"v": str(rng.randint(0, 99))})
                else:
                    t.delete("pairs", {"a": a, "b": b})
            else:
                t.insert("pairs", {"a": a, "b": b, "v": "new"})
        elif action < 0.80:
            t.insert("loose", {"x": rng.randint(1, 3), "y": rng.choice(["p", "q"])})  # duplicates
        elif action < 0.88:
            bag = t._t("loose").bag
            if bag:
                t.delete("loose", dict(rng.choice(bag)))
        elif action < 0.94:
            bag = t._t("loose").bag
            if bag:
                t.update("loose", dict(rng.choice(bag)), {"y": rng.choice(["p", "q", "u"])})
        else:
            audit = t._t("audit").rows
            if audit and rng.random() < 0.5:
                row = rng.choice(list(audit.values()))
                t.update("audit", row["id"], {"note": f"edit {rng.randint(0, 999)}"})
            else:
                self.next_id += 1
                t.insert("audit", {"id": self.next_id, "note": "new"})

    def floor_for(self, horizon: datetime) -> int:
        return max(p for p, when in self.times.items() if when < horizon)


def assert_time_travel(dsn: str, expected: dict[int, dict[str, Counter[str]]], floor: int) -> None:
    """Every version at or above the floor reads as expected; below it every read is None."""
    with History(dsn) as h:
        assert h.earliest_version() == floor
        for version, tables in sorted(expected.items()):
            view = h.at(version=version)
            for table, rows in tables.items():
                if version < floor:
                    assert not view.exact
                    assert view.table(table).collect() is None
                    continue
                assert view.exact, version
                got = rows_counter(view.table(table).collect())
                assert got == rows, f"{table} at {version:#x} (floor {floor:#x})"
                if table != "public.loose":  # keyed: single-row reads agree too
                    for text in rows:
                        row = json.loads(text)
                        key = row["id"] if table != "public.pairs" else {"a": row["a"], "b": row["b"]}
                        assert view.table(table).get(key) == row


@pytest.fixture
def ten_days(database: Any) -> Iterator[History10]:
    history = History10(database())
    yield history
    history.b.close()


def retention(default: timedelta, **tables: timedelta) -> RetentionConfig:
    return RetentionConfig(
        default=default,
        tables={f"public.{k}": v for k, v in tables.items()},
        partition_interval=DAY,
        prune_interval=timedelta(hours=1),
    )


def partitions(dsn: str, parent: str = "mutations") -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [p.name for p in list_partitions(conn, SCHEMA, parent)]


# ============================================================================ tests


def test_prune_to_the_floor_keeps_time_travel_exact(ten_days: History10) -> None:
    h10 = ten_days
    dsn = h10.b.dsn
    # The oracle, from the stored mutations before anything is pruned; the builder's model agrees.
    expected = {v: {t: oracle(dsn, t, v) for t in TABLES} for v in sorted(h10.model)}
    assert expected == h10.model
    metrics = Metrics(CollectorRegistry())
    now = START + 10 * DAY + timedelta(hours=12)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY), metrics=metrics) as pruner:
        plan = pruner.prune(now, dry_run=True)
        # (a dry run creates no partition: everything is still in the DEFAULT ones)
        assert partitions(dsn) == ["mutations_default"]
        report = pruner.prune(now)
    horizon = START + 6 * DAY
    floor = h10.floor_for(horizon)
    assert report.horizon == horizon and report.floor == floor
    assert (plan.floor, plan.keyframes) == (report.floor, report.keyframes)
    assert report.keyframes > 0 and report.kept_rows > 0
    # The baseline day and the first six days are gone, from both partitioned tables.
    assert report.partitions == [partition_name("mutations", START + d * DAY) for d in range(-1, 6)]
    assert report.transaction_partitions == [
        partition_name("transactions", START + d * DAY) for d in range(-1, 6)
    ]
    left = partitions(dsn)
    assert left[0] == partition_name("mutations", horizon) and "mutations_default" in left
    assert partitions(dsn, "transactions")[0] == partition_name("transactions", horizon)
    with h10.b.conn.cursor() as cur:
        cur.execute("SET search_path = cdc_history")
        assert cur.execute(
            "SELECT count(*) FROM mutations WHERE committed_at < %s", (horizon,)
        ).fetchone() == (0,)
        assert cur.execute("SELECT count(*) FROM mutations_default").fetchone() == (0,)
        # Keyframes: SNAPSHOTs at the floor, at the horizon, marked, no request.
        bad = cur.execute(
            "SELECT count(*) FROM mutations_keep WHERE keyframe AND NOT (op = 'SNAPSHOT' AND position = %s "
            "AND version = %s AND committed_at = %s AND request_id IS NULL AND context = '{\"keyframe\": true}' "
            "AND ordinal >= %s)",
            (floor, floor, horizon, KEYFRAME_ORDINAL_BASE),
        ).fetchone()
        assert bad == (0,)
        # Keyless: a row value has as many keyframes as identical rows at the floor.
        loose = Counter(
            json.dumps(r[0], sort_keys=True)
            for r in cur.execute(
                "SELECT key FROM mutations_keep WHERE keyframe AND table_name = 'public.loose'"
            ).fetchall()
        )
        assert loose and all(expected[floor]["public.loose"][value] == n for value, n in loose.items())
        # The longer-retention table kept its whole history.
        kept = cur.execute(
            "SELECT count(*) FROM mutations_keep WHERE NOT keyframe AND table_name = 'public.audit'"
        ).fetchone()
        assert kept is not None and kept[0] == report.kept_rows
    assert_time_travel(dsn, expected, floor)
    # Metrics.
    assert metrics.pruned_partitions._value.get() == 14  # type: ignore[attr-defined]
    assert metrics.keyframes_written._value.get() == report.keyframes  # type: ignore[attr-defined]
    assert metrics.retention_partitions._value.get() == len(partitions(dsn))  # type: ignore[attr-defined]
    # (the longer-retention table keeps rows older than the horizon)
    oldest = metrics.retention_oldest_seconds._value.get()  # type: ignore[attr-defined]
    assert (START - timedelta(hours=1)).timestamp() <= oldest < horizon.timestamp()
    assert metrics.prune_seconds._value.get() > 0  # type: ignore[attr-defined]

    # Nothing more to do at the same time: nothing changes.
    before = store_dump(dsn)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY)) as pruner:
        again = pruner.prune(now)
    assert not again.changed and again.floor == floor
    after = store_dump(dsn)
    after.pop("prunes"), before.pop("prunes")
    after.pop("retention_state"), before.pop("retention_state")
    assert after == before

    # History goes on after the prune; a later prune replaces keyframes and moves the floor.
    for day in (10, 11):
        h10.day(START + day * DAY, 10)
    h10.b.finish(baseline=h10.baseline, floor=floor)
    later = START + 12 * DAY + timedelta(hours=1)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY)) as pruner:
        second = pruner.prune(later)
    horizon2 = START + 8 * DAY
    floor2 = h10.floor_for(horizon2)
    assert second.floor == floor2 and second.partitions == [
        partition_name("mutations", START + d * DAY) for d in (6, 7)
    ]
    newer = {v: tables for v, tables in h10.model.items()}
    for v in list(newer):
        if v in expected:
            assert newer[v] == expected[v]
    assert_time_travel(dsn, newer, floor2)
    for table in TABLES:
        assert rebuild_all(dsn, table) == h10.model[max(h10.model)][table]


def test_row_history_and_blame_after_pruning(ten_days: History10) -> None:
    dsn = ten_days.b.dsn
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY)) as pruner:
        report = pruner.prune(START + 10 * DAY + timedelta(hours=12))
    assert report.floor is not None
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path = cdc_history")
        # A user row last changed before the horizon: its history is its keyframe.
        row = conn.execute(
            "SELECT key FROM mutations_keep WHERE keyframe AND table_name = 'public.users' ORDER BY key LIMIT 1"
        ).fetchone()
        assert row is not None
        user_id = row[0]["id"]
        audit_rows = conn.execute(
            "SELECT DISTINCT key->>'id' FROM mutations_keep WHERE NOT keyframe AND table_name = 'public.audit'"
        ).fetchall()
    with History(dsn) as h:
        history = h.row_history("users", user_id)
        assert history[0].op == "SNAPSHOT" and history[0].context == {"keyframe": True}
        assert history[0].version == report.floor
        if len(history) == 1:
            blame = h.blame("users", user_id)
            # Written before the history floor: no request, no time.
            assert all(e.committed_at is None and e.request_id is None for e in blame)
        # The audit table (longer retention) still has its changes from the pruned days.
        for (audit_id,) in audit_rows:
            changes = h.row_history("audit", int(audit_id))
            assert (
                changes
                and changes[0].op in ("INSERT", "SNAPSHOT")
                and changes[0].context != {"keyframe": True}
            )
        # The floor has a time: the horizon.
        assert h.version_at_timestamp(START + 6 * DAY) == report.floor
        assert h.version_at_timestamp(START + 6 * DAY - timedelta(seconds=1)) is None


def test_longer_retention_table_expires_later_with_keyframes(ten_days: History10) -> None:
    h10 = ten_days
    dsn = h10.b.dsn
    expected = {v: {t: oracle(dsn, t, v) for t in TABLES} for v in sorted(h10.model)}
    now = START + 10 * DAY + timedelta(hours=12)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=7 * DAY)) as pruner:
        first = pruner.prune(now)
        # audit's own horizon (now - 7 days) is inside the kept rows: the older ones expire
        assert first.kept_rows > 0 and first.expired_rows > 0
        floor = first.floor
        assert floor is not None
        assert_time_travel(dsn, expected, floor)
        # Later, when its retention is over entirely, only keyframes remain of its old rows.
        second = pruner.prune(now + 5 * DAY)
    assert second.floor is not None
    with psycopg.connect(dsn, autocommit=True) as conn:
        kept = conn.execute(
            "SELECT count(*) FROM cdc_history.mutations_keep WHERE NOT keyframe AND committed_at < %s",
            (now + 5 * DAY - 7 * DAY,),
        ).fetchone()
    assert kept == (0,)
    assert_time_travel(dsn, expected, second.floor)


def test_tables_back_to_the_default_retention_drop_their_kept_rows(ten_days: History10) -> None:
    dsn = ten_days.b.dsn
    expected = {v: {t: oracle(dsn, t, v) for t in TABLES} for v in sorted(ten_days.model)}
    now = START + 10 * DAY + timedelta(hours=12)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY)) as pruner:
        first = pruner.prune(now)
    with Pruner(dsn, SCHEMA, retention(4 * DAY)) as pruner:  # audit: back to 4 days
        second = pruner.prune(now + DAY)
    assert first.kept_rows > 0 and second.straggler_rows >= first.kept_rows
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM cdc_history.mutations_keep WHERE NOT keyframe"
        ).fetchone() == (0,)
    assert second.floor is not None
    assert_time_travel(dsn, expected, second.floor)


def test_ensure_partitions_creates_both_tables_and_adopts_default_rows(database: Any) -> None:
    b = StoreBuilder(database())
    try:
        b.table("users", USERS)
        when = datetime(2026, 5, 17, 13, 30, tzinfo=UTC)
        with b.txn(when) as t:
            t.insert("users", {"id": 1, "email": "a", "plan": None})
        with b.conn.transaction():
            created = ensure_partitions(b.conn, SCHEMA, when, when + timedelta(hours=1))
        assert created == ["transactions_p20260517", "mutations_p20260517"]
        with b.conn.transaction():  # again: nothing to do
            assert ensure_partitions(b.conn, SCHEMA, when, when) == []
        rows = b.conn.execute(
            "SELECT tableoid::regclass::text, count(*) FROM cdc_history.mutations GROUP BY 1"
        ).fetchall()
        assert rows == [("cdc_history.mutations_p20260517", 1)]
        # Hourly partitions from now on (23:30 is in the daily one already).
        with b.conn.transaction():
            created = ensure_partitions(
                b.conn,
                SCHEMA,
                when + timedelta(hours=10),
                when + timedelta(hours=12),
                interval=timedelta(hours=1),
            )
        assert created == [
            "transactions_p20260518",
            "transactions_p20260518_0100",
            "mutations_p20260518",
            "mutations_p20260518_0100",
        ]
        # A daily interval again, over the hourly ones: cut to fit around them.
        with b.conn.transaction():
            created = ensure_partitions(b.conn, SCHEMA, when + DAY, when + DAY)
        assert created == ["transactions_p20260518_0200", "mutations_p20260518_0200"]
        with b.conn.transaction():
            bounds = [
                (p.lo, p.hi)
                for p in list_partitions(b.conn, SCHEMA, "mutations")
                if p.name.startswith("mutations_p")
            ]
        assert bounds == [
            (datetime(2026, 5, 17, tzinfo=UTC), datetime(2026, 5, 18, tzinfo=UTC)),
            (datetime(2026, 5, 18, tzinfo=UTC), datetime(2026, 5, 18, 1, tzinfo=UTC)),
            (datetime(2026, 5, 18, 1, tzinfo=UTC), datetime(2026, 5, 18, 2, tzinfo=UTC)),
            (datetime(2026, 5, 18, 2, tzinfo=UTC), datetime(2026, 5, 19, tzinfo=UTC)),
        ]
        assert bucket_start(when, DAY) == datetime(2026, 5, 17, tzinfo=UTC)
    finally:
        b.close()


def test_drop_and_attach_locks(database: Any) -> None:
    """What the partition operations lock on the parent (documented in docs/retention.md)."""
    b = StoreBuilder(database())
    try:
        day = datetime(2026, 5, 17, tzinfo=UTC)
        conn = b.conn

        def parent_locks() -> set[str]:
            rows = conn.execute(
                "SELECT mode FROM pg_locks WHERE relation = 'cdc_history.mutations'::regclass "
                "AND pid = pg_backend_pid()"
            ).fetchall()
            return {r[0] for r in rows}

        with conn.transaction(force_rollback=True):
            ensure_partitions(conn, SCHEMA, day, day)
            # CREATE TABLE + ATTACH: never ACCESS EXCLUSIVE on the parent (readers and writers go on)
            assert "ShareUpdateExclusiveLock" in parent_locks()
            assert "AccessExclusiveLock" not in parent_locks()
        with conn.transaction():
            ensure_partitions(conn, SCHEMA, day, day)
        with conn.transaction(force_rollback=True):
            # DROP of a partition: ACCESS EXCLUSIVE on the parent until commit (all readers and
            # writers wait): the pruner does it last, under a short lock_timeout
            conn.execute("DROP TABLE cdc_history.mutations_p20260517")
            assert "AccessExclusiveLock" in parent_locks()
        with conn.transaction(force_rollback=True):
            # DETACH (not CONCURRENTLY): the same
            conn.execute("ALTER TABLE cdc_history.mutations DETACH PARTITION cdc_history.mutations_p20260517")
            assert "AccessExclusiveLock" in parent_locks()
    finally:
        b.close()


def _mutation(position: int, ordinal: int, when: datetime, status: str) -> Mutation:
    return Mutation(
        position, ordinal, position, 1, when, "public.t", "INSERT", {"id": ordinal}, None, None,
        {"id": ordinal}, ["id"], status, None, None,
    )  # fmt: skip


def test_writer_creates_partitions_and_replays_stay_idempotent(database: Any) -> None:
    dsn = database()
    b = StoreBuilder(dsn)
    b.finish(acked=0, baseline=0)
    b.close()
    writer = StoreWriter(dsn, SCHEMA, "cdc")
    try:
        old = datetime(2026, 1, 10, 8, tzinfo=UTC)
        batch = Batch(
            mutations=[_mutation(100, 0, old, COMMITTED), _mutation(200, 0, old + DAY, ROLLED_BACK)],
            transactions=[
                TransactionRow(100, 1, 90, COMMITTED, old, None, 1),
                TransactionRow(200, 2, None, ROLLED_BACK, old + DAY, None, 1),
            ],
            ack_lsn=200,
        )
        writer.write(batch)
        assert "mutations_p20260110" in partitions(dsn) and "mutations_p20260111" in partitions(dsn)
        # The same batch again (a replay after a crash); the rolled-back transaction comes back
        # with another abort time (the daemon's clock, before PG16): still stored once.
        later = old + DAY + timedelta(minutes=5)
        replay = Batch(
            mutations=[_mutation(100, 0, old, COMMITTED), _mutation(200, 0, later, ROLLED_BACK)],
            transactions=[
                TransactionRow(100, 1, 90, COMMITTED, old, None, 1),
                TransactionRow(200, 2, None, ROLLED_BACK, later, None, 1),
            ],
            ack_lsn=200,
        )
        writer.write(replay)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM cdc_history.mutations").fetchone() == (2,)
            assert conn.execute("SELECT count(*) FROM cdc_history.transactions").fetchone() == (2,)
            assert conn.execute("SELECT count(*) FROM cdc_history.mutations_default").fetchone() == (0,)
    finally:
        writer.close()


# ============================================================================ capture while pruning


def _workload(conn: psycopg.Connection[Any], rng: random.Random, transactions: int) -> None:
    for _ in range(transactions):
        with conn.transaction(force_rollback=rng.random() < 0.1):
            for _ in range(rng.randint(1, 4)):
                item = rng.randint(1, 40)
                action = rng.random()
                if action < 0.35:
                    conn.execute(
                        "INSERT INTO items VALUES (%s, %s, 0) ON CONFLICT (id) DO UPDATE SET qty = items.qty + 1",
                        (item, f"item {item}"),
                    )
                elif action < 0.5:
                    conn.execute("UPDATE items SET qty = qty + 1 WHERE id = %s", (item,))
                elif action < 0.58:
                    conn.execute(
                        "UPDATE items SET id = id + 1000 WHERE id = %s AND NOT EXISTS "
                        "(SELECT 1 FROM items WHERE id = %s)",
                        (item, item + 1000),
                    )
                elif action < 0.66:
                    conn.execute("DELETE FROM items WHERE id = %s OR id = %s", (item, item + 1000))
                elif action < 0.85:
                    conn.execute("INSERT INTO loose VALUES (%s, %s)", (item % 3, rng.choice(["p", "q"])))
                elif action < 0.95:
                    conn.execute("DELETE FROM loose WHERE ctid = (SELECT ctid FROM loose LIMIT 1)")
                else:
                    conn.execute("TRUNCATE loose")


def test_capture_keeps_working_while_pruning(capture: CaptureEnv) -> None:
    rng = random.Random(11)
    with capture.source() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, name text, qty int)")
        conn.execute("CREATE TABLE loose (x int, y text)")
        conn.execute("ALTER TABLE loose REPLICA IDENTITY FULL")
        _workload(conn, rng, 30)
    capture.setup()
    capture.start()
    with capture.source() as conn:
        _workload(conn, rng, 150)
    capture.wait_caught_up()
    capture.stop()
    # Move what was captured into the past, spread over five days (in commit order), as if the
    # daemon had been running for a week.
    now = datetime.now(UTC)
    with capture.store() as store:
        past = bucket_start(now, DAY) - 6 * DAY
        with store.transaction():
            ensure_partitions(store, capture.schema, past, now)
        with store.transaction():
            for table in ("mutations", "transactions"):
                store.execute(
                    sql.SQL(
                        "WITH r AS (SELECT position, (row_number() OVER (ORDER BY position) - 1)::float8 "
                        "  / greatest(count(*) OVER () - 1, 1) AS f FROM transactions) "
                        "UPDATE {} t SET committed_at = %s + r.f * %s FROM r WHERE r.position = t.position"
                    ).format(sql.Identifier(table)),
                    (past, 5 * DAY),
                )
    tables = ("public.items", "public.loose")
    versions = sorted(
        int(r[0])
        for r in capture.store().execute("SELECT version FROM transactions WHERE version IS NOT NULL")
    )
    expected = {v: {t: rebuild(capture, t, v) for t in tables} for v in versions}

    # The daemon again, the source busy, and a pruner looping beside them on its own connection.
    daemon = capture.start()
    stop = threading.Event()
    metrics = Metrics(CollectorRegistry())
    config = RetentionConfig(default=2 * DAY, partition_interval=DAY, prune_interval=timedelta(seconds=1))
    pruner = Pruner(capture.store_dsn, capture.schema, config, metrics=metrics)
    thread = pruner.start(stop, poll_seconds=0.1)
    try:
        with capture.source() as conn:
            for _ in range(6):
                _workload(conn, rng, 40)
                time.sleep(0.3)
        capture.wait_caught_up()
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert metrics.pruned_partitions._value.get() >= 6  # type: ignore[attr-defined]
    assert capture.stop() == 0
    assert daemon.last_error is None
    for table in tables:
        assert rebuild_all(capture.store_dsn, table, capture.schema) == source_rows(capture, table)
    with History(capture.store_dsn, schema=capture.schema) as h:
        floor = h.earliest_version()
        assert floor is not None and floor > versions[0]
        current = h.current_version()
        view = h.at(version=current)
        for table in tables:
            assert rows_counter(view.table(table).collect()) == source_rows(capture, table)
        for version, rows in expected.items():
            view = h.at(version=version)
            for table in tables:
                if version < floor:
                    assert view.table(table).collect() is None
                else:
                    assert rows_counter(view.table(table).collect()) == rows[table]


def test_cdc_prune_command(ten_days: History10) -> None:
    from click.testing import CliRunner

    from cdc.cli_retention import prune

    dsn = ten_days.b.dsn
    runner = CliRunner()
    env = {"CDC_CONFIG": "", "CDC_STORE_DSN": dsn, "CDC_RETENTION__DEFAULT": "4d"}
    before = store_dump(dsn)
    planned = runner.invoke(prune, ["--dry-run", "--as-of", "2026-03-11T12:00:00+00:00"], env=env)
    assert planned.exit_code == 0, planned.output
    assert store_dump(dsn) == before  # a dry run changes nothing, not even partitions
    floor = ten_days.floor_for(START + 6 * DAY)
    assert "horizon        2026-03-07T00:00:00+00:00" in planned.output
    assert f"→ {floor >> 32:X}/{floor & 0xFFFFFFFF:X}" in planned.output
    assert "to write" in planned.output
    done = runner.invoke(prune, ["--as-of", "2026-03-11T12:00:00+00:00", "--format", "json"], env=env)
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["floor"] == floor and report["partitions"][0] == "mutations_p20260228"
    assert report["keyframes"] > 0 and report["drop_seconds"] > 0
    again = runner.invoke(prune, ["--as-of", "2026-03-11T12:00:00+00:00"], env=env)
    assert again.exit_code == 0 and "(unchanged)" in again.output and "dropped" not in again.output
    unreachable = runner.invoke(prune, [], env={**env, "CDC_STORE_DSN": "host=127.0.0.1 port=1 dbname=x"})
    assert unreachable.exit_code == 1 and unreachable.output.startswith("error: ")


def test_without_keyframes_untouched_rows_leave_time_travel(ten_days: History10) -> None:
    dsn = ten_days.b.dsn
    config = RetentionConfig(default=4 * DAY, partition_interval=DAY, keyframe_on_prune=False)
    with Pruner(dsn, SCHEMA, config) as pruner:
        report = pruner.prune(START + 10 * DAY + timedelta(hours=12))
    assert report.keyframes == 0 and report.partitions
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM cdc_history.mutations_keep WHERE keyframe").fetchone() == (
            0,
        )


def test_partition_arithmetic() -> None:
    from cdc.store.retention import _gaps

    t = datetime(2026, 11, 21, 13, 47, 5, tzinfo=UTC)
    assert bucket_start(t, DAY) == datetime(2026, 11, 21, tzinfo=UTC)
    assert bucket_start(t, timedelta(hours=1)) == datetime(2026, 11, 21, 13, tzinfo=UTC)
    assert bucket_start(t, timedelta(minutes=15)) == datetime(2026, 11, 21, 13, 45, tzinfo=UTC)
    assert partition_name("mutations", datetime(2026, 11, 21, tzinfo=UTC)) == "mutations_p20261121"
    assert partition_name("mutations", datetime(2026, 11, 21, 13, tzinfo=UTC)) == "mutations_p20261121_1300"
    assert partition_name("t", datetime(2026, 11, 21, 13, 0, 30, tzinfo=UTC)) == "t_p20261121_130030"
    a, b, c, d = (datetime(2026, 1, day, tzinfo=UTC) for day in (1, 2, 3, 4))
    assert _gaps(a, d, []) == [(a, d)]
    assert _gaps(a, d, [(b, c)]) == [(a, b), (c, d)]
    assert _gaps(a, c, [(a, d)]) == []
    assert _gaps(b, d, [(a, c)]) == [(c, d)]


# ============================================================================ staged keyframes


def reads(dsn: str, versions: list[int]) -> dict[str, Any]:
    """What the readers (cdc.query.Store) answer: every table at each version, each row ever
    stored at the last version, and its history."""
    out: dict[str, Any] = {}
    # A dozen versions spread over the history, the first and the last among them: each page is
    # planned over every partition (tens of ms); all of them would take minutes on PG15.
    step = max(1, len(versions) // 12)
    sampled = sorted({*versions[::step], versions[0], versions[-1]})
    store = Store(dsn, schema=SCHEMA)
    try:
        for table in TABLES:
            for version in sampled:
                out[f"{table}@{version}"] = store.table_at(table, version, limit=100_000).rows
        with psycopg.connect(dsn, autocommit=True) as conn:
            keys = conn.execute(
                "SELECT DISTINCT table_name, key FROM cdc_history.mutations_all "
                "WHERE key IS NOT NULL AND table_name <> 'public.loose' ORDER BY 1, 2"
            ).fetchall()
        for table, key in keys:
            out[f"{table}:{json.dumps(key, sort_keys=True)}@{versions[-1]}"] = store.row_at(
                table, key, versions[-1]
            )
            out[f"{table}:{json.dumps(key, sort_keys=True)}"] = [
                m.to_json() for m in store.row_history(table, key)
            ]
    finally:
        store.close()
    return out


def staging_left(dsn: str) -> tuple[Any, int, int]:
    """(retention_state.staged, rows of keyframes_retire, keyframes above the floor)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path = cdc_history")
        staged = conn.execute("SELECT staged FROM retention_state").fetchone()
        retire = conn.execute("SELECT count(*) FROM keyframes_retire").fetchone()
        pending = conn.execute(
            "SELECT count(*) FROM mutations_keep WHERE keyframe AND position > "
            "coalesce((SELECT max(history_floor) FROM capture_state), -1)"
        ).fetchone()
    assert staged is not None and retire is not None and pending is not None
    return staged[0], int(retire[0]), int(pending[0])


def test_staged_keyframes_stay_invisible_until_published(ten_days: History10) -> None:
    h10 = ten_days
    dsn = h10.b.dsn
    expected = {v: {t: oracle(dsn, t, v) for t in TABLES} for v in sorted(h10.model)}
    versions = sorted(h10.model)
    now = START + 10 * DAY + timedelta(hours=12)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY)) as pruner:
        pruner.prepare(now)  # (what prune() does first: the DEFAULT rows into partitions)
        before = reads(dsn, versions)
        staged = pruner.stage(now)
        assert staged is not None and staged["keyframes"] > 0 and staged["retire"] == 0
        assert staged["identity"]["floor"] == h10.floor_for(START + 6 * DAY)
        # Stored, above the floor, and seen by no reader: every answer is as before.
        left = staging_left(dsn)
        assert left[0] == staged and left[2] == staged["keyframes"]
        assert reads(dsn, versions) == before
        assert_time_travel(dsn, expected, h10.baseline)
        # Staging again with nothing changed reuses it.
        assert pruner.stage(now) == staged
        report = pruner.prune(now)
    assert report.staged and report.keyframes == staged["keyframes"] and report.stage_seconds > 0
    assert report.publish_seconds >= report.drop_seconds > 0
    assert staging_left(dsn) == (None, 0, 0)
    assert_time_travel(dsn, expected, h10.floor_for(START + 6 * DAY))
    for table in TABLES:
        assert rebuild_all(dsn, table) == h10.model[max(h10.model)][table]

    # The next prune retires the keyframes its rows supersede (published with it).
    for day in (10, 11):
        h10.day(START + day * DAY, 10)
    h10.b.finish(baseline=h10.baseline, floor=report.floor)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY)) as pruner:
        second = pruner.prune(START + 12 * DAY + timedelta(hours=1))
    assert second.staged and second.keyframes_replaced > 0
    assert staging_left(dsn) == (None, 0, 0)
    assert_time_travel(dsn, h10.model, h10.floor_for(START + 8 * DAY))
    for table in TABLES:
        assert rebuild_all(dsn, table) == h10.model[max(h10.model)][table]


@pytest.mark.parametrize("status", ["rolled_back", "committed"])
def test_a_write_into_what_goes_after_staging_falls_back(ten_days: History10, status: str) -> None:
    h10 = ten_days
    dsn = h10.b.dsn
    now = START + 10 * DAY + timedelta(hours=12)
    with Pruner(dsn, SCHEMA, retention(4 * DAY, audit=60 * DAY)) as pruner:
        pruner.prepare(now)
        staged = pruner.stage(now)
        assert staged is not None
        # A late write with an old commit time (a backlog replay): into a partition that goes.
        user = h10.b.state("users")[0]
        with h10.b.txn(START + 2 * DAY + timedelta(hours=5), status=status) as t:
            t.update("users", user["id"], {"plan": "late"})
            t.insert("loose", {"x": 1, "y": "p"})
        h10.b.finish(baseline=h10.baseline, floor=h10.baseline)
        last = h10.b.position
        expected = {v: {t: oracle(dsn, t, v) for t in TABLES} for v in sorted({*h10.model, *h10.b.positions})}
        # Published without staging again: the publish sees the change and computes inline.
        report = pruner.prune(now, stage=False)
    assert not report.staged and report.keyframes > 0
    assert staging_left(dsn) == (None, 0, 0)
    # A committed late write has the largest position: the floor goes up to it.
    floor = last if status == "committed" else h10.floor_for(START + 6 * DAY)
    assert report.floor == floor
    assert_time_travel(dsn, expected, floor)
    for table in TABLES:
        assert rebuild_all(dsn, table) == expected[max(expected)][table]


def test_a_staging_left_by_a_crash_is_reused_or_discarded(ten_days: History10) -> None:
    h10 = ten_days
    dsn = h10.b.dsn
    expected = {v: {t: oracle(dsn, t, v) for t in TABLES} for v in sorted(h10.model)}
    now = START + 10 * DAY + timedelta(hours=12)
    config = retention(4 * DAY, audit=60 * DAY)
    # A pruner stages, then dies before its prune transaction.
    crashed = Pruner(dsn, SCHEMA, config)
    crashed.prepare(now)
    staged = crashed.stage(now)
    crashed.close()
    assert staged is not None and staging_left(dsn)[2] == staged["keyframes"]
    assert_time_travel(dsn, expected, h10.baseline)
    with Pruner(dsn, SCHEMA, config) as pruner:
        # A dry run computes the keyframes inline and leaves the staging as it was.
        plan = pruner.prune(now, dry_run=True)
        assert plan.keyframes == staged["keyframes"] and not plan.staged
        assert staging_left(dsn)[0] == staged
        # The next prune at the same time publishes it.
        report = pruner.prune(now)
    assert report.staged and report.keyframes == staged["keyframes"]
    assert staging_left(dsn) == (None, 0, 0)
    assert_time_travel(dsn, expected, h10.floor_for(START + 6 * DAY))

    # A staging for other partitions (the prune that follows runs a day later): discarded.
    for day in (10, 11):
        h10.day(START + day * DAY, 10)
    h10.b.finish(baseline=h10.baseline, floor=report.floor)
    crashed = Pruner(dsn, SCHEMA, config)
    stale = crashed.stage(START + 11 * DAY + timedelta(hours=1))
    crashed.close()
    assert stale is not None and stale["identity"]["partitions"] == [
        "mutations_p20260307",
        "transactions_p20260307",
    ]
    with Pruner(dsn, SCHEMA, config) as pruner:
        later = pruner.prune(START + 12 * DAY + timedelta(hours=1))
    assert later.staged and later.partitions == [partition_name("mutations", START + d * DAY) for d in (6, 7)]
    assert staging_left(dsn) == (None, 0, 0)
    assert_time_travel(dsn, h10.model, h10.floor_for(START + 8 * DAY))
    for table in TABLES:
        assert rebuild_all(dsn, table) == h10.model[max(h10.model)][table]


def test_rows_gone_in_the_pruned_day_lose_their_older_keyframes(database: Any) -> None:
    b = StoreBuilder(database())
    try:
        b.table("users", USERS)
        b.table("loose", LOOSE, key=[])
        with b.txn(START + timedelta(hours=1)) as t:
            for i in range(1, 7):
                t.insert("users", {"id": i, "email": f"u{i}@x.org", "plan": "free"})
            for _ in range(3):
                t.insert("loose", {"x": 1, "y": "p"})
            t.insert("loose", {"x": 2, "y": "q"})
        with b.txn(START + DAY + timedelta(hours=1)) as t:
            t.update("users", 1, {"plan": "pro"})
            t.delete("users", 2)
            t.update("users", 3, {"id": 103})  # moved: 3 has no row any more
            t.delete("loose", {"x": 1, "y": "p"})  # two identical rows left
        with b.txn(START + 2 * DAY + timedelta(hours=1)) as t:
            t.delete("users", 1)
            t.delete("users", 103)
            t.update("users", 4, {"plan": "team"})
            t.delete("loose", {"x": 2, "y": "q"})
        with b.txn(START + 3 * DAY + timedelta(hours=1)) as t:
            t.update("users", 5, {"plan": "pro"})
        with b.txn(START + 4 * DAY + timedelta(hours=1)) as t:
            t.insert("users", {"id": 7, "email": "u7@x.org", "plan": "free"})
        b.finish(baseline=b.positions[0])  # never pruned: no floor yet
        dsn = b.dsn
        expected = {v: {t: oracle(dsn, t, v) for t in ("public.users", "public.loose")} for v in b.positions}
        config = retention(DAY)

        def keyframes() -> dict[str, Counter[str]]:
            with psycopg.connect(dsn, autocommit=True) as conn:
                found = conn.execute(
                    "SELECT table_name, after FROM cdc_history.mutations_keep WHERE keyframe"
                ).fetchall()
            out: dict[str, Counter[str]] = {}
            for table, after in found:
                out.setdefault(table, Counter())[json.dumps(after, sort_keys=True)] += 1
            return out

        with Pruner(dsn, SCHEMA, config) as pruner:
            for day, alive in ((1, [1, 2, 3, 4, 5, 6]), (2, [1, 4, 5, 6, 103]), (3, [4, 5, 6])):
                report = pruner.prune(START + (day + 1) * DAY + timedelta(hours=2))
                assert report.staged and report.floor == b.positions[day - 1]
                assert staging_left(dsn) == (None, 0, 0)
                floor_state = expected[report.floor]
                # Exactly the rows alive at the floor have keyframes, as they were there.
                assert keyframes().get("public.users", Counter()) == floor_state["public.users"]
                assert sorted(json.loads(r)["id"] for r in floor_state["public.users"]) == alive
                assert keyframes().get("public.loose", Counter()) == floor_state["public.loose"]
                assert_time_travel(dsn, {v: e for v, e in expected.items()}, report.floor)
            assert report.keyframes_replaced > 0
    finally:
        b.close()


def test_a_store_from_before_staging_prunes_inline_until_setup(ten_days: History10) -> None:
    from cdc.setup import apply_store_schema

    h10 = ten_days
    dsn = h10.b.dsn
    expected = {v: {t: oracle(dsn, t, v) for t in TABLES} for v in sorted(h10.model)}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path = cdc_history")
        columns = (
            "position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, before, after, "
            "changed, status, request_id, context, schema_id, actor, actor_seq"
        )
        conn.execute(
            f"CREATE OR REPLACE VIEW mutations_all AS SELECT {columns} FROM mutations "
            f"UNION ALL SELECT {columns} FROM mutations_keep"
        )
        conn.execute("DROP TABLE keyframes_retire")
    config = retention(4 * DAY, audit=60 * DAY)
    with Pruner(dsn, SCHEMA, config) as pruner:
        assert pruner.stage(START + 10 * DAY) is None
        report = pruner.prune(START + 10 * DAY + timedelta(hours=12))
    assert not report.staged and report.keyframes > 0
    assert_time_travel(dsn, expected, h10.floor_for(START + 6 * DAY))
    # `cdc setup` brings the view and the table: the next prune stages.
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_store_schema(conn, SCHEMA)
    for day in (10, 11):
        h10.day(START + day * DAY, 10)
    h10.b.finish(baseline=h10.baseline, floor=report.floor)
    with Pruner(dsn, SCHEMA, config) as pruner:
        second = pruner.prune(START + 12 * DAY + timedelta(hours=1))
    assert second.staged
    assert_time_travel(dsn, h10.model, h10.floor_for(START + 8 * DAY))
