"""The command line's shared plumbing: the one error boundary (a CdcError, and where a
command names one an SQL error, becomes its message on stderr and its exit code, never a
traceback), the command classes every ``cdc`` command is made of (click's own errors get the
exit codes of cdc/exit_codes.py; ``--log-level``, ``-v`` and ``-q`` on every command), and the
one resolution of the DSNs (``--source``/``--store``, else ``CDC_SOURCE_DSN``/``CDC_STORE_DSN``,
else the config file) for every command that connects.

No command logic here, and no import of the command modules (they import this one).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from cdc import logs
from cdc.config import Config, load_config, redact_dsn
from cdc.errors import CdcError, UsageError
from cdc.exit_codes import ExitCode

F = TypeVar("F", bound=Callable[..., Any])

#: Longest command-line argument read at all (a key, a request id, a table name, a time...).
MAX_ARGUMENT_CHARS = 10_000


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


# ============================================================================ the command classes


def _set_level(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None and not ctx.resilient_parsing:
        logs.set_cli_level(value)


def _shift(steps: int) -> Callable[[click.Context, click.Parameter, int], None]:
    def callback(ctx: click.Context, _param: click.Parameter, count: int) -> None:
        if count and not ctx.resilient_parsing:
            logs.shift_cli_verbosity(steps * count)

    return callback


def log_options() -> list[click.Parameter]:
    """``--log-level``, ``-v``, ``-q``: on every command (log lines go to stderr)."""
    return [
        click.Option(
            ["--log-level"],
            type=click.Choice(logs.LEVELS, case_sensitive=False),
            expose_value=False,
            callback=_set_level,
            help="Log level (else logging.level of the config for run and serve, warning otherwise).",
        ),
        click.Option(
            ["-v", "--verbose"],
            count=True,
            expose_value=False,
            callback=_shift(-1),
            help="More log output (repeatable: -vv).",
        ),
        click.Option(
            ["-q", "--quiet"],
            count=True,
            expose_value=False,
            callback=_shift(1),
            help="Less log output (repeatable).",
        ),
    ]


@contextlib.contextmanager
def _exit_codes() -> Iterator[None]:
    """click's errors with cdc's exit codes: a usage error is USAGE (click says 2, which is
    CONFIG here), a declined confirmation or Ctrl-C is INTERRUPTED."""
    try:
        yield
    except click.ClickException as exc:
        # click declares exit_code on the class (2 for a usage error); this instance gets USAGE.
        object.__setattr__(exc, "exit_code", int(ExitCode.USAGE))
        raise
    except (click.Abort, KeyboardInterrupt, EOFError):
        click.echo("Aborted!", err=True)
        raise click.exceptions.Exit(ExitCode.INTERRUPTED) from None


class CdcCommand(click.Command):
    """A ``cdc`` command: the log options, cdc's exit codes, no traceback for odd input."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(log_options())

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        if parent is None:
            logs.reset_cli_verbosity()
        _check_arguments(args)
        with _exit_codes():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _exit_codes():
            logs.configure_logging(logs.cli_level("warning"), "console")
            return super().invoke(ctx)


class CdcGroup(click.Group):
    """A group of ``cdc`` commands (the same behaviour, for its subcommands too)."""

    command_class = CdcCommand

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(log_options())

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        if parent is None:
            logs.reset_cli_verbosity()
        _check_arguments(args)
        with _exit_codes():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _exit_codes():
            return super().invoke(ctx)


CdcGroup.group_class = CdcGroup


def _check_arguments(args: list[str]) -> None:
    """Refuse arguments no command can take: text that is not valid Unicode (the bytes of a
    non-UTF-8 argument reach Python as lone surrogates), a NUL, an absurd length."""
    for arg in args:
        problem = None
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8 text"
        if problem is None and "\x00" in arg:
            problem = "contains a NUL character"
        if problem is None and len(arg) > MAX_ARGUMENT_CHARS:
            problem = f"is longer than {MAX_ARGUMENT_CHARS} characters"
        if problem is not None:
            # the bytes as given (surrogateescape undoes Python's decoding), escaped, shortened
            try:
                raw = arg[:60].encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # a surrogate that is no escaped byte
                raw = arg[:60].encode("utf-8", "backslashreplace")
            shown = "".join(chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in raw)
            shown += "..." if len(arg) > 60 else ""
            click.echo(f"error: the argument '{shown}' {problem}", err=True)
            sys.exit(ExitCode.USAGE)


# ============================================================================ the connections


def connection_options(
    *, source: bool = False, store: bool = False, schema: bool = False
) -> Callable[[F], F]:
    """``--config`` and, as asked, ``--source DSN``, ``--store DSN``, ``--schema NAME``: one
    spelling and one resolution (:func:`load`) for every command that connects."""
    options = [
        click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
                     help="YAML config file (else CDC_CONFIG)."),
    ]  # fmt: skip
    if source:
        options.append(
            click.option("--source", "source_dsn", metavar="DSN",
                         help="Source database DSN (else CDC_SOURCE_DSN, else source.dsn of the config file).")
        )  # fmt: skip
    if store:
        options.append(
            click.option("--store", "store_dsn", metavar="DSN",
                         help="History store DSN (else CDC_STORE_DSN, else store.dsn of the config file).")
        )  # fmt: skip
    if schema:
        options.append(
            click.option("--schema", "store_schema", metavar="NAME",
                         help="Schema of the history store (else store.schema of the config, else cdc_history).")
        )  # fmt: skip

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def load(
    config_path: str | None,
    source: str | None = None,
    store: str | None = None,
    *,
    schema: str | None = None,
) -> Config:
    """The config: ``--source``/``--store``/``--schema`` over the environment over the config
    file (``--config``, else ``CDC_CONFIG``) over the defaults."""
    if config_path is not None and not config_path.strip():
        raise UsageError("--config: an empty path (leave the option out for no config file)")
    for option, value in (("--source", source), ("--store", store), ("--schema", schema)):
        if value is not None and not value.strip():
            raise UsageError(f"{option}: empty (leave the option out to use the environment or the config)")
    env = dict(os.environ)
    if source:
        env["CDC_SOURCE_DSN"] = source
    if store:
        env["CDC_STORE_DSN"] = store
    if schema:
        env["CDC_STORE__SCHEMA"] = schema
    return load_config(config_path, env=env)
