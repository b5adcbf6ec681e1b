"""Where an application's error happened: ``file.py:42`` of its innermost application frame.

The client helper (:mod:`cdc.client`) records it with a request's reported error.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from contextlib import suppress
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = ["error_location"]

#: cdc's own modules on the way of an application's exception (client.request's context managers).
_OWN_FILES: Final = frozenset(
    os.path.normcase(os.path.abspath(Path(__file__).with_name(name)))
    for name in ("client.py", "error_location.py", "middleware.py")
)


def _library_dirs() -> tuple[str, ...]:
    dirs: set[str] = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(path)
    with suppress(AttributeError):  # some virtualenv layouts have no getsitepackages()
        dirs.update(site.getsitepackages())
    user_site = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if isinstance(user_site, str):
        dirs.add(user_site)
    return tuple(sorted({os.path.normcase(os.path.abspath(d)) for d in dirs}, key=len, reverse=True))


_LIBRARY_DIRS: Final = _library_dirs()


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):  # <frozen ...>, <string>
        return True
    path = os.path.normcase(os.path.abspath(filename))
    if path in _OWN_FILES:
        return True
    parts = path.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return True
    return any(path.startswith(d + os.sep) for d in _LIBRARY_DIRS)


def _display_path(filename: str) -> str:
    path = os.path.abspath(filename)
    cwd = os.getcwd()
    if path.startswith(cwd + os.sep):
        return os.path.relpath(path, cwd)
    best: str | None = None
    for entry in sys.path:
        root = os.path.abspath(entry or cwd)
        if path.startswith(root + os.sep):
            rel = os.path.relpath(path, root)
            if best is None or len(rel) < len(best):
                best = rel
    return best or os.path.basename(path)


def error_location(exc: BaseException) -> str | None:
    """``file.py:42`` of the innermost application frame in ``exc``'s traceback.

    Application frames are those outside cdc's client modules, the standard library and
    installed packages; when there is none, the innermost frame outside cdc's client modules is
    used.
    """
    tb: TracebackType | None = exc.__traceback__
    app: tuple[str, int] | None = None
    fallback: tuple[str, int] | None = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        lineno = tb.tb_lineno
        if os.path.normcase(os.path.abspath(filename)) not in _OWN_FILES:
            fallback = (filename, lineno)
            if not _is_library(filename):
                app = (filename, lineno)
        tb = tb.tb_next
    chosen = app or fallback
    if chosen is None:
        return None
    return f"{_display_path(chosen[0])}:{chosen[1]}"
