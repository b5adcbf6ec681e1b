"""A capture environment for integration tests: source and store databases on a real
server, `cdc setup`, and the daemon running in a background thread."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry

from cdc.config import Config, load_config
from cdc.daemon import Daemon
from cdc.devdb import LocalPostgres
from cdc.lsn import parse_lsn
from cdc.metrics import Metrics
from cdc.query import Mutation
from cdc.setup import setup


@dataclass
class CaptureEnv:
    pg: LocalPostgres
    source_dsn: str
    store_dsn: str
    schema: str = "cdc_history"
    slot: str = "cdc"
    extra_env: dict[str, str] = field(default_factory=dict)
    daemon: Daemon | None = None
    thread: threading.Thread | None = None
    exit_code: int | None = None

    @property
    def config(self) -> Config:
        return load_config(None, env=self.config_env())

    def config_env(self) -> dict[str, str]:
        """The environment of this capture's config (``CDC_*``), for a command line too."""
        env = {
            "CDC_SOURCE_DSN": self.source_dsn,
            "CDC_STORE_DSN": self.store_dsn,
            "CDC_STORE__SCHEMA": self.schema,
            "CDC_SOURCE__SLOT": self.slot,
            "CDC_SOURCE__PUBLICATION": self.slot,
            "CDC_CAPTURE__STATUS_INTERVAL_SECONDS": "1",
            "CDC_RECONNECT__INITIAL_BACKOFF_SECONDS": "0.2",
            "CDC_RECONNECT__MAX_BACKOFF_SECONDS": "1",
        }
        env.update(self.extra_env)
        return env

    def source(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.source_dsn, autocommit=True)

    def store(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.store_dsn, autocommit=True)
        conn.execute(f"SET search_path = {self.schema}")
        return conn

    def setup(self) -> None:
        setup(self.config)

    def start(self) -> Daemon:
        self.daemon = Daemon(self.config, metrics=Metrics(CollectorRegistry()))
        daemon = self.daemon

        def run() -> None:
            self.exit_code = daemon.run()

        self.thread = threading.Thread(target=run, name="cdc-daemon", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not daemon.streaming:  # a workload before that would race the first connection
            assert self.thread.is_alive(), f"daemon exited with {self.exit_code}"
            assert time.monotonic() < deadline, "daemon did not start streaming"
            time.sleep(0.02)
        return daemon

    def stop(self) -> int | None:
        if self.daemon is not None and self.thread is not None:
            self.daemon.request_stop()
            self.thread.join(timeout=30)
            assert not self.thread.is_alive(), "daemon did not stop"
        return self.exit_code

    def current_lsn(self) -> int:
        with self.source() as conn:
            row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
            assert row is not None
            return parse_lsn(row[0])

    def wait_caught_up(self, timeout: float = 60.0) -> int:
        """Wait until the store has acknowledged everything committed on the source so far."""
        target = self.current_lsn()
        deadline = time.monotonic() + timeout
        with self.store() as conn:
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT acked_lsn FROM capture_state WHERE slot_name = %s", (self.slot,)
                ).fetchone()
                if row is not None and row[0] >= target:
                    return int(row[0])
                if self.thread is not None and not self.thread.is_alive():
                    raise AssertionError(f"daemon exited with {self.exit_code}")
                time.sleep(0.05)
        raise AssertionError(f"store did not catch up to {target} within {timeout}s")

    def teardown(self) -> None:
        self.stop()
        with self.source() as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND NOT active",
                (self.slot,),
            )


def new_env(pg: LocalPostgres, same_database: bool = False) -> CaptureEnv:
    suffix = uuid.uuid4().hex[:8]
    source = pg.create_database(f"src_{suffix}")
    store = source if same_database else pg.create_database(f"store_{suffix}")
    return CaptureEnv(pg, source, store, slot=f"cdc_{suffix}")


def table_id(env: CaptureEnv, table: str) -> int:
    """The store's id of the table that has the name ``table`` now (format 2)."""
    from cdc.config import normalize_table

    schema, name = normalize_table(table)
    with env.store() as conn:
        row = conn.execute(
            "SELECT table_id FROM table_names WHERE schema_name = %s AND table_name = %s "
            "ORDER BY from_position DESC LIMIT 1",
            (schema, name),
        ).fetchone()
    assert row is not None, f"no table {table} in the store"
    return int(row[0])


