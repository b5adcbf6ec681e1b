"""``cdc serve``: the HTTP API, the pages and ``/metrics`` over the history store, with uvicorn.

The store comes from ``--store``, else ``CDC_STORE_DSN``, else ``store.dsn`` of the config file;
the source (optional: only the read-only undo previews read it) from ``--source``, else
``CDC_SOURCE_DSN``, else ``source.dsn``; the address from ``--listen``, else ``server.listen``
(``127.0.0.1:8400``); the token from ``--token``, else ``server.token`` / ``CDC_SERVER__TOKEN`` (prefer these: a command-line token is
visible to every user of the machine). Without a token, ``--open`` (or ``server.open: true``)
must say that unauthenticated access is intended; on a non-loopback address that prints a warning.

Errors are one line on stderr (``error: ...``) and a non-zero exit code.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import click
import structlog
from pydantic import ValidationError

from cdc.cli_errors import CdcCommand, connection_options, load
from cdc.config import ServerConfig
from cdc.errors import CdcError, ConfigError
from cdc.exit_codes import ExitCode
from cdc.logs import cli_level, configure_logging
from cdc.query import Store
from cdc.web.api import create_app

__all__ = ["bind_socket", "serve"]

log = structlog.get_logger("cdc.web")


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 literals too); OSError when it cannot bind."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family = infos[0][0]
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.set_inheritable(True)
    return sock


@click.command(cls=CdcCommand)
@connection_options(source=True, store=True, schema=True)
@click.option(
    "--listen", metavar="HOST:PORT", help="Address to listen on (else server.listen, 127.0.0.1:8400)."
)
@click.option(
    "--token",
    metavar="TOKEN",
    help="Bearer token required on the API and pages (else server.token / CDC_SERVER__TOKEN).",
)
@click.option(
    "--open",
    "open_access",
    is_flag=True,
    help="Allow serving without a token (anyone who can connect reads the history).",
)
def serve(
    *,
    source_dsn: str | None,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    listen: str | None,
    token: str | None,
    open_access: bool,
) -> None:
    """Serve the HTTP API (/api/v1/, /openapi.json), the mutation pages, /metrics, /healthz, /readyz.

    \b
    With a source (--source, CDC_SOURCE_DSN, source.dsn) the request and row pages preview
    `cdc revert` and `cdc restore` (read only: applying stays a command).

    \b
      CDC_SERVER__TOKEN=... cdc serve --listen 0.0.0.0:8400
      cdc serve --open                      # loopback only, no token
    /healthz, /readyz and /metrics need no token.
    """
    try:
        config = load(config_path, source=source_dsn, store=store_dsn, schema=store_schema)
        server = ServerConfig.model_validate(
            {
                "listen": listen if listen is not None else config.server.listen,
                "token": token if token is not None else config.server.token,
                "open": open_access or config.server.open,
            }
        )
        dsn = config.store.dsn.get_secret_value() if config.store.dsn is not None else None
        schema = config.store.schema_name
        secret = server.token.get_secret_value() if server.token is not None else None
        app = create_app(
            dsn or "",
            schema=schema,
            token=secret,
            open_access=server.open,
            source_dsn=config.require_source() if config.source.dsn is not None else None,
            policies=config.columns,
            hash_key=config.policies.hash_key_bytes(),
        )
    except ValidationError as exc:
        problems = [
            f"server.{'.'.join(str(p) for p in e['loc'])}: {str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        ]
        _fail("; ".join(problems), ConfigError.exit_code)
        return
    except ConfigError as exc:
        _fail("; ".join(" ".join(p.split()) for p in exc.problems), exc.exit_code)
        return
    except CdcError as exc:
        message = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        _fail(" ".join(message.split()), exc.exit_code)
        return

    configure_logging(cli_level(config.logging.level), config.logging.format)
    if secret is None and not server.is_loopback:
        click.echo(
            f"warning: serving without a token on {server.listen}, which is not a loopback address: "
            "anyone who can connect reads the whole history (set server.token / CDC_SERVER__TOKEN)",
            err=True,
        )
    _probe_store(dsn or "", schema)
    try:
        sock = bind_socket(server.host, server.port)
    except OSError as exc:
        _fail(f"cannot listen on {server.listen}: {exc.strerror or exc}", ExitCode.UNAVAILABLE)
        return
    run_server(app, sock, listen=server.listen, secured=secret is not None)


def _probe_store(dsn: str, schema: str) -> None:
    """Say at startup when the store cannot be read (serving goes on: /readyz reports it)."""
    try:
        with Store(dsn, schema=schema) as store:
            store.current_version()
    except CdcError as exc:
        click.echo(
            f"warning: {exc.message} (serving anyway; /readyz answers 503 until it can be read)", err=True
        )


def run_server(app: Any, sock: socket.socket, *, listen: str, secured: bool) -> None:
    """Run uvicorn on an already bound socket until SIGINT/SIGTERM."""
    import uvicorn  # only `cdc serve` runs it: kept out of every other command's start-up

    config = uvicorn.Config(
        app,
        access_log=False,  # our middleware logs requests without paths (keys) or query strings (tokens)
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after a graceful stop; we exit 0 instead (handlers below)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    server = Server(config)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, server.handle_exit)  # first: graceful stop; a second SIGINT: force
    log.info("serving", listen=listen, url=f"http://{listen}/", token_required=secured)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("stopped", listen=listen)
