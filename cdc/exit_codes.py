"""The exit codes of every ``cdc`` command: each code has one meaning, whatever the command.

This module is where they are declared; the error classes (cdc/errors.py) carry them, the
command line (cdc/cli_errors.py) turns click's own errors into them, and the README's table is
checked against :data:`MEANINGS` by the tests. ``cdc run`` keeps the codes it always had
(0, 1, 2, 3, 4, 5); a supervisor restarts it on any code but ``CONFIG`` and ``SLOT_LOST``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    CONFIG = 2
    PROTOCOL = 3
    SETUP = 4
    SLOT_LOST = 5
    USAGE = 6
    NOT_FOUND = 7
    REFUSED = 8
    UNAVAILABLE = 9
    UNHEALTHY = 10
    INTERRUPTED = 130


#: The codes ``cdc run`` exits with (deploy/README.md, the systemd unit).
DAEMON_CODES = (
    ExitCode.OK,
    ExitCode.UNEXPECTED,
    ExitCode.CONFIG,
    ExitCode.PROTOCOL,
    ExitCode.SETUP,
    ExitCode.SLOT_LOST,
    ExitCode.UNAVAILABLE,
)
#: The daemon's codes a restart cannot help with: a human must act.
NO_RESTART = (ExitCode.CONFIG, ExitCode.SLOT_LOST)

#: What each code means, for the README and ``cdc --help``.
MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success (`cdc run`: stopped by SIGTERM/SIGINT after a clean flush)",
    ExitCode.UNEXPECTED: "unexpected error (a bug: please report it)",
    ExitCode.CONFIG: "configuration error: the config file or `CDC_*` variables (every wrong key is listed)",
    ExitCode.PROTOCOL: "protocol error: bytes from the server that do not decode",
    ExitCode.SETUP: "setup needed: `wal_level`, role, publication, slot or store schema missing (`cdc setup`)",
    ExitCode.SLOT_LOST: "the replication slot is lost or invalidated (`cdc setup --recreate-slot`)",
    ExitCode.USAGE: "usage error: a bad command, option or argument",
    ExitCode.NOT_FOUND: "not found: no such table, row, request or version in the history",
    ExitCode.REFUSED: "refused to protect data: revert conflicts, a row still on the source (`--force`)",
    ExitCode.UNAVAILABLE: "unavailable: a server cannot be reached, or refused a statement; retrying may help",
    ExitCode.UNHEALTHY: "`cdc status`: capture is not healthy (no daemon streaming, lag, slot, baseline)",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C), or a confirmation was declined",
}


def help_text() -> str:
    """The table as plain text lines (``cdc --help`` epilog)."""
    return "\n".join(f"  {int(code):>3}  {MEANINGS[code].replace('`', '')}" for code in ExitCode)


__all__ = ["DAEMON_CODES", "MEANINGS", "NO_RESTART", "ExitCode", "help_text"]
