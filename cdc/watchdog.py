"""Client-side deadlines for blocking PostgreSQL calls, whatever the DSN says.

psycopg waits for an answer without a deadline, and TCP does not notice a peer gone silent
behind a proxy or middlebox that still acknowledges segments: keepalives and
``tcp_user_timeout`` then never fire. :func:`abort` shuts a connection's socket down from
another thread, so a call blocked on it returns at once with ``psycopg.OperationalError``;
:class:`Deadline` does it when a block of calls outlasts its time; :func:`probe_session` asks
the server, on a fresh connection, whether a session is still being worked on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import psycopg

from cdc.errors import CdcError


def abort(conn: psycopg.Connection[Any]) -> None:
    """Shut the connection's socket down (both ways): blocked reads and writes on it fail.

    Safe from any thread: only a duplicate of the descriptor is closed here; the connection
    itself is closed by its owner when the error reaches it.
    """
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:
        return  # closed already
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()


class Deadline:
    """``with Deadline(conn, seconds, error):`` the calls inside must finish in time.

    When they do not, the connection's socket is shut down and the block raises
    ``error("no answer within N s")`` (a CdcError, typically retryable) instead of the
    driver's error; the connection is then unusable and must be closed and reopened.
    """

    def __init__(
        self, conn: psycopg.Connection[Any], seconds: float, error: Callable[[str], CdcError]
    ) -> None:
        self.conn = conn
        self.seconds = seconds
        self.error = error
        self.expired = False
        self._active = True
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if not self._active:
                return
            self.expired = True
            abort(self.conn)

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            self._active = False
        self._timer.cancel()
        if self.expired and (exc is None or isinstance(exc, psycopg.Error | CdcError)):
            # Also when the answer came just as the time ran out: the socket is shut now.
            raise self.error(f"no answer within {self.seconds:g}s") from exc


def probe_session(dsn: str, pid: int, timeout: float, idle_after: float) -> str | None:
    """Why backend ``pid`` on the server of ``dsn`` is no longer working for its client, or None.

    Asked on a fresh connection (at most about ``timeout`` seconds in all). A session that is
    running a statement is working (slow, maybe waiting for a lock); one idle for more than
    ``idle_after`` seconds (the server waits for the client), blocked sending to its client,
    or gone means the client's connection is broken; so is a server that cannot be reached.
    """
    try:
        with (
            psycopg.connect(
                dsn, autocommit=True, connect_timeout=max(2, round(timeout)), application_name="cdc-probe"
            ) as conn,
            Deadline(conn, timeout, _ProbeTimeoutError),
        ):
            row = conn.execute(
                "SELECT state, wait_event, extract(epoch FROM clock_timestamp() - state_change)::float8 "
                "FROM pg_stat_activity WHERE pid = %s",
                (pid,),
            ).fetchone()
    except (psycopg.Error, _ProbeTimeoutError) as exc:
        first = str(exc).strip().splitlines()
        return f"the server does not answer a new connection ({first[0] if first else type(exc).__name__})"
    if row is None:
        return "the server no longer has the connection's session"
    state, wait_event, seconds = row
    if state == "active" and wait_event != "ClientWrite":
        return None
    if state == "active":
        return "the server has been blocked sending to the connection"
    if seconds is not None and seconds < idle_after:
        return None  # idle only briefly: the client is between two statements
    return f"the server has been waiting for the client for {seconds or 0:.0f}s (session {state})"


class _ProbeTimeoutError(CdcError):
    retryable = True
