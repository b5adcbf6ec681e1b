"""Shared machinery of the benchmarks: servers, capture set-ups, the daemon as a process,
pgbench and pg_recvlogical, waiting for the store to catch up, and small statistics."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdc.devdb import LocalPostgres

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "out"

#: Server settings of every benchmark server, on top of cdc.devdb's defaults (fsync=off...).
#: synchronous_commit=on: with it off, a commit reaches the WAL (and so the walsender) only
#: when the WAL writer flushes, up to wal_writer_delay (200 ms) later, which would be counted
#: as capture lag. fsync stays off (no disk in the figures).
BENCH_SETTINGS: dict[str, str] = {
    "synchronous_commit": "on",
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "maintenance_work_mem": "512MB",
    "max_parallel_maintenance_workers": "2",
    "max_replication_slots": "20",
    "max_wal_senders": "20",
}


def log(message: str) -> None:
    """Progress on stderr, with a time stamp (stdout stays free for the summary)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0-100), linear interpolation between closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def server(flavor: str, settings: dict[str, str] | None = None) -> Iterator[LocalPostgres]:
    """A started throwaway server; stopped and deleted on the way out, whatever happens."""
    merged = dict(BENCH_SETTINGS)
    merged.update(settings or {})
    pg = LocalPostgres(flavor=flavor, settings=merged)
    try:
        pg.start()
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.cleanup()


def connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=10)


def scalar(dsn_or_conn: str | psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    if isinstance(dsn_or_conn, str):
        with connect(dsn_or_conn) as conn:
            return scalar(conn, query, params)
    row = dsn_or_conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def lsn_int(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def script_dir() -> Path:
    """A temporary directory the server's OS user can read (pgbench scripts)."""
    path = Path(tempfile.mkdtemp(prefix="cdc-bench-"))
    path.chmod(0o755)
    return path


def write_script(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


# --------------------------------------------------------------------------- CPU time

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU of a process (and of its reaped children), in seconds."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # Fields after the command: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and of its live children (`cdc run`: the store writer process)."""
    total = process_cpu_seconds(pid)
    for child in children_of(pid):
        total += process_cpu_seconds(child)
    return total


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def server_cpu_seconds(pg: LocalPostgres) -> float:
    """CPU used by a server so far: the postmaster with every child it reaped, plus its live
    children (backends, walsenders, background processes). A difference of two readings is
    the CPU the server spent in between, whatever else the machine was doing."""
    postmaster = pg.pid
    if postmaster is None:
        return 0.0
    total = process_cpu_seconds(postmaster)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == postmaster:
                total += process_cpu_seconds(int(entry.name))
    return total


# --------------------------------------------------------------------------- capture set-ups


@dataclass
class Capture:
    """One capture: a source database, a slot + publication, and a store schema."""

    pg: LocalPostgres
    source_dsn: str
    store_dsn: str
    slot: str
    schema: str
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        # Not the caller's configuration; CDC_PURE_PYTHON (which capture core) is no setting.
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CDC_") or k == "CDC_PURE_PYTHON"}
        environ.update(
            {
                "CDC_SOURCE_DSN": self.source_dsn,
                "CDC_STORE_DSN": self.store_dsn,
                "CDC_SOURCE__SLOT": self.slot,
                "CDC_SOURCE__PUBLICATION": self.slot,
                "CDC_STORE__SCHEMA": self.schema,
                "CDC_LOGGING__FORMAT": "json",
                "CDC_LOGGING__LEVEL": "info",
            }
        )
        environ.update(self.extra_env)
        return environ

    def setup(self, log_path: Path | None = None) -> float:
        """`cdc setup` as a subprocess; returns its duration in seconds."""
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "cdc", "setup"],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
            cwd=ROOT,
        )
        if log_path is not None:
            with log_path.open("a") as f:
                f.write(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"cdc setup failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")
        return time.monotonic() - started

    def store(self) -> psycopg.Connection[Any]:
        conn = connect(self.store_dsn)
        conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
        return conn

    def acked_lsn(self, conn: psycopg.Connection[Any]) -> int:
        value = scalar(conn, "SELECT acked_lsn FROM capture_state WHERE slot_name = %s", (self.slot,))
        return int(value or 0)

    def slot_active(self, conn: psycopg.Connection[Any]) -> bool:
        return bool(
            scalar(conn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.slot,))
        )

    def renew_slot(self) -> None:
        """Drop the slot and create it again at the current WAL position (the daemon is
        stopped), as pg_recvlogical's fresh slots are: the next drain decodes only what is
        written after this. A slot kept from the last drain would first decode again from its
        restart point, which lags its confirmed position by up to a running-xacts interval (the
        stores' own writes since, and whole earlier workloads): with streaming, the walsender
        spills each change of that range to disk (it may not stream before the confirmed
        position), which was counted as the daemon's drain and its walsender's CPU."""
        with connect(self.source_dsn) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (self.slot,))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.slot,))

    def advance_slot(self) -> None:
        """Move the slot to the current WAL position (the daemon is stopped): what was written
        meanwhile is skipped, never decoded (fast-forward)."""
        with connect(self.source_dsn) as conn:
            conn.execute(
                "SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())",
                (self.slot,),
            )


