"""The store writer's process: batches in over a pipe, one store transaction each, replies out.

The daemon starts it per capture session as a fresh interpreter (``python -c``, a socket pair
inherited as the only extra file descriptor): nothing of the parent, no psycopg connection and
no thread, is inherited, and it imports only what writing needs (no ``cdc.config``, no web
stack, no ``rich``; no multiprocessing ``spawn``, which would import the daemon's main module
and start a resource tracker process). Its parameters arrive as the first message (the DSN is
never on a command line). It connects to the store, takes the slot's
active-daemon lock, reads the capture state and says it is ready; then it writes each batch it
receives, in order, and replies with the batch's id and write duration, or with the error that
stopped it (type, message, hint, retryable), after which it exits. A batch travels as a small
JSON header and a few large byte blobs (COPY text), never as pickled objects. The pipe closing
(the daemon stopped or died) ends it once the batches already received are written.

A thread of its own reads the pipe, so the daemon never blocks sending while a write is in
progress; the daemon keeps at most two batches in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import psycopg
import structlog

from cdc.errors import (
    CdcError,
    ProtocolError,
    SetupError,
    SlotLostError,
    SourceUnavailableError,
    StandbyError,
    StoreUnavailableError,
    error_text,
)
from cdc.logs import configure_logging
from cdc.store.writer import CaptureState, StoreBatch, StoreWriter

log = structlog.get_logger("cdc.writer")

_ERRORS: dict[str, type[CdcError]] = {
    cls.__name__: cls
    for cls in (
        StoreUnavailableError,
        SourceUnavailableError,
        SetupError,
        SlotLostError,
        StandbyError,
        ProtocolError,
    )
}


class WriterProcessError(CdcError):
    """An error the writer process reported that has no class of its own here."""

    def __init__(self, message: str, *, hint: str | None, retryable: bool, exit_code: int) -> None:
        super().__init__(message, hint=hint)
        self.retryable = retryable
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class WriterParams:
    store_dsn: str
    schema: str
    slot: str
    daemon_pid: int
    log_level: str
    log_format: str


@dataclass(frozen=True, slots=True)
class Ready:
    state: CaptureState | None
    backend_pid: int | None


@dataclass(frozen=True, slots=True)
class Written:
    batch_id: int
    seconds: float


# ============================================================================ wire format


def encode_batch(batch_id: int, batch: StoreBatch) -> list[bytes]:
    """The messages carrying a batch: a JSON header, then its blobs."""
    header = {
        "id": batch_id,
        "ack": batch.ack_lsn,
        "fresh": batch.fresh,
        "pending": batch.pending,
        "min_us": batch.min_us,
        "max_us": batch.max_us,
        "rows": batch.rows,
        "max_position": batch.max_position,
        "actors": batch.actor_sequences,
        "errors": batch.request_errors,
        "changes": len(batch.changes),
        "backfill": batch.backfill,
    }
    return [
        orjson.dumps(header),
        *batch.changes,
        b"".join(batch.transactions),
        b"".join(batch.context_changes),
    ]


def _receive_batch(conn: Connection) -> tuple[int, StoreBatch] | None:
    """Read one batch (None when the pipe closed)."""
    try:
        header = orjson.loads(conn.recv_bytes())
        changes = [conn.recv_bytes() for _ in range(int(header["changes"]))]
        transactions = conn.recv_bytes()
        context_changes = conn.recv_bytes()
    except (EOFError, OSError):
        return None
    batch = StoreBatch(
        changes=changes,
        transactions=[transactions] if transactions else [],
        context_changes=[context_changes] if context_changes else [],
        request_errors=list(header["errors"]),
        actor_sequences=dict(header["actors"]),
        fresh=list(header["fresh"]),
        pending=list(header["pending"]),
        ack_lsn=header["ack"],
        min_us=header["min_us"],
        max_us=header["max_us"],
        rows=int(header["rows"]),
        max_position=int(header["max_position"]),
        backfill=list(header.get("backfill") or ()),
    )
    return int(header["id"]), batch


def _error_reply(exc: BaseException) -> bytes:
    if isinstance(exc, CdcError):
        return orjson.dumps(
            {
                "error": {
                    "type": type(exc).__name__,
                    "message": exc.message,
                    "hint": exc.hint,
                    "retryable": exc.retryable,
                    "exit_code": exc.exit_code,
                }
            }
        )
    return orjson.dumps(
        {
            "error": {
                "type": type(exc).__name__,
                "message": f"{type(exc).__name__}: {error_text(exc)}",
                "hint": None,
                "retryable": True,
                "exit_code": 1,
            }
        }
    )


def _error_from(reply: dict[str, Any]) -> CdcError:
    cls = _ERRORS.get(reply["type"])
    if cls is not None:
        return cls(reply["message"], hint=reply.get("hint"))
    return WriterProcessError(
        reply["message"],
        hint=reply.get("hint"),
        retryable=bool(reply.get("retryable", True)),
        exit_code=int(reply.get("exit_code", 1)),
    )


# ============================================================================ the child


def _die_with_parent(parent: int) -> None:
    """Linux: be killed when the daemon dies (the store transaction in progress rolls back and
    the slot's lock is free for the next daemon at once), not only once the pipe is read."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)


def child_main() -> None:
    """The writer process's entry point: ``argv[1]`` is its end of the socket pair."""
    conn = Connection(int(sys.argv[1]))
    try:
        params = WriterParams(**orjson.loads(conn.recv_bytes()))
    except (EOFError, OSError):
        return  # the daemon went away before sending them
    writer_main(conn, params)


def writer_main(conn: Connection, params: WriterParams) -> None:
    """The writer process's body."""
    _die_with_parent(params.daemon_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is the daemon's to handle
    configure_logging(params.log_level, params.log_format)
    writer = StoreWriter(params.store_dsn, params.schema, params.slot)
    try:
        writer.connect()
        state = writer.load_state()
        if state is not None:
            writer.record_daemon(params.daemon_pid)
        conn.send_bytes(
            orjson.dumps(
                {"ready": {"state": asdict(state) if state else None, "backend_pid": writer.backend_pid}}
            )
        )
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, which owns error handling
        _report(conn, exc)
        writer.close()
        return
    inbox: queue.Queue[tuple[int, StoreBatch] | None] = queue.Queue()

    def read() -> None:
        while True:
            item = _receive_batch(conn)
            inbox.put(item)
            if item is None:
                return

    threading.Thread(target=read, name="cdc-writer-pipe", daemon=True).start()
    try:
        while True:
            item = inbox.get()
            if item is None:
                return
            batch_id, batch = item
            started = time.perf_counter()
            writer.write(batch)
            conn.send_bytes(orjson.dumps({"ok": batch_id, "seconds": time.perf_counter() - started}))
    except BaseException as exc:  # noqa: BLE001 - reported to the daemon, which owns error handling
        _report(conn, exc)
    finally:
        writer.close()


def _report(conn: Connection, exc: BaseException) -> None:
    if not isinstance(exc, CdcError | psycopg.Error):
        log.error("writer_failed", error=f"{type(exc).__name__}: {error_text(exc)}", exc_info=True)
    with contextlib.suppress(OSError):
        conn.send_bytes(_error_reply(exc))


# ============================================================================ the daemon's side


#: What the writer process runs: ``rich`` (which structlog would import for pretty
#: tracebacks, ~6 MB) is kept out, and the tree ``cdc`` was imported from comes first.
_CHILD = (
    "import sys; sys.modules['rich'] = None; sys.path.insert(0, {root!r}); "
    "from cdc.capture.writer_process import child_main; child_main()"
)


class WriterProcess:
    """The daemon's handle on its writer process."""

    def __init__(self, params: WriterParams) -> None:
        self.params = params
        ours, child = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _CHILD.format(root=root), str(child.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(child.fileno(),),
            )
        finally:
            child.close()
        self._conn = Connection(ours.detach())
        self.backend_pid: int | None = None
        with contextlib.suppress(OSError):  # it died at once: ready() reports it
            self._conn.send_bytes(orjson.dumps(asdict(params)))

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def fileno(self) -> int:
        return self._conn.fileno()

    def ready(self, timeout: float) -> Ready | None:
        """The process is connected (None: not within ``timeout`` s); raises its error."""
        if not self._conn.poll(timeout):
            return None
        reply = self._receive()
        ready = reply.get("ready")
        if ready is None:
            raise StoreUnavailableError("the store writer process sent an unexpected reply")
        state = ready["state"]
        self.backend_pid = ready["backend_pid"]
        return Ready(CaptureState(**state) if state else None, self.backend_pid)

    def send(self, batch_id: int, batch: StoreBatch) -> None:
        try:
            for message in encode_batch(batch_id, batch):
                self._conn.send_bytes(message)
        except OSError as exc:
            raise self._ended() from exc

    def replies(self) -> list[Written]:
        """Every reply that arrived (without waiting); raises the error the process reported."""
        written: list[Written] = []
        while self._conn.poll(0):
            reply = self._receive()
            if "ok" not in reply:
                raise StoreUnavailableError("the store writer process sent an unexpected reply")
            written.append(Written(int(reply["ok"]), float(reply["seconds"])))
        return written

    def _receive(self) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = orjson.loads(self._conn.recv_bytes())
        except (EOFError, OSError) as exc:
            raise self._ended() from exc
        error = reply.get("error")
        if error is not None:
            raise _error_from(error)
        return reply

    def _ended(self) -> CdcError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)
        code = self._process.returncode
        return StoreUnavailableError(f"the store writer process ended (exit code {code})")

    def kill(self) -> None:
        """End the process at once (its store transaction, if any, rolls back)."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()  # a no-op once it was reaped

    def stop(self, timeout: float) -> None:
        """Close the pipe (the process writes what it holds, then exits); kill it after ``timeout``."""
        with contextlib.suppress(OSError):
            self._conn.close()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(5)
