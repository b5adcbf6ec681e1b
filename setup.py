"""Build hook for the optional compiled capture core (cdc/capture/_core.pyx).

The package's metadata lives in pyproject.toml; this file only adds the Cython extension.
The extension is optional: without Cython or a C compiler, or when compiling fails, the
install still succeeds (with a warning) and cdc runs the pure-Python core
(cdc/capture/engine.py says which one is in use). CDC_NO_EXTENSION=1 skips it on purpose.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCE = "cdc/capture/_core.pyx"
#: The parts _core.pyx includes (one extension module; a change to any rebuilds it).
INCLUDES = sorted(str(p) for p in Path("cdc/capture").glob("_core_*.pxi"))


def warn(what: str, exc: BaseException | None = None) -> None:
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    print(
        f"WARNING: the compiled capture core is not built ({what}{detail}); "
        "cdc will use the pure-Python core",
        file=sys.stderr,
    )


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the pure-Python core
            warn("build_ext failed", exc)

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - a compiler error is not an install error
            warn(f"compiling {ext.name} failed", exc)


def remove_inplace_build() -> None:
    """An extension an earlier editable install built in the tree would still be imported."""
    for path in Path("cdc/capture").glob("_core.*.so"):
        path.unlink()
        print(f"removed {path}, built by an earlier install", file=sys.stderr)


def extensions() -> list[Any]:
    if os.environ.get("CDC_NO_EXTENSION", "").strip() == "1":
        warn("CDC_NO_EXTENSION=1")
        remove_inplace_build()
        return []
    try:
        from Cython.Build import cythonize
    except ImportError as exc:
        warn("Cython is not installed", exc)
        return []
    try:
        return list(
            cythonize(
                [Extension("cdc.capture._core", [SOURCE], depends=INCLUDES, extra_compile_args=["-O2"])],
                compiler_directives={"language_level": 3},
                quiet=True,
            )
        )
    except Exception as exc:  # noqa: BLE001 - a Cython error is not an install error
        warn("cythonizing failed", exc)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
