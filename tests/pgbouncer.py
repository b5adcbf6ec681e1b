"""A throwaway PgBouncer in front of a test server (Debian's ``pgbouncer`` package).

``PgBouncer(pg, pool_mode="transaction", pool_size=2)`` writes a configuration into a temporary
directory, starts ``pgbouncer`` in the foreground as the user the server runs as (PgBouncer, like
PostgreSQL, refuses to run as root: the tests' LocalPostgres runs as ``cdcpg`` then) on 127.0.0.1
and a free port, and routes every database name to ``pg``. ``stop()`` ends that process (ours, by
its pid) and removes the directory. Authentication is ``trust``: the users the tests connect as
are listed in its auth file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg

from cdc.devdb import LocalPostgres
from cdc.devdb_host import Owner

PGBOUNCER = "/usr/sbin/pgbouncer"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    """PgBouncer routing every database to ``pg``; ``dsn(dbname)`` connects through it."""

    def __init__(
        self,
        pg: LocalPostgres,
        *,
        pool_mode: str = "transaction",
        pool_size: int = 2,
        users: tuple[str, ...] = ("postgres",),
        binary: str = PGBOUNCER,
    ) -> None:
        self.pg = pg
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.users = users
        self.binary = binary
        self.port = _free_port()
        self._owner = Owner()
        self._dir = Path(tempfile.mkdtemp(prefix="cdc-pgbouncer-"))
        self._owner.chown(self._dir)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self._dir / "pgbouncer.log"

    def _write_config(self) -> Path:
        auth = self._dir / "users.txt"
        auth.write_text("".join(f'"{user}" ""\n' for user in self.users), encoding="utf-8")
        ini = self._dir / "pgbouncer.ini"
        ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host=127.0.0.1 port={self.pg.port}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"auth_file = {auth}",
                    f"pool_mode = {self.pool_mode}",
                    f"default_pool_size = {self.pool_size}",
                    "min_pool_size = 0",
                    "reserve_pool_size = 0",
                    "max_client_conn = 200",
                    "server_lifetime = 3600",
                    "server_idle_timeout = 600",
                    # A client waiting for a server connection gives up after this (120 s by default).
                    "query_wait_timeout = 20",
                    # What a transaction-pooled client may not rely on: nothing is reset between
                    # clients (server_reset_query applies to session pooling only).
                    "server_reset_query = DISCARD ALL",
                    f"logfile = {self.log_file}",
                    f"pidfile = {self._dir / 'pgbouncer.pid'}",
                    "log_connections = 0",
                    "log_disconnections = 0",
                    "admin_users = postgres",
                    "",
                ]
            ),
            encoding="utf-8",
        )
        for path in (auth, ini):
            self._owner.chown(path)
        return ini

    def start(self, timeout: float = 20) -> None:
        ini = self._write_config()
        self._proc = subprocess.Popen(
            [self.binary, str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(self._dir),
            env=self._owner.environ(),
            start_new_session=True,
            **self._owner.subprocess_kwargs(),
        )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.dsn("postgres"), autocommit=True, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(
                self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def dsn(self, dbname: str, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM: our own child, by its pid
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def pgbouncer_available(binary: str = PGBOUNCER) -> bool:
    return Path(binary).is_file() and os.access(binary, os.X_OK)
