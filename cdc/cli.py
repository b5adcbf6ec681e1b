"""The `cdc` command: daemon, setup and the readers. A thin shell over the library.

Every CdcError becomes one line on stderr and its exit code; nothing prints a
traceback for bad input or an unreachable server.

The commands defined here import what they run when they run (the daemon, setup, backfill,
status, the demo: about 0.1 s more for every `cdc --help` and shell completion otherwise).
"""

from __future__ import annotations

import json
import sys

import click
import structlog

from cdc import __version__
from cdc.cli_errors import CdcGroup, connection_options, fail, load
from cdc.cli_readers import state, why
from cdc.cli_retention import erase, prune
from cdc.cli_revert import restore, revert
from cdc.cli_schema import schema as _schema  # noqa: F401 - registers `cdc state schema`
from cdc.config import Config
from cdc.errors import CdcError, UnavailableError
from cdc.exit_codes import ExitCode, help_text
from cdc.logs import cli_level, configure_logging
from cdc.web.serve import serve

EPILOG = f"""\b
Exit codes (the same for every command):
{help_text()}
"""


@click.group(cls=CdcGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="cdc")
def main() -> None:
    """Change-data capture for PostgreSQL: every row change, its before/after and its request."""


@main.command()
@connection_options(source=True, store=True)
@click.option("--no-http", is_flag=True, help="Do not serve /metrics, /healthz and /readyz.")
def run(config_path: str | None, source_dsn: str | None, store_dsn: str | None, no_http: bool) -> None:
    """Run the capture daemon (SIGTERM stops it cleanly, SIGHUP reloads the config).

    Serves /metrics, /healthz and /readyz on server.listen (default 127.0.0.1:8400).
    Exit codes: 0 stopped, 1 unexpected, 2 config, 3 protocol, 4 setup, 5 slot lost,
    9 the listen address is taken.
    """
    from cdc.daemon import Daemon  # when it runs (the module docstring)

    def configured() -> Config:
        """The config, its log level moved by --log-level/-v/-q (also on SIGHUP)."""
        config = load(config_path, source_dsn, store_dsn)
        logging = config.logging.model_copy(update={"level": cli_level(config.logging.level)})
        return config.model_copy(update={"logging": logging})

    try:
        config = configured()
        config.require_source()
        config.require_store()
    except CdcError as exc:
        fail(exc)
    configure_logging(config.logging.level, config.logging.format)
    daemon = Daemon(config, config_path=config_path, reload=configured)
    daemon.install_signal_handlers()
    endpoints = None
    if not no_http:
        from cdc.health import HealthServer  # when it runs

        try:
            endpoints = HealthServer(
                config.server.host, config.server.port, daemon.metrics.registry, daemon.health, daemon.ready
            ).start()
        except OSError as exc:
            fail(
                UnavailableError(
                    f"cannot listen on {config.server.listen} for /metrics and /healthz: {exc}",
                    hint="set server.listen (CDC_SERVER__LISTEN) or pass --no-http",
                )
            )
    if endpoints is not None:
        structlog.get_logger("cdc.daemon").info(
            "http_listening", host=config.server.host, port=endpoints.port, paths="/metrics /healthz /readyz"
        )
    code = daemon.run()
    if endpoints is not None:
        endpoints.stop()
    sys.exit(code)


def _print_report(steps: list[str], warnings: list[str]) -> None:
    for step in steps:
        click.echo(f"ok    {step}")
    for warning in warnings:
        click.echo(f"warn  {warning}", err=True)


