"""The libpq a psycopg connection uses, for the compiled core's drain loop.

The compiled ``Core.drain`` reads frames by calling ``PQgetCopyData``/``PQfreemem`` from C on
the connection's ``PGconn *`` (``pgconn.pgconn_ptr``) instead of one ``get_copy_data(1)`` call
(a Python call and a buffer object) per frame. The functions must be those of the very libpq
psycopg calls: psycopg[binary] links its pq module with the libpq it bundles, the pure-Python
psycopg loads the system one with ctypes. They are looked up at run time, never linked at
build time: ``dlsym`` on psycopg's own handle (its ctypes library, or its pq extension, whose
dependencies are searched too), then checked: the address lies in a loaded ``libpq*`` file
(/proc/self/maps), ``PQlibVersion`` is psycopg's, and ``PQbackendPID`` of the connection is
the one psycopg reports. Anything not found or not matching leaves the psycopg call per frame;
which path is in use is logged once (``CDC_LIBPQ_DRAIN=0`` asks for the psycopg path).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Any, Final, Literal

import psycopg
import structlog
from psycopg import pq

log = structlog.get_logger("cdc.capture")

DrainPath = Literal["libpq", "psycopg"]

_FUNCTIONS: Final = ("PQgetCopyData", "PQfreemem", "PQbackendPID", "PQlibVersion")
_PID: Final = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_VERSION: Final = ctypes.CFUNCTYPE(ctypes.c_int)


@dataclass(frozen=True, slots=True)
class Libpq:
    """A loaded libpq: its file and the addresses of the functions the drain loop uses."""

    path: str
    get_copy_data: int
    freemem: int
    backend_pid: int


@dataclass(frozen=True, slots=True)
class Drain:
    """What the C drain loop needs for one connection."""

    conn: int  # PGconn *
    get_copy_data: int
    freemem: int
    path: str


_found: dict[type, Libpq | str] = {}
_logged: set[tuple[str, str]] = set()


def drain_functions(pgconn: Any) -> Drain | str:
    """The ``PGconn *`` and libpq functions to drain ``pgconn`` with, or why not."""
    ptr = getattr(pgconn, "pgconn_ptr", None)
    if type(ptr) is not int or ptr == 0:
        return "the connection has no pgconn_ptr (not a psycopg PGconn, or closed)"
    found = find(type(pgconn))
    if isinstance(found, str):
        return found
    try:
        pid = _PID(found.backend_pid)(ptr)
        expected = pgconn.backend_pid
    except Exception as exc:  # noqa: BLE001 - any failure leaves the psycopg path
        return f"checking the connection failed: {type(exc).__name__}: {exc}"
    if pid != expected:
        return f"PQbackendPID of {found.path} does not match psycopg's backend_pid"
    return Drain(ptr, found.get_copy_data, found.freemem, found.path)


def find(pgconn_type: type) -> Libpq | str:
    """The libpq functions psycopg's ``pgconn_type`` calls (cached), or why they are not used."""
    cached = _found.get(pgconn_type)
    if cached is None:
        try:
            cached = _find(pgconn_type)
        except Exception as exc:  # noqa: BLE001 - any failure leaves the psycopg path
            cached = f"looking libpq up failed: {type(exc).__name__}: {exc}"
        _found[pgconn_type] = cached
    return cached


def _find(pgconn_type: type) -> Libpq | str:
    if os.environ.get("CDC_LIBPQ_DRAIN", "").strip() == "0":
        return "CDC_LIBPQ_DRAIN=0"
    module = pgconn_type.__module__
    if module == "psycopg.pq.pq_ctypes":
        from psycopg.pq import _pq_ctypes  # only with psycopg's ctypes implementation

        lib = _pq_ctypes.pq  # type: ignore[attr-defined]  # (not in its stub)
    elif module in {"psycopg_binary.pq", "psycopg_c.pq"}:
        # The extension's handle: dlsym searches it, then the libraries it was linked with.
        # RTLD_NOLOAD: the copy already loaded, never another one.
        lib = ctypes.CDLL(sys.modules[module].__file__, mode=os.RTLD_NOLOAD)
    else:
        return f"unknown psycopg implementation {module}"
    addresses = {name: ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0 for name in _FUNCTIONS}
    files = {mapped_file(address) for address in addresses.values()}
    path = files.pop() if len(files) == 1 else None
    if path is None or not os.path.basename(path).startswith("libpq"):
        return f"the libpq functions psycopg calls are not all in one loaded libpq file ({sorted(map(str, files))})"
    version = _VERSION(addresses["PQlibVersion"])()
    if version != pq.version():
        return f"{path} is libpq {version}, psycopg reports {pq.version()}"
    return Libpq(path, addresses["PQgetCopyData"], addresses["PQfreemem"], addresses["PQbackendPID"])


def mapped_file(address: int) -> str | None:
    """The file mapped at ``address`` in this process (/proc/self/maps), if any."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, _, end = fields[0].partition("-")
            if int(start, 16) <= address < int(end, 16):
                return fields[5].strip() if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def copy_failed(pgconn: Any) -> Exception:
    """The error psycopg's ``get_copy_data`` raises when PQgetCopyData returns -2."""
    return psycopg.OperationalError(f"receiving copy data failed: {pgconn.get_error_message()}")


def note(path: DrainPath, detail: str) -> None:
    """Log which drain path is in use, once per path and detail."""
    if (path, detail) not in _logged:
        _logged.add((path, detail))
        log.info("capture drain path", path=path, detail=detail)
