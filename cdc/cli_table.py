"""Label/value tables of the command line (``cdc status``, ``cdc prune``), laid out by rich.

Plain text only: no colour, no markup read from the values (a value is never interpreted), no
line wrapping (a long DSN or error stays on one line for grep), no trailing blanks; columns by
display width (wide characters align).
"""

from __future__ import annotations

from collections.abc import Sequence

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

#: Wide enough that no row is ever wrapped.
_WIDTH = 100_000


def table_text(rows: Sequence[tuple[str, str]], *, indent: int = 2) -> str:
    """``rows`` as aligned lines: the labels in a column, then the values."""
    grid = Table.grid(padding=(0, 2), pad_edge=False)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    for label, value in rows:
        grid.add_row(Text(label), Text(value))
    console = Console(
        width=_WIDTH, color_system=None, highlight=False, markup=False, emoji=False, force_terminal=False
    )
    with console.capture() as captured:
        console.print(grid)
    prefix = " " * indent
    return "\n".join(prefix + line.rstrip() for line in captured.get().splitlines())


def echo_table(rows: Sequence[tuple[str, str]], *, indent: int = 2) -> None:
    if rows:
        click.echo(table_text(rows, indent=indent))


__all__ = ["echo_table", "table_text"]
