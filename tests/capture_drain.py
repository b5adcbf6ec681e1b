"""Reading replication slots with ``Core.drain`` (tests/integration/test_capture_drain.py): a
workload touching every kind of frame, and a slot read to its end on a chosen drain path.

``python -m tests.capture_drain DSN SLOT...`` reads each slot with the compiled core, the
first on the libpq path and the others on the psycopg path, and prints what it saw as JSON:
the test runs it with PSYCOPG_IMPL=python (psycopg over the system libpq by ctypes).
"""

from __future__ import annotations

import json
import sys
from types import ModuleType
from typing import Any

import psycopg

from bench.drain import PsycopgOnly, emit_end, open_stream, read_until
from cdc.capture import model
from tests.unit.capture_support import Outcome, Registry, flatten

PUBLICATION = "drain_test"
END = "test.end"
#: The smallest: large transactions are streamed without immediate streaming (PostgreSQL 15).
SETTINGS = {"logical_decoding_work_mem": "64kB"}
NOW_US = 849_991_169_000_000  # the clock of aborts without a time (model.now_us, patched)

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text, qty int, ok bool, note text);
CREATE TABLE events (at timestamptz, line text);
ALTER TABLE events REPLICA IDENTITY FULL;
CREATE PUBLICATION drain_test FOR TABLE items, events;
"""

# Each item: one transaction (a list of statements) run in order.
WORKLOAD: list[list[str]] = [
    ["INSERT INTO items SELECT g, 'item ' || g, g, g % 2 = 0, NULL FROM generate_series(1, 20) g"],
    *[
        [
            f"SELECT pg_logical_emit_message(true, 'cdc.context', '{{\"request_id\":\"r{i}\"}}')",
            f"UPDATE items SET qty = qty + 1 WHERE id = {i % 20 + 1}",
            f"INSERT INTO events VALUES ('2026-12-07 20:39:29+00', E'tab\\there \"q\" \\\\ é ☕ {i}')",
        ]
        for i in range(30)
    ],
    # Over logical_decoding_work_mem: streamed (also without immediate streaming).
    ["INSERT INTO items SELECT g, repeat('x', 100), g, true, NULL FROM generate_series(1000, 4000) g"],
    [
        "INSERT INTO items SELECT g, 'savepoint', g, false, NULL FROM generate_series(5000, 5001) g",
        "SAVEPOINT s",
        "INSERT INTO items SELECT g, 'rolled back', g, false, NULL FROM generate_series(5002, 5003) g",
        "ROLLBACK TO SAVEPOINT s",
        "INSERT INTO items VALUES (5004, 'after', 0, true, NULL)",
    ],
    # A TOASTed value, then an update leaving it unchanged ('u').
    [
        "UPDATE items SET note = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 400) g) WHERE id = 1"
    ],
    ["UPDATE items SET qty = 0 WHERE id = 1"],
    ["DELETE FROM items WHERE id BETWEEN 2 AND 5"],
    ["DELETE FROM events WHERE line LIKE '%1'"],
    ["TRUNCATE events"],
    ["SELECT pg_logical_emit_message(false, 'cdc.heartbeat', 'beat')"],
]
ROLLED_BACK = [
    "INSERT INTO items SELECT g, repeat('y', 100), g, true, NULL FROM generate_series(10000, 13000) g"
]


def prepare(dsn: str, slots: list[str]) -> None:
    """The schema, the slots, then the workload (and a large rolled-back transaction) and the
    end marker."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        for slot in slots:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        for statements in WORKLOAD:
            with conn.transaction():
                for statement in statements:
                    conn.execute(statement)
        conn.execute("BEGIN")
        for statement in ROLLED_BACK:
            conn.execute(statement)
        conn.execute("ROLLBACK")
    emit_end(dsn, END)


def read_slot(dsn: str, slot: str, module: ModuleType, path: str) -> tuple[Outcome, Any]:
    """Every event of ``slot`` up to the end marker (flattened), and the core that read it."""
    core = module.Core(Registry())
    outcome: Outcome = []
    conn = open_stream(dsn, slot, PUBLICATION, SETTINGS)
    try:
        pgconn = conn.pgconn
        source = pgconn if path == "libpq" else PsycopgOnly(pgconn)
        read_until(core, source, pgconn, END, lambda event: outcome.extend(flatten([event], 1 << 20)))
    finally:
        conn.close()
    return outcome, core


def main(argv: list[str]) -> int:
    from psycopg import pq

    from cdc.capture import _core

    model.now_us = lambda: NOW_US  # type: ignore[assignment]  # a process of its own
    dsn, *slots = argv
    outcomes = []
    paths = []
    for i, slot in enumerate(slots):
        outcome, core = read_slot(dsn, slot, _core, "libpq" if i == 0 else "psycopg")
        outcomes.append(outcome)
        paths.append(core.drain_path)
    print(
        json.dumps(
            {
                "impl": pq.__impl__,
                "paths": paths,
                "events": len(outcomes[0]),
                "equal": all(o == outcomes[0] for o in outcomes),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
