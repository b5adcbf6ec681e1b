"""Measurement 3: what capture costs the source, in pgbench TPC-B-like transactions/s.

Configurations, run in turn (a, b0, b, c) several times on the same database:

* a  no capture: the context trigger disabled, the daemon stopped;
* b0 the context trigger only (daemon stopped): its cost on the write path alone;
* b  capture: the context trigger and the daemon running (decoding by the walsender, the
     daemon and the store share this machine's cores with the source);
* c  a classic row-level audit trigger writing a JSON copy of OLD/NEW into an audit table.

Every configuration runs at wal_level=logical with the publication and the slot in place (a
slot costs the source nothing while nobody reads it). Between runs the slot is fast-forwarded
to the current WAL position, so the daemon never starts a run with a backlog.
"""

from __future__ import annotations

from typing import Any

import psycopg

from bench.harness import (
    Capture,
    catch_up,
    connect,
    log,
    median,
    new_capture,
    pgbench,
    pgbench_tps,
    running_daemon,
    scalar,
    server,
)
from bench.model import Context, Figure, Measurement, Target

PGBENCH_TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")
LOSS_TARGET = Target("<", 3.0)

#: The classic audit trigger: one JSON copy of the old and new row per changed row.
AUDIT_SQL = """
CREATE SCHEMA IF NOT EXISTS bench_audit;
CREATE TABLE IF NOT EXISTS bench_audit.audit_log (
    id         bigserial PRIMARY KEY,
    table_name text NOT NULL,
    op         text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    txid       bigint NOT NULL DEFAULT txid_current(),
    db_user    text NOT NULL DEFAULT current_user,
    old_row    jsonb,
    new_row    jsonb
);
CREATE OR REPLACE FUNCTION bench_audit.audit_row() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_audit.audit_log (table_name, op, old_row, new_row)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP,
            CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END,
            CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END);
    RETURN NULL;
END
$$;
"""

CONFIGS = {
    "a": "no capture",
    "b0": "context trigger only (daemon stopped)",
    "b": "capture: context trigger + daemon running",
    "c": "row-level audit trigger (JSON of OLD/NEW)",
}


def install_audit(conn: psycopg.Connection[Any]) -> None:
    conn.execute(AUDIT_SQL)
    for table in PGBENCH_TABLES:
        conn.execute(f"DROP TRIGGER IF EXISTS bench_audit ON {table}")
        conn.execute(
            f"CREATE TRIGGER bench_audit AFTER INSERT OR UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION bench_audit.audit_row()"
        )


def _set_trigger(conn: psycopg.Connection[Any], table: str, trigger: str, enabled: bool) -> None:
    exists = scalar(
        conn,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
        (table, trigger),
    )
    if exists:
        conn.execute(f"ALTER TABLE {table} {'ENABLE' if enabled else 'DISABLE'} TRIGGER {trigger}")


def configure(conn: psycopg.Connection[Any], config: str) -> None:
    for table in PGBENCH_TABLES:
        _set_trigger(conn, table, "cdc_context", config in ("b0", "b"))
        _set_trigger(conn, table, "bench_audit", config == "c")
    # The audit table itself is never captured in these runs.
    _set_trigger(conn, "bench_audit.audit_log", "cdc_context", False)
    if config == "c":
        conn.execute("TRUNCATE bench_audit.audit_log")


def _check_context_trigger(conn: psycopg.Connection[Any]) -> None:
    for table in PGBENCH_TABLES:
        found = scalar(
            conn,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = 'cdc_context'",
            (table,),
        )
        if not found:
            raise RuntimeError(f"cdc setup did not install the context trigger on {table}")


def measure(ctx: Context) -> Measurement:
    duration = 10 if ctx.quick else 30
    reps = 2 if ctx.quick else 3
    m = Measurement(
        "source_cost",
        "Cost on the source: pgbench TPC-B-like",
        method=(
            f"`pgbench -i -s 10`, then `pgbench -c 2 -j 2 -T {duration}` (built-in TPC-B-like script) in "
            f"turn for each configuration, {reps} times; figures are medians, losses relative to (a). "
            "(a) no capture: context trigger disabled, daemon stopped; (b0) the context trigger "
            "alone; (b) capture: context trigger and `cdc run` running (the daemon and the store "
            "share the machine's 2 cores with pgbench and the source); (c) a classic row-level "
            "audit trigger inserting `to_jsonb(OLD)`/`to_jsonb(NEW)` into an audit table "
            "(`bench/source_cost.py`). All at wal_level=logical with the slot in place; the slot is "
            "fast-forwarded between runs."
        ),
        params={"duration_s": duration, "alternations": reps, "scale": 10, "clients": 2},
    )
    with server(ctx.flavor) as pg:
        src = pg.create_database("tpcb")
        store = pg.create_database("tpcb_store")
        capture: Capture = new_capture(pg, src, store, "cost")
        capture.setup(ctx.log_path("setup.log"))
        log("source cost: pgbench -i -s 10")
        pgbench(pg, ["-i", "-s", "10", "-q"], "tpcb")
        with connect(src) as conn:
            install_audit(conn)
        capture.setup(ctx.log_path("setup.log"))  # idempotent: makes sure the triggers are attached
        with connect(src) as conn:
            _check_context_trigger(conn)
            conn.execute("CHECKPOINT")
        capture.advance_slot()
        m.params["server_version"] = pg.version
        tps: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for rep in range(reps):
            for config in CONFIGS:
                with connect(src) as conn:
                    configure(conn, config)
                args = ["-c", "2", "-j", "2", "-T", str(duration)]
                run: dict[str, Any] = {"rep": rep, "config": config}
                if config == "b":
                    with running_daemon(capture, ctx.log_path("daemon-source-cost.log")) as daemon:
                        catch_up(capture, daemon)
                        out = pgbench(pg, args, "tpcb")
                        daemon.check_alive()
                        with connect(src) as conn, capture.store() as st:
                            wal = int(scalar(conn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
                            run["daemon_behind_bytes_at_end"] = max(0, wal - capture.acked_lsn(st))
                else:
                    out = pgbench(pg, args, "tpcb")
                capture.advance_slot()
                run["tps"] = pgbench_tps(out)
                tps[config].append(run["tps"])
                m.runs.append(run)
                log(f"source cost: run {rep + 1}/{reps} ({config}) {CONFIGS[config]}: {run['tps']:,.0f} tps")
    base = median(tps["a"])
    for config, label in CONFIGS.items():
        m.figures.append(Figure(f"source_cost.{config}.tps", f"({config}) {label}", "tps", tps[config]))
    if base:
        for config in ("b0", "b", "c"):
            value = median(tps[config])
            loss = None if value is None else (1 - value / base) * 100
            per_rep = [(1 - b / a) * 100 for a, b in zip(tps["a"], tps[config], strict=False)]
            m.figures.append(
                Figure(
                    f"source_cost.{config}.loss",
                    f"({config}) throughput loss vs (a)",
                    "%",
                    per_rep,
                    value=loss,
                    target=LOSS_TARGET if config == "b" else None,
                    note="loss of the medians; runs: loss of each alternation",
                )
            )
    behind = [r["daemon_behind_bytes_at_end"] for r in m.runs if "daemon_behind_bytes_at_end" in r]
    if behind:
        m.notes.append(
            "At the end of each (b) run the daemon was "
            + ", ".join(f"{b / 1024**2:.1f} MiB" for b in behind)
            + " of WAL behind the source."
        )
    return m
