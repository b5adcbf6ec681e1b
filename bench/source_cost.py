"""Measurement 3: what capture costs the source, in pgbench TPC-B-like transactions/s.

Configurations, run in turn (a, b0, b, c) several times on the same database:

* a  no capture: the context trigger disabled, the daemon stopped;
* b0 the context trigger only (daemon stopped): its cost on the write path alone;
* b  capture: the context trigger and the daemon running (decoding by the walsender, the
     daemon and the store share this machine's cores with the source);
* c  a classic row-level audit trigger writing a JSON copy of OLD/NEW into an audit table.

Every configuration runs at wal_level=logical with the publication and the slot in place (a
slot costs the source nothing while nobody reads it). Between runs the slot is fast-forwarded
to the current WAL position, so the daemon never starts a run with a backlog. The store is a
second server (on the same machine). Besides transactions/s, which depend on whatever else
runs on the machine, the CPU time the source server spends per transaction is measured from
/proc: the cost on the source proper.
"""

from __future__ import annotations

import re
import time
from typing import Any

import psycopg

from bench.harness import (
    MARKER_DDL,
    Capture,
    catch_up,
    connect,
    log,
    median,
    new_capture,
    pgbench,
    pgbench_tps,
    process_cpu_seconds,
    running_daemon,
    scalar,
    server,
    server_cpu_seconds,
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


def _processed(output: str) -> int:
    match = re.search(r"number of transactions actually processed: (\d+)", output)
    if match is None:
        raise RuntimeError(f"no transaction count in pgbench output: {output[-1000:]}")
    return int(match.group(1))


def _reset(conn: psycopg.Connection[Any]) -> None:
    """What pgbench does before a run (we run it with -n, so this stays out of the timing)."""
    conn.execute("VACUUM pgbench_branches")
    conn.execute("VACUUM pgbench_tellers")
    conn.execute("TRUNCATE pgbench_history")


def measure(ctx: Context) -> Measurement:
    duration = 10 if ctx.quick else 30
    reps = 2 if ctx.quick else 3
    m = Measurement(
        "source_cost",
        "Cost on the source: pgbench TPC-B-like",
        method=(
            f"`pgbench -i -s 10`, then `pgbench -n -c 2 -j 2 -T {duration}` (built-in TPC-B-like script; "
            "the branches and tellers vacuumed and the history truncated before each run, as pgbench does) "
            f"in turn for each configuration, {reps} times; figures are medians, losses relative to (a). "
            "(a) no capture: context trigger disabled, daemon stopped; (b0) the context trigger "
            "alone; (b) capture: context trigger and `cdc run` running; (c) a classic row-level "
            "audit trigger inserting `to_jsonb(OLD)`/`to_jsonb(NEW)` into an audit table "
            "(`bench/source_cost.py`). All at wal_level=logical with the slot in place; the slot is "
            "fast-forwarded between runs. The store is a second server, but on the same 2 CPUs: in (b) "
            "the daemon and the store compete with pgbench and the source for them. Besides "
            "transactions/s, the CPU time the source server used per transaction (all its processes: "
            "backends, walsender, background; read from /proc) is the cost on the source proper, and "
            "does not depend on what else the machine runs."
        ),
        params={"duration_s": duration, "alternations": reps, "scale": 10, "clients": 2},
    )
    with server(ctx.flavor) as pg, server(ctx.flavor) as store_pg:
        src = pg.create_database("tpcb")
        store = store_pg.create_database("tpcb_store")
        with connect(src) as conn:
            conn.execute(MARKER_DDL)
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
        args = ["-n", "-c", "2", "-j", "2", "-T", str(duration)]
        for rep in range(reps):
            for config, label in CONFIGS.items():
                with connect(src) as conn:
                    configure(conn, config)
                    _reset(conn)
                run: dict[str, Any] = {"rep": rep, "config": config}
                if config == "b":
                    with running_daemon(capture, ctx.log_path("daemon-source-cost.log")) as daemon:
                        catch_up(capture, daemon)
                        cpu = (server_cpu_seconds(pg), process_cpu_seconds(daemon.pid, False))
                        store_cpu = server_cpu_seconds(store_pg)
                        out = pgbench(pg, args, "tpcb")
                        time.sleep(0.3)  # the backends' exit, so that their CPU is counted
                        daemon.check_alive()
                        run["source_cpu_s"] = server_cpu_seconds(pg) - cpu[0]
                        run["daemon_cpu_s"] = process_cpu_seconds(daemon.pid, False) - cpu[1]
                        run["store_cpu_s"] = server_cpu_seconds(store_pg) - store_cpu
                        with connect(src) as conn, capture.store() as st:
                            wal = int(scalar(conn, "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
                            run["daemon_behind_bytes_at_end"] = max(0, wal - capture.acked_lsn(st))
                else:
                    cpu = (server_cpu_seconds(pg), 0.0)
                    out = pgbench(pg, args, "tpcb")
                    time.sleep(0.3)
                    run["source_cpu_s"] = server_cpu_seconds(pg) - cpu[0]
                capture.advance_slot()
                run["tps"] = pgbench_tps(out)
                run["transactions"] = _processed(out)
                for what in ("source", "daemon", "store"):
                    if f"{what}_cpu_s" in run:
                        run[f"{what}_cpu_ms_per_txn"] = (
                            run[f"{what}_cpu_s"] * 1000 / max(1, run["transactions"])
                        )
                m.runs.append(run)
                log(
                    f"source cost: run {rep + 1}/{reps} ({config}) {label}: {run['tps']:,.0f} tps, "
                    f"source CPU {run['source_cpu_ms_per_txn']:.2f} ms/transaction"
                )
    _figures(m)
    return m


def _figures(m: Measurement) -> None:
    by_config = {c: [r for r in m.runs if r["config"] == c] for c in CONFIGS}
    tps = {c: [r["tps"] for r in runs] for c, runs in by_config.items()}
    cpu = {c: [r["source_cpu_ms_per_txn"] for r in runs] for c, runs in by_config.items()}
    for config, label in CONFIGS.items():
        m.figures.append(Figure(f"source_cost.{config}.tps", f"({config}) {label}", "tps", tps[config]))
    base = median(tps["a"])
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
    for config, label in CONFIGS.items():
        m.figures.append(
            Figure(
                f"source_cost.{config}.cpu",
                f"({config}) source server CPU per transaction",
                "ms",
                cpu[config],
                note=label,
            )
        )
    base_cpu = median(cpu["a"])
    if base_cpu:
        for config in ("b0", "b", "c"):
            value = median(cpu[config])
            m.figures.append(
                Figure(
                    f"source_cost.{config}.cpu_overhead",
                    f"({config}) source CPU per transaction vs (a)",
                    "%",
                    [(v / base_cpu - 1) * 100 for v in cpu[config]],
                    value=None if value is None else (value / base_cpu - 1) * 100,
                    note="more CPU than (a), of the medians",
                )
            )
    for what, label in (("daemon", "`cdc run`"), ("store", "the store server")):
        values = [r[f"{what}_cpu_ms_per_txn"] for r in by_config["b"] if f"{what}_cpu_ms_per_txn" in r]
        if values:
            m.figures.append(
                Figure(
                    f"source_cost.b.{what}_cpu", f"(b) CPU of {label} per source transaction", "ms", values
                )
            )
    behind = [r["daemon_behind_bytes_at_end"] for r in by_config["b"] if "daemon_behind_bytes_at_end" in r]
    if behind:
        m.notes.append(
            "At the end of each (b) run the daemon was "
            + ", ".join(f"{b / 1024**2:.1f} MiB" for b in behind)
            + " of WAL behind the source."
        )
