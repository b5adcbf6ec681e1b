"""Micro-benchmark of ``Core.drain`` against a backlog: frames/s and µs per frame on the libpq
path (PQgetCopyData called from C) and the psycopg path (a ``get_copy_data`` call per frame).

A throwaway PostgreSQL (cdc.devdb) gets one logical slot per run, then a backlog of small
request-tagged transactions in bench.core's shape (a transactional context message, 2 inserts
and an update of a 5-column table); each slot is then read to its end by the compiled core.
Only drain() is timed, in the thread's CPU time (the core's work on each frame included, the
waits on the socket not). On PostgreSQL 16+ the stream is
``debug_logical_replication_streaming = immediate`` (every change in its own streamed block:
4-5 frames per change). ``feed only`` feeds the same frames from a list: the core's own share.
The helpers are shared with tests/integration/test_capture_drain.py. Run:
``python -m bench.drain [--transactions N] [--repeat R] [--flavor embedded|system]``.
"""

from __future__ import annotations

import argparse
import importlib
import select
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from cdc.capture.model import Event, Kind, LogicalMessage, Policy, RelationDesc, RelationInfo
from cdc.stream.replication import OUTPUT_SETTINGS, choose_options, options_string, start_command

PUBLICATION = "bench_drain"
END = "bench.end"

SCHEMA = """
CREATE TABLE orders (
    id bigint PRIMARY KEY, account int, status text, amount numeric, updated_at timestamptz
);
CREATE PUBLICATION bench_drain FOR TABLE orders;
CREATE PROCEDURE workload(first int, n int) LANGUAGE plpgsql AS $$
BEGIN
    FOR t IN first .. first + n - 1 LOOP
        PERFORM pg_logical_emit_message(
            true, 'cdc.context', '{"request_id":"8f14e45f-ceea-467f-a0e6-5b7a6b1a3c11","actor":"user:42"}');
        INSERT INTO orders VALUES (3 * t, t % 97, 'new', 10.25, '2026-12-07 20:39:29.0704+00');
        INSERT INTO orders VALUES (3 * t + 1, t % 97, 'new', 20.25, '2026-12-07 20:39:29.0704+00');
        UPDATE orders SET status = 'shipped' WHERE id = 3 * t;
        COMMIT;
    END LOOP;
END $$;
"""


def describe(desc: RelationDesc) -> RelationInfo:
    """A registry stand-in: the flagged key columns, kinds from type oids, no policies."""
    key = tuple(i for i, c in enumerate(desc.columns) if c.flagged_key) or tuple(range(len(desc.columns)))
    return RelationInfo(
        table_id=desc.oid,
        schema_id=1,
        names=tuple(c.name for c in desc.columns),
        kinds=tuple(Kind.for_type(c.type_oid) for c in desc.columns),
        policies=tuple(Policy.NONE for _ in desc.columns),
        key=key,
        keyless=not any(c.flagged_key for c in desc.columns),
    )


class PsycopgOnly:
    """A PGconn seen through ``get_copy_data`` alone: ``drain`` takes the psycopg path."""

    def __init__(self, pgconn: Any) -> None:
        self.get_copy_data = pgconn.get_copy_data


class Recording:
    """``get_copy_data`` of a PGconn, keeping a copy of every frame."""

    def __init__(self, pgconn: Any) -> None:
        self._get = pgconn.get_copy_data
        self.frames: list[bytes] = []

    def get_copy_data(self, async_: int) -> tuple[int, Any]:
        nbytes, data = self._get(async_)
        if nbytes > 0:
            self.frames.append(bytes(data))
        return nbytes, data


def create_slot(dsn: str, slot: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))


def open_stream(
    dsn: str, slot: str, publication: str, settings: dict[str, str] | None = None
) -> psycopg.Connection[Any]:
    """A replication connection streaming ``slot`` from its start, as the daemon opens it
    (immediate streaming on PostgreSQL 16+), with extra session ``settings``."""
    conn = psycopg.connect(dsn, replication="database", autocommit=True)
    options = choose_options(conn.info.server_version, slot, publication, 0, "on")
    conn.close()
    settings = {**OUTPUT_SETTINGS, **(settings or {})}
    if options.stream_immediately:
        settings["debug_logical_replication_streaming"] = "immediate"
    conn = psycopg.connect(dsn, replication="database", autocommit=True, options=options_string(settings))
    conn.execute(start_command(options))
    return conn  # in COPY_BOTH: close() it (leaving a with block would try to commit)