def new_capture(
    pg: LocalPostgres, source_dsn: str, store_dsn: str, name: str, extra_env: dict[str, str] | None = None
) -> Capture:
    return Capture(pg, source_dsn, store_dsn, slot=name, schema=f"hist_{name}", extra_env=extra_env or {})


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- the daemon


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format → {metric name: value summed over its label sets}."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        try:
            found[name] = found.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return found


class Daemon:
    """`cdc run` as a real process (log to a file); SIGTERM to stop, SIGKILL when it hangs."""

    def __init__(self, capture: Capture, log_path: Path, wrapper: Sequence[str] = ()) -> None:
        self.capture = capture
        self.log_path = log_path
        self.wrapper = list(wrapper)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.http_port = 0

    def metrics(self) -> dict[str, float]:
        """The daemon's Prometheus metrics, summed over labels (empty when unreachable)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except (OSError, ValueError):
            return {}
        return parse_metrics(text)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Daemon:
        log_file = self.log_path.open("ab")
        # /metrics on a free port: the default 8400 may be taken by another daemon on the machine.
        self.http_port = free_port()
        env = self.capture.env()
        env["CDC_SERVER__LISTEN"] = f"127.0.0.1:{self.http_port}"
        try:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "cdc", "run"],
                env=env,
                stdout=log_file,
                stderr=log_file,
                cwd=ROOT,
            )
        finally:
            log_file.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = self.proc.returncode if self.proc is not None else None
            raise RuntimeError(f"cdc run exited with {code}; log: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def daemon_pid(self) -> int | None:
        """The pid of `cdc run` itself (the wrapper's child when wrapped, e.g. by py-spy)."""
        if self.proc is None:
            return None
        if not self.wrapper:
            return self.proc.pid
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(stat[1]) == self.proc.pid:
                    return int(entry.name)
        return None

    def peak_rss_mb(self) -> float | None:
        """Peak RSS of `cdc run` and its live children (the store writer process), together."""
        pid = self.daemon_pid()
        if pid is None:
            return None
        total = None
        for process in (pid, *children_of(pid)):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{process}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total = (total or 0.0) + int(line.split()[1]) / 1024
        return total

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        target = self.daemon_pid() or self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.daemon_pid()
        if pid is not None and pid != self.proc.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def running_daemon(capture: Capture, log_path: Path, wrapper: Sequence[str] = ()) -> Iterator[Daemon]:
    daemon = Daemon(capture, log_path, wrapper).start()
    try:
        yield daemon
    finally:
        daemon.stop()
        daemon.kill()


# --------------------------------------------------------------------------- markers


MARKER_DDL = "CREATE TABLE IF NOT EXISTS bench_marker (id bigint PRIMARY KEY, at timestamptz)"


def write_marker(source_dsn: str) -> tuple[int, int]:
    """Commit a marker row; return (marker id, WAL insert position right after its commit).

    A non-transactional logical message follows at once, so that a reader given that
    position as its end (pg_recvlogical -E) sees a record past it without waiting.
    """
    marker = time.monotonic_ns()
    with connect(source_dsn) as conn:
        conn.execute("INSERT INTO bench_marker VALUES (%s, clock_timestamp())", (marker,))
        end = lsn_int(str(scalar(conn, "SELECT pg_current_wal_insert_lsn()::text")))
        conn.execute("SELECT pg_logical_emit_message(false, 'bench.end', '')")
    return marker, end


def marker_position(conn: psycopg.Connection[Any], marker: int) -> int | None:
    """The version of the marker's insert in a store (format 2), once its transaction is stored."""
    key = f"[{marker}]"
    value = scalar(
        conn,
        "SELECT c.position FROM changes c JOIN table_names n USING (table_id) "
        "JOIN transactions t ON t.position = c.position AND t.status = 'c' "
        "WHERE n.schema_name = 'public' AND n.table_name = 'bench_marker' "
        "AND c.key_hash = hashtextextended(%s, 0) AND c.key_text = %s",
        (key, key),
    )
    return None if value is None else int(value)


def wait_for_marker(
    capture: Capture,
    marker: int,
    daemon: Daemon | None = None,
    timeout: float = 1800,
    interval: float = 0.02,
    on_poll: Callable[[psycopg.Connection[Any]], None] | None = None,
) -> float:
    """Wait until the store holds the marker and has acknowledged it; return the monotonic time."""
    deadline = time.monotonic() + timeout
    with capture.store() as conn:
        while time.monotonic() < deadline:
            if on_poll is not None:
                on_poll(conn)
            position = marker_position(conn, marker)
            if position is not None and capture.acked_lsn(conn) >= position:
                return time.monotonic()
            if daemon is not None:
                daemon.check_alive()
            time.sleep(interval)
    raise TimeoutError(f"the store did not catch up with marker {marker} within {timeout:.0f} s")


def catch_up(capture: Capture, daemon: Daemon, timeout: float = 1800) -> None:
    marker, _ = write_marker(capture.source_dsn)
    wait_for_marker(capture, marker, daemon, timeout=timeout, interval=0.05)


# --------------------------------------------------------------------------- client binaries


def pgbench(pg: LocalPostgres, args: Sequence[str], dbname: str, timeout: float = 1800) -> str:
    """Run pgbench as the server's OS user; return its output (raise on failure)."""
    argv = [str(pg.bin("pgbench")), *args, dbname]
    out = pg.run_as_owner(argv, timeout=timeout)
    text = (out.stdout or "") + (out.stderr or "")
    if out.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed ({out.returncode}): {text[-2000:]}")
    return text


def pgbench_tps(output: str) -> float:
    match = re.search(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections)", output)
    if match is None:
        match = re.search(r"tps = ([0-9.]+)", output)
    if match is None:
        raise RuntimeError(f"no tps in pgbench output: {output[-1000:]}")
    return float(match.group(1))


class Background(threading.Thread):
    """Run a callable in a thread, keeping its result or exception."""

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def value(self, timeout: float | None = None) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise TimeoutError(f"{self.name} still running")
        if self.error is not None:
            raise self.error
        return self.result


@dataclass(frozen=True)
class ProtocolOptions:
    """The pgoutput options `cdc run` asks for on this server (see cdc.stream.replication)."""

    proto_version: int
    streaming: str

    @classmethod
    def for_server(cls, server_version: int) -> ProtocolOptions:
        from cdc.stream.replication import choose_options

        chosen = choose_options(server_version, "x", "x", 0, "auto")
        return cls(chosen.protocol_version, chosen.streaming)

    def recvlogical_args(self, publication: str) -> list[str]:
        args = ["-o", f"proto_version={self.proto_version}", "-o", f"publication_names={publication}"]
        args += ["-o", "messages=true"]
        if self.streaming != "off":
            args += ["-o", f"streaming={self.streaming}"]
        return args


def create_logical_slot(dsn: str, name: str) -> None:
    with connect(dsn) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))


def drop_slot(dsn: str, name: str) -> None:
    with contextlib.suppress(psycopg.Error), connect(dsn) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        )


def recvlogical_drain(
    pg: LocalPostgres,
    dsn: str,
    slot: str,
    publication: str,
    end_lsn: int,
    options: ProtocolOptions,
    immediate: bool,
    timeout: float = 1800,
) -> float:
    """Drain ``slot`` up to ``end_lsn`` into /dev/null with pg_recvlogical; return seconds."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if immediate:
        environ["PGOPTIONS"] = "-c debug_logical_replication_streaming=immediate"
    argv = [
        str(pg.bin("pg_recvlogical")),
        "-d",
        dsn,
        "--slot",
        slot,
        "--start",
        "--no-loop",
        "-E",
        lsn_text(end_lsn),
        "-f",
        "/dev/null",
        *options.recvlogical_args(publication),
    ]
    started = time.monotonic()
    out = pg.run_as_owner(argv, env=environ, timeout=timeout)
    elapsed = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"pg_recvlogical failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")
    return elapsed