def rebuild(env: CaptureEnv, table: str, version: int | None = None) -> Counter[str]:
    """An independent oracle: the table's rows at ``version`` replayed from the stored
    changes (format 2: committed transactions only), as a multiset of canonical JSON rows."""
    import json

    tid = table_id(env, table)
    with env.store() as conn:
        found = conn.execute(
            "SELECT c.op, c.key_text, c.image, c.before, c.old_key_text, s.key_columns, c.flags, c.pending "
            "FROM changes c JOIN transactions t ON t.position = c.position AND t.status = 'c' "
            "LEFT JOIN table_schemas s ON s.schema_id = c.schema_id "
            "WHERE c.table_id = %s AND c.flags & 1 = 0 AND (%s::bigint IS NULL OR c.position <= %s) "
            "ORDER BY c.position, c.ordinal",
            (tid, version, version),
        ).fetchall()
        # The schema in force: the one of the table's latest change at that version.
        latest = conn.execute(
            "SELECT s.columns FROM changes c JOIN table_schemas s USING (schema_id) "
            "WHERE c.table_id = %s AND (%s::bigint IS NULL OR c.position <= %s) "
            "ORDER BY c.position DESC, c.ordinal DESC LIMIT 1",
            (tid, version, version),
        ).fetchone()
    keyed: dict[str, str] = {}
    loose: Counter[str] = Counter()

    def canonical(text: str) -> str:
        return json.dumps(json.loads(text), sort_keys=True)

    for op, key, image, before, old_key, key_columns, flags, pending in found:
        assert pending is None, f"a stored change still has pending columns: {pending}"
        assert flags & 4 == 0, f"an INCOMPLETE {op} of {table}"
        if op == "T":
            keyed.clear()
            loose.clear()
        elif key_columns:
            if op == "D":
                assert key in keyed, f"DELETE of a row not in the rebuilt state: {key}"
                del keyed[key]
                continue
            if op == "U" and old_key is not None:
                assert old_key in keyed, f"key change of a row not in the rebuilt state: {old_key}"
                del keyed[old_key]
            elif op == "U":
                assert key in keyed, f"UPDATE of a row not in the rebuilt state: {key}"
            keyed[key] = canonical(image)
        else:
            gone = image if op == "D" else before if op == "U" else None
            if gone is not None:
                text = canonical(gone)
                assert loose[text] > 0, f"{op} of a row not in the rebuilt state: {text}"
                loose[text] -= 1
                if loose[text] == 0:
                    del loose[text]
            if op != "D":
                loose[canonical(image)] += 1
    rows: Counter[str] = loose + Counter(keyed.values())
    in_force = {c["name"] for c in latest[0]} if latest else None
    if in_force is None:
        return rows
    projected: Counter[str] = Counter()
    for text, count in rows.items():
        image = {k: v for k, v in json.loads(text).items() if k in in_force}
        projected[json.dumps(image, sort_keys=True)] += count
    return projected


def source_rows(env: CaptureEnv, table: str) -> Counter[str]:
    """The table's rows on the source, each column as the server prints it (same
    settings as the replication session), ints and bools as JSON."""
    import json

    from psycopg import sql

    from cdc.config import normalize_table
    from cdc.stream.replication import OUTPUT_SETTINGS, options_string
    from cdc.values import convert, converter_for

    relation = sql.Identifier(*normalize_table(table))
    with psycopg.connect(env.source_dsn, autocommit=True, options=options_string(OUTPUT_SETTINGS)) as conn:
        columns = conn.execute(
            "SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (relation.as_string(conn),),
        ).fetchall()
        select = sql.SQL(", ").join(sql.Identifier(c) for c, _ in columns)
        # COPY text format: every value through its type's output function.
        with conn.cursor().copy(
            sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(select, relation)
        ) as copy:
            found = list(copy.rows())
    rows: Counter[str] = Counter()
    for row in found:
        image = {c: convert(converter_for(t), v) for (c, t), v in zip(columns, row, strict=True)}
        rows[json.dumps(image, sort_keys=True)] += 1
    return rows


def stored_mutations(env: CaptureEnv, table: str | None = None) -> list[Mutation]:
    """Every stored change (SNAPSHOTs included) as the query layer reads it, oldest first."""
    from cdc.query import Store

    found: list[Mutation] = []
    with Store(env.store_dsn, schema=env.schema) as store:
        cursor: tuple[int, int] | None = None
        while True:
            page = store.mutation_log(table=table, before=cursor, limit=1000)
            found.extend(page.mutations)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    return found[::-1]
