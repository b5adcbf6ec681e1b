"""cdc: change-data capture for PostgreSQL with request-tagged row history."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from cdc.dryrun import asimulate, simulate
    from cdc.history import History

__all__ = ["History", "__version__", "asimulate", "simulate"]


def __getattr__(name: str) -> Any:
    # Lazy: `import cdc` must stay cheap and free of psycopg for the pure modules.
    if name == "History":
        from cdc.history import History  # lazy: see above

        return History
    if name in ("simulate", "asimulate"):
        from cdc import dryrun  # lazy: see above

        return getattr(dryrun, name)
    raise AttributeError(f"module 'cdc' has no attribute {name!r}")
