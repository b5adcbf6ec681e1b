"""The command line's surface, without a server: exit codes declared once and documented, clean
help text, the same logging and connection options everywhere, completion, packaging."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cdc import __version__, logs
from cdc.cli import main
from cdc.errors import CdcError
from cdc.exit_codes import DAEMON_CODES, MEANINGS, ExitCode

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

#: Commands that connect to the source (--source) or the store (--store).
CONNECTS_SOURCE = {"run", "setup", "teardown", "status", "revert", "restore", "erase", "serve"}
CONNECTS_STORE = {"run", "setup", "teardown", "status", "revert", "restore", "erase", "prune", "serve", "why"}
CONNECTS_STORE |= {"history", "blame", "at"}


def commands(
    group: click.Group = main, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield prefix, group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_exit_code_has_one_meaning_in_the_readme_table() -> None:
    rows = dict(re.findall(r"^\| `(\d+)` \| (.+?) \|$", README, re.M))
    assert {int(code) for code in rows} == {int(code) for code in ExitCode}
    for code, meaning in MEANINGS.items():
        assert rows[str(int(code))] == meaning, code
    assert set(DAEMON_CODES) <= set(ExitCode)


def test_every_error_class_uses_a_declared_code() -> None:
    pending: list[type[CdcError]] = [CdcError]
    while pending:
        cls = pending.pop()
        assert cls.exit_code in set(ExitCode), cls
        pending.extend(cls.__subclasses__())


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=lambda p: " ".join(p) or "cdc")
def test_help_is_clean_and_offers_the_common_options(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    text = result.output
    for markup in ("``", ":class:", ":func:", ":meth:", "\\b"):
        assert markup not in text, f"{markup!r} in `cdc {' '.join(path)} --help`"
    assert not re.search(r"^\s*\.\. \w+::", text, re.M), f"a directive in `cdc {' '.join(path)} --help`"
    assert "--log-level" in text and "-v, --verbose" in text and "-q, --quiet" in text
    name = path[-1] if path else ""
    if name in CONNECTS_SOURCE:
        assert "--source DSN" in text
    if name in CONNECTS_STORE:
        assert "--store DSN" in text
    if name in CONNECTS_SOURCE | CONNECTS_STORE:
        assert "--config FILE" in text


def test_usage_errors_exit_with_usage_not_config() -> None:
    runner = CliRunner()
    for argv in (["no-such-command"], ["state", "history", "--nope"], ["status", "--format", "xml"]):
        result = runner.invoke(main, argv)
        assert result.exit_code == ExitCode.USAGE, (argv, result.output)
        assert "Error:" in result.stderr and "Traceback" not in result.output


def test_run_takes_the_dsn_options_of_every_command() -> None:
    env = {"CDC_SOURCE_DSN": None, "CDC_STORE_DSN": None, "CDC_CONFIG": None}
    result = CliRunner().invoke(main, ["run", "--source", "host=127.0.0.1 port=1"], env=env)
    assert result.exit_code == ExitCode.CONFIG
    assert "no history store given: pass --store DSN" in result.stderr  # the source was taken
    result = CliRunner().invoke(main, ["run", "--store", "host=127.0.0.1 port=1"], env=env)
    assert (
        result.exit_code == ExitCode.CONFIG and "no source database given: pass --source DSN" in result.stderr
    )


def test_log_level_options_move_the_level() -> None:
    runner = CliRunner()
    seen: list[str] = []

    @main.command("probe-level", hidden=True)
    def probe() -> None:
        seen.append(logs.cli_level("warning"))

    try:
        for argv, level in (
            ([], "warning"),
            (["-v"], "info"),
            (["-vv"], "debug"),
            (["-vvvv"], "debug"),
            (["-q"], "error"),
            (["--log-level", "INFO", "-q"], "info"),  # an explicit level wins
        ):
            result = runner.invoke(main, ["probe-level", *argv])
            assert result.exit_code == 0, result.output
            assert seen.pop() == level, argv
        result = runner.invoke(main, ["-v", "probe-level"])  # on the group too
        assert seen.pop() == "info"
    finally:
        main.commands.pop("probe-level")


def test_shell_completion_is_documented_and_works() -> None:
    assert "_CDC_COMPLETE=bash_source cdc" in README
    result = CliRunner().invoke(
        main,
        [],
        env={"_CDC_COMPLETE": "bash_complete", "COMP_WORDS": "cdc sta", "COMP_CWORD": "1"},
        prog_name="cdc",
    )
    assert "state" in result.output and "status" in result.output


def test_packaging() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] != "cdc"  # taken on PyPI by another project
    assert project["scripts"] == {"cdc": "cdc.cli:main"}
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert "version" in project["dynamic"] and __version__
    declared = {re.split(r"[\[<>=~!; ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    imports = {"psycopg[binary]": "psycopg", "prometheus-client": "prometheus_client", "pyyaml": "yaml"}
    sources = "\n".join(p.read_text() for p in (ROOT / "cdc").rglob("*.py"))
    for dist in declared:
        module = imports.get(dist, dist.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {module}\b", sources, re.M), (
            f"{dist} is declared but never imported"
        )
