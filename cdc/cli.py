"""The `cdc` command: daemon, setup and the readers. A thin shell over the library.

Every CdcError becomes one line on stderr and its exit code; nothing prints a
traceback for bad input or an unreachable server.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from cdc import __version__
from cdc.cli_errors import fail, load
from cdc.errors import CdcError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        envvar="CDC_CONFIG",
        type=click.Path(dir_okay=False),
        help="YAML config file (env CDC_CONFIG).",
    )(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cdc")
def main() -> None:
    """Change-data capture for PostgreSQL: every row change, its before/after and its request."""


@main.command()
@config_option
@click.option("--no-http", is_flag=True, help="Do not serve /metrics, /healthz and /readyz.")
def run(config_path: str | None, no_http: bool) -> None:
    """Run the capture daemon (SIGTERM stops it cleanly, SIGHUP reloads the config).

    Serves /metrics, /healthz and /readyz on server.listen (default 127.0.0.1:8400).
    Exit codes: 0 stopped, 1 unexpected, 2 config, 3 protocol, 4 setup, 5 slot lost.
    """
    import structlog

    from cdc.daemon import Daemon
    from cdc.logs import configure_logging

    try:
        config = load(config_path)
        config.require_source()
        config.require_store()
    except CdcError as exc:
        fail(exc)
    configure_logging(config.logging.level, config.logging.format)
    daemon = Daemon(config, config_path=config_path)
    daemon.install_signal_handlers()
    endpoints = None
    if not no_http:
        from cdc.health import HealthServer

        try:
            endpoints = HealthServer(
                config.server.host, config.server.port, daemon.metrics.registry, daemon.health, daemon.ready
            ).start()
        except OSError as exc:
            fail(
                UsageError(
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


@main.command()
@config_option
@click.option("--source", help="Source DSN (else CDC_SOURCE_DSN or the config file).")
@click.option("--store", help="Store DSN (else CDC_STORE_DSN or the config file).")
@click.option("--recreate-slot", is_flag=True, help="Create a lost slot again; the history records a gap.")
@click.option("--drop-v1", is_flag=True, help="Drop the format-1 tables (*_v1) a store migration kept.")
def setup(
    config_path: str | None, source: str | None, store: str | None, recreate_slot: bool, drop_v1: bool
) -> None:
    """Check the source and create publication, slot, context trigger and store schema.

    A store of format 1 is migrated to format 2 first (docs/store.md)."""
    from cdc.logs import configure_logging
    from cdc.setup import setup as do_setup

    configure_logging("warning", "console")
    try:
        report = do_setup(load(config_path, source, store), recreate_slot=recreate_slot, drop_v1=drop_v1)
    except CdcError as exc:
        fail(exc)
    for step in report.steps:
        click.echo(f"ok    {step}")
    for warning in report.warnings:
        click.echo(f"warn  {warning}", err=True)


@main.command()
@config_option
@click.option("--source", help="Source DSN.")
@click.option("--store", help="Store DSN.")
@click.option("--drop-history", is_flag=True, help="Also drop the history store schema.")
def teardown(config_path: str | None, source: str | None, store: str | None, drop_history: bool) -> None:
    """Drop slot, publication and context trigger (and the history with --drop-history)."""
    from cdc.logs import configure_logging
    from cdc.setup import teardown as do_teardown

    configure_logging("warning", "console")
    try:
        report = do_teardown(load(config_path, source, store), drop_history=drop_history)
    except CdcError as exc:
        fail(exc)
    for step in report.steps:
        click.echo(f"ok    {step}")


@main.command()
@config_option
@click.option("--source", help="Source DSN.")
@click.option("--store", help="Store DSN.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def status(config_path: str | None, source: str | None, store: str | None, fmt: str) -> None:
    """Slot, lag, LSNs, stored version range, retention and the daemon's last error.

    Exits 0 when the slot is healthy, 1 otherwise.
    """
    from cdc.status import collect_status, render_status

    try:
        config = load(config_path, source, store)
    except CdcError as exc:
        fail(exc)
    result = collect_status(config)
    if fmt == "json":
        click.echo(json.dumps(result.as_json(), indent=2, default=str))
    else:
        width = max(len(label) for label, _ in render_status(result))
        for label, value in render_status(result):
            click.echo(f"  {label:<{width}}  {value}")
    sys.exit(0 if result.healthy else 1)


@main.command()
@click.option("--keep", is_flag=True, help="Leave the demo server running and print how to reach it.")
def demo(keep: bool) -> None:
    """Start a throwaway PostgreSQL, capture sample traffic with request ids, show the history."""
    from cdc.demo import run_demo

    try:
        run_demo(keep=keep)
    except CdcError as exc:
        fail(exc)


def _add_commands() -> None:
    from cdc.cli_readers import state, why
    from cdc.cli_retention import erase, prune
    from cdc.cli_revert import restore, revert
    from cdc.cli_schema import schema as _schema  # noqa: F401 - registers `cdc state schema`
    from cdc.web.serve import serve

    for command in (state, why, revert, restore, serve, prune, erase):
        main.add_command(command)


_add_commands()

__all__ = ["json", "main"]
