"""structlog setup: JSON lines in production, a console renderer on a terminal.

The level comes from the config (``logging.level``: the daemon and ``cdc serve``) or is
``warning`` (the one-shot commands), and the command line moves it: ``--log-level LEVEL``
replaces it, each ``-v`` lowers it one step (more output), each ``-q`` raises it one step.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import structlog

#: The levels, most verbose first (``logging.level`` of the config takes these too).
LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass
class _Verbosity:
    """What the command line asked for: an explicit level, and the -q count minus the -v count."""

    level: str | None = None
    shift: int = 0


_cli = _Verbosity()


def reset_cli_verbosity() -> None:
    _cli.level, _cli.shift = None, 0


def set_cli_level(level: str) -> None:
    _cli.level = level.lower()


def shift_cli_verbosity(steps: int) -> None:
    """``steps`` > 0: quieter (``-q``); < 0: more verbose (``-v``)."""
    _cli.shift += steps


def cli_level(default: str) -> str:
    """The level to log at: ``--log-level`` if given, else ``default`` moved by ``-v``/``-q``."""
    if _cli.level is not None:
        return _cli.level
    name = "warning" if default.lower() == "warn" else default.lower()
    index = LEVELS.index(name) if name in LEVELS else LEVELS.index("info")
    return LEVELS[max(0, min(len(LEVELS) - 1, index + _cli.shift))]


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
