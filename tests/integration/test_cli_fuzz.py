"""Hostile arguments for every command of the CLI: never a traceback, always one clear error and
an exit code of cdc/exit_codes.py.

Every option that takes a value and every positional argument of every command gets each
hostile value in turn (click's CliRunner, a real seeded store), the rest of the command line
being valid; a few real processes get what only a shell can pass (bytes that are not UTF-8).
Commands that would run for good with a valid command line (the daemon, the server, the demo)
are fed only what makes them stop at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner, Result

from cdc.cli import main
from cdc.devdb import LocalPostgres
from cdc.exit_codes import ExitCode
from tests.store_builder import StoreBuilder, build_seed_000

HOSTILE = [
    "",
    " ",
    "-",
    "--",
    "0",
    "-1",
    "99999999999999999999",
    "-99999999999999999999",
    "1e308",
    "nan",
    "inf",
    "0001-01-01",
    "0000-00-00",
    "9999-12-31T23:59:59-14:00",
    "2026-02-30",
    "999999999d",
    "P99999999999D",
    "x/y",
    "FFFFFFFF/FFFFFFFF",
    "FFFFFFFFF/0",
    "a\x00b",
    "\udcff\udcfe",  # bytes that are not UTF-8, as Python decodes them from argv
    "\ud800",
    "'; DROP TABLE users; --",
    '{"id": ',
    '{"id": 1e999}',
    '{"id": {"a": [1, 2]}}',
    "[]",
    "null",
    "{}",
    '"."."',
    "a.b.c.d",
    "public.",
    "\u202eevil",
    "😀" * 3,
    "%s%n%x",
    "../../../../etc/passwd",
    "x" * 5000,
    "x" * 20000,
]

#: A valid command line per command: positional arguments, options (a value is put in place of one).
BASE: dict[tuple[str, ...], tuple[list[str], dict[str, str]]] = {
    ("state", "history"): (["users"], {"--id": "42", "--since": "24h", "--limit": "10"}),
    ("state", "blame"): (["users"], {"--id": "42"}),
    ("state", "at"): (["users"], {"--id": "42", "--version": "1/0"}),
    ("why",): (["550e8400"], {}),
    ("revert",): (["550e8400"], {}),
    ("restore",): (["users"], {"--id": "42", "--version": "1/0"}),
    ("prune",): ([], {"--as-of": "2026-03-11T00:00:00+00:00"}),
    ("erase",): (["users"], {"--id": "42"}),
}
#: Commands that keep running when their command line is valid (or change the source): only the
#: options that stop them at once are fuzzed (a DSN that cannot be reached is no such option for
#: `run`, which retries).
ONLY: dict[tuple[str, ...], set[str]] = {
    ("run",): {"--config", "--log-level"},
    ("serve",): {"--config", "--listen", "--log-level"},
    ("demo",): {"--log-level"},
    ("setup",): {"--config", "--log-level"},
    ("teardown",): {"--config", "--log-level"},
}
#: Flags added to every run of a command (never a prompt, never a change).
ALWAYS: dict[tuple[str, ...], list[str]] = {("erase",): ["--yes"], ("prune",): ["--dry-run"]}
ALLOWED = {int(code) for code in ExitCode} - {ExitCode.UNEXPECTED}


def _commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    for name, command in sorted(group.commands.items()):
        path = (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, path)
        else:
            yield path, command


def _cases() -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """(command path, argv) with one hostile value each."""
    for path, command in _commands(main):
        positionals, options = BASE.get(path, ([], {}))
        only = ONLY.get(path)
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        for param in command.params:
            if isinstance(param, click.Option) and (param.is_flag or param.count):
                continue
            if only is not None and not (isinstance(param, click.Option) and set(param.opts) & only):
                continue
            for value in HOSTILE:
                args, opts = list(positionals), {k: [v] for k, v in options.items()}
                if isinstance(param, click.Argument):
                    index = arguments.index(param)
                    args[index : index + 1] = [value]
                else:
                    opts[param.opts[0]] = [value] * max(1, param.nargs)
                flat = [item for name, values in opts.items() for item in (name, *values)]
                yield path, [*args, *flat, *ALWAYS.get(path, [])]


@pytest.fixture(scope="module")
def store(pg: LocalPostgres) -> Iterator[StoreBuilder]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    build_seed_000(b)
    b.finish(baseline=0x1_0000_0000)
    yield b
    b.close()
    pg.drop_database(name)


def _check(result: Result, what: str) -> None:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, f"{what}:\n{output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (what, result.exception)
    assert result.exit_code in ALLOWED | {0}, (what, result.exit_code, output[-500:])
    if result.exit_code == ExitCode.UNHEALTHY:  # cdc status reports on stdout
        assert result.stdout.lstrip().startswith(("health", "{")), (what, result.stdout[-500:])
    elif result.exit_code != 0:
        lines = result.stderr.splitlines()
        assert any(line.startswith(("error: ", "Error: ", "Aborted!")) for line in lines), (
            what,
            result.stderr[-500:],
        )


def test_hostile_arguments_to_every_command(store: StoreBuilder) -> None:
    # The source is the store's database: the erase and revert checks reach a real server, and no
    # slot or publication of the configured names exists there.
    env: dict[str, str | None] = {
        "CDC_STORE_DSN": store.dsn,
        "CDC_SOURCE_DSN": store.dsn,
        "CDC_CONFIG": None,
        "CDC_SOURCE__SLOT": "fuzz_no_such_slot",
        "CDC_SOURCE__PUBLICATION": "fuzz_no_such_pub",
        "CDC_SERVER__TOKEN": None,
        "TZ": "UTC",
    }
    runner = CliRunner()
    seen: set[tuple[str, ...]] = set()
    count = 0
    for path, args in _cases():
        result = runner.invoke(main, [*path, *args], env=env, input="n\n")
        _check(result, repr([*path, *args])[:300])
        seen.add(path)
        count += 1
    assert seen == {path for path, _ in _commands(main)}
    assert count > 1000


SHELL_CASES: list[list[bytes]] = [
    [b"why", b"\xff\xfe"],
    [b"state", b"history", b"--request", b"\xff"],
    [b"state", b"history", b"users", b"--id", b"\xc3\x28"],
    [b"state", b"at", b"users", b"--id", b"1", b"--at", b"0001-01-01"],
    [b"state", b"history", b"users", b"--id", b"1", b"--since", b"0001-01-01"],
    [b"state", b"history", b"users", b"--limit", b"99999999999999999999"],
    [b"state", b"at", b"users", b"--id", b"1", b"--version", b"99999999999999999999"],
    [b"status", b"--format", b"\xff"],
    [b"--log-level", b"loud", b"status"],
    [b"no-such-command"],
]


@pytest.mark.parametrize("argv", SHELL_CASES, ids=lambda a: b" ".join(a).decode("ascii", "backslashreplace"))
def test_hostile_arguments_in_a_real_process(store: StoreBuilder, argv: list[bytes]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update({"CDC_STORE_DSN": store.dsn, "CDC_SOURCE_DSN": store.dsn, "LC_ALL": "C.UTF-8"})
    result = subprocess.run(
        [sys.executable.encode(), b"-m", b"cdc", *argv],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert b"Traceback" not in result.stdout + result.stderr, stderr
    assert result.returncode in ALLOWED, (result.returncode, stderr)
    assert any(line.startswith(("error: ", "Error: ")) for line in stderr.splitlines()), stderr
