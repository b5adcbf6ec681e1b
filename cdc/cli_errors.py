"""The command line's shared plumbing: the one error boundary (a CdcError, and where a
command names one an SQL error, becomes its message on stderr and its exit code, never a
traceback) and the config a command loads with its DSN options.

No command logic here, and no import of the command modules (they import this one).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import NoReturn

import click
import psycopg

from cdc.config import Config, load_config, redact_dsn
from cdc.errors import CdcError


def fail(exc: CdcError) -> NoReturn:
    """``error: message (hint: hint)`` on stderr (the hint on a line of its own after a
    message of several lines), then exit with the error's code."""
    message = exc.message.rstrip()
    if exc.hint:
        message = f"{message}\n  hint: {exc.hint}" if "\n" in message else f"{message} (hint: {exc.hint})"
    click.echo(f"error: {message}", err=True)
    sys.exit(exc.exit_code)


def sql_error_text(exc: psycopg.Error) -> str:
    """The first line of a driver error, DSNs redacted."""
    text = str(exc).strip()
    return redact_dsn(text.splitlines()[0]) if text else type(exc).__name__


@contextlib.contextmanager
def boundary(sql_error: Callable[[str], CdcError] | None = None) -> Iterator[None]:
    """Run a command: every CdcError → :func:`fail`; with ``sql_error``, a psycopg error too
    (``sql_error`` makes the CdcError from its first line); a closed pipe (``| head``) → exit 0.

    Also re-reads TZ, so that local times follow the zone the command runs in."""
    if hasattr(time, "tzset"):
        time.tzset()
    try:
        yield
    except CdcError as exc:
        fail(exc)
    except psycopg.Error as exc:
        if sql_error is None:
            raise
        fail(sql_error(sql_error_text(exc)))
    except BrokenPipeError:
        sys.exit(0)


def load(config_path: str | None, source: str | None = None, store: str | None = None) -> Config:
    """The config file (or none) with the environment, ``--source``/``--store`` over both."""
    env = dict(os.environ)
    if source:
        env["CDC_SOURCE_DSN"] = source
    if store:
        env["CDC_STORE_DSN"] = store
    return load_config(config_path, env=env)