def read_until(
    core: Any,
    pgconn: Any,
    socket_of: Any,
    marker: str,
    on_event: Callable[[Event], None] | None = None,
    timeout: float = 300.0,
) -> tuple[int, int, int]:
    """Drain until the non-transactional logical message ``marker``; (frames, CPU ns in drain,
    drain calls).
    ``socket_of``: the real PGconn (waited on and told to consume input)."""
    frames = 0
    spent = 0
    calls = 0
    deadline = time.monotonic() + timeout
    while True:
        started = time.thread_time_ns()
        count = core.drain(pgconn)
        spent += time.thread_time_ns() - started
        calls += 1
        if count < 0:
            raise RuntimeError("the replication stream ended")
        frames += count
        done = False
        for event in core.pop_events():
            if isinstance(event, LogicalMessage) and event.prefix == marker:
                done = True
            if on_event is not None:
                on_event(event)
        if done:
            return frames, spent, calls
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker!r} message within {timeout}s")
        select.select([socket_of.socket], [], [], 1.0)
        socket_of.consume_input()


def emit_end(dsn: str, marker: str = END) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_logical_emit_message(false, %s, '')", (marker,))


def measure(dsn: str, slot: str, path: str) -> tuple[int, int, int]:
    """Read ``slot`` to the end marker on ``path``; (frames, CPU ns in drain, drain calls)."""
    core_class = importlib.import_module("cdc.capture._core").Core
    core = core_class(describe)
    conn = open_stream(dsn, slot, PUBLICATION)
    try:
        pgconn = conn.pgconn
        source = pgconn if path == "libpq" else PsycopgOnly(pgconn)
        frames, spent, calls = read_until(core, source, pgconn, END)
    finally:
        conn.close()
    if core.drain_path != path:
        raise RuntimeError(f"drain took the {core.drain_path} path, not {path}")
    return frames, spent, calls


def feed_only(dsn: str, slot: str, repeat: int) -> tuple[int, float]:
    """Record the slot's frames, then time feeding them: (frames, best ns)."""
    core_class = importlib.import_module("cdc.capture._core").Core
    conn = open_stream(dsn, slot, PUBLICATION)
    try:
        recording = Recording(conn.pgconn)
        read_until(core_class(describe), recording, conn.pgconn, END)
    finally:
        conn.close()
    batches = [recording.frames[i : i + 64] for i in range(0, len(recording.frames), 64)]
    best = float("inf")
    for _ in range(repeat):
        core = core_class(describe)
        feed = core.feed
        pop = core.pop_events
        started = time.thread_time_ns()
        for batch in batches:
            for frame in batch:
                feed(frame)
            pop()  # as drain's caller does after each call
        best = min(best, time.thread_time_ns() - started)
    return len(recording.frames), best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flavor", default="auto", help="cdc.devdb flavor: embedded, system or auto")
    args = parser.parse_args(argv)
    from cdc.devdb import LocalPostgres

    server = LocalPostgres(flavor=args.flavor)
    try:
        server.start()
        dsn = server.create_database("bench_drain")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        slots = [f"drain_{i}" for i in range(2 * args.repeat + 1)]
        for slot in slots:
            create_slot(dsn, slot)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CALL workload(0, {})").format(sql.Literal(args.transactions)))
        emit_end(dsn)
        changes = 3 * args.transactions
        print(f"PostgreSQL {server.version} ({server.flavor}), {changes} changes in the backlog")
        best: dict[str, float] = {}
        frames_seen = calls_seen = 0
        for i in range(args.repeat):
            for j, path in enumerate(("libpq", "psycopg")):
                frames_seen, spent, calls_seen = measure(dsn, slots[2 * i + j], path)
                best[path] = min(best.get(path, float("inf")), spent / frames_seen)
        frames, fed = feed_only(dsn, slots[-1], args.repeat)
        best["feed only"] = fed / frames
        print(
            f"{frames_seen} frames ({frames_seen / changes:.1f} per change, "
            f"{frames_seen / calls_seen:.0f} per drain call), best of {args.repeat}:"
        )
        for path, ns in best.items():
            print(f"  {path:9s} {ns / 1000:6.3f} µs/frame  {1e9 / ns / 1e6:6.2f} M frames/s")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