@main.command()
@connection_options(source=True, store=True)
@click.option("--recreate-slot", is_flag=True, help="Create a lost slot again; the history records a gap.")
@click.option("--drop-v1", is_flag=True, help="Drop the format-1 tables (*_v1) a store migration kept.")
@click.option(
    "--rotate-context-key",
    is_flag=True,
    help="Only replace the key that signs context messages (the previous one stays accepted; the daemon "
    "may keep running; docs/security.md).",
)
def setup(
    config_path: str | None,
    source_dsn: str | None,
    store_dsn: str | None,
    recreate_slot: bool,
    drop_v1: bool,
    rotate_context_key: bool,
) -> None:
    """Check the source and create publication, slot, context trigger and store schema.

    A store of format 1 is migrated to format 2 first (docs/store.md)."""
    from cdc.progress import Progress  # when it runs (the module docstring)
    from cdc.setup import setup as do_setup

    # Progress: a bar on a terminal, else log lines (info) for the baseline and backfills.
    configure_logging("warning" if sys.stderr.isatty() else "info", "console")
    try:
        with Progress("baseline") as progress:
            report = do_setup(
                load(config_path, source_dsn, store_dsn),
                recreate_slot=recreate_slot,
                drop_v1=drop_v1,
                rotate_context_key=rotate_context_key,
                progress=progress,
            )
    except CdcError as exc:
        fail(exc)
    except KeyboardInterrupt:
        click.echo(
            "interrupted: nothing of an unfinished baseline is visible; `cdc setup` starts it again", err=True
        )
        sys.exit(ExitCode.INTERRUPTED)
    _print_report(report.steps, report.warnings)


@main.command()
@connection_options(source=True, store=True)
@click.argument("tables", nargs=-1)
@click.option(
    "--restart", is_flag=True, help="Start over where a backfill was interrupted (else it resumes)."
)
def backfill(
    config_path: str | None,
    source_dsn: str | None,
    store_dsn: str | None,
    tables: tuple[str, ...],
    restart: bool,
) -> None:
    """Record the existing rows of tables that joined capture, while `cdc run` captures.

    Without TABLE: every published table whose rows are not all in the history, and every table
    a rewrite too large to record left inexact (docs/ddl.md). Chunk by chunk between two
    watermarks (docs/baseline.md); interrupted, it resumes where it stopped."""
    from cdc.backfill import run_backfill  # when it runs (the module docstring)
    from cdc.progress import Progress

    configure_logging("warning" if sys.stderr.isatty() else "info", "console")
    try:
        with Progress("backfill") as progress:
            done = run_backfill(
                load(config_path, source_dsn, store_dsn),
                list(tables),
                progress,
                restart=restart,
                on_notice=lambda text: click.echo(f"note  {text}", err=True),
            )
    except CdcError as exc:
        fail(exc)
    except KeyboardInterrupt:
        click.echo("interrupted: `cdc backfill` resumes where it stopped", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    if not done:
        click.echo("ok    nothing to backfill: every captured table's rows are in the history")
    for name, rows in done.items():
        click.echo(f"ok    {name}: {rows:,} rows")


@main.command()
@connection_options(source=True, store=True)
@click.option("--drop-history", is_flag=True, help="Also drop the history store schema.")
def teardown(
    config_path: str | None, source_dsn: str | None, store_dsn: str | None, drop_history: bool
) -> None:
    """Drop slot, publication and context trigger (and the history with --drop-history)."""
    from cdc.setup import teardown as do_teardown  # when it runs

    try:
        report = do_teardown(load(config_path, source_dsn, store_dsn), drop_history=drop_history)
    except CdcError as exc:
        fail(exc)
    _print_report(report.steps, report.warnings)


@main.command()
@connection_options(source=True, store=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status(config_path: str | None, source_dsn: str | None, store_dsn: str | None, fmt: str) -> None:
    """Slot, daemon, lag, LSNs, stored version range, retention and the daemon's last error.

    Exits 0 when capture is healthy: a daemon streams from the slot, the baseline is complete
    and the lag is below capture.max_lag_bytes and capture.max_lag_seconds; else 10 (and 2
    for a configuration error).
    """
    from cdc.status import collect_status, print_status  # when it runs

    try:
        config = load(config_path, source_dsn, store_dsn)
    except CdcError as exc:
        fail(exc)
    result = collect_status(config)
    if fmt == "json":
        click.echo(json.dumps(result.as_json(), indent=2, default=str))
    else:
        print_status(result)
    sys.exit(ExitCode.OK if result.healthy else ExitCode.UNHEALTHY)


@main.command()
@click.option("--keep", is_flag=True, help="Leave the demo server running and print how to reach it.")
def demo(keep: bool) -> None:
    """Start a throwaway PostgreSQL, capture sample traffic with request ids, show the history."""
    from cdc.demo import run_demo  # when it runs (the demo: only from a checkout)

    try:
        run_demo(main, keep=keep)
    except CdcError as exc:
        fail(exc)


for command in (state, why, revert, restore, serve, prune, erase):
    main.add_command(command)

__all__ = ["json", "main"]
