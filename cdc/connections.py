"""Connections of the one-shot commands (setup, backfill): a failure to connect becomes a
:class:`~cdc.errors.CdcError` that names the database (its DSN redacted), never a psycopg error.

It opens connections and nothing else; the daemon has its own (reconnecting) paths."""

from __future__ import annotations

from typing import Any, Literal

import psycopg

from cdc.config_text import redact_dsn
from cdc.errors import ConfigError, SourceUnavailableError, StoreUnavailableError, error_text

CONNECT_TIMEOUT_SECONDS = 10


def connect(dsn: str, what: Literal["source", "store"], **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection to the source or the store; a DSN libpq cannot parse is a configuration error,
    an unreachable server a retryable one."""
    try:
        return psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT_SECONDS, **kwargs)
    except psycopg.OperationalError as exc:
        error = SourceUnavailableError if what == "source" else StoreUnavailableError
        raise error(f"cannot connect to the {what} ({redact_dsn(dsn)}): {error_text(exc)}") from exc
    except psycopg.ProgrammingError as exc:  # libpq's conninfo parser refused the DSN
        raise ConfigError([f"{what} DSN: {error_text(exc)}"]) from exc
