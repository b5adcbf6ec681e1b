"""Tests of cdc.config: sources and their priority, error reporting, parsing, redaction."""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path

import pydantic
import pytest
import yaml
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from cdc.config import (
    Config,
    format_duration,
    format_size,
    format_table,
    load_config,
    normalize_table,
    parse_duration,
    parse_size,
    redact_dsn,
)
from cdc.errors import ConfigError, UsageError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "cdc.example.yaml"
DSNS = {"CDC_SOURCE_DSN": "postgresql://cdc@src/app", "CDC_STORE_DSN": "host=store dbname=hist"}
SECRET = "hunter2-s3cret"
HASH_KEY = "0123456789abcdef-hash-key"


def write(tmp_path: Path, text: str, name: str = "cdc.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return info.value.problems


# ----------------------------------------------------------------- sources and priority


def test_defaults_with_only_the_two_dsns() -> None:
    config = load_config(env=DSNS)
    assert config.require_source() == "postgresql://cdc@src/app"
    assert config.require_store() == "host=store dbname=hist"
    assert config.source.slot == "cdc"
    assert config.source.publication == "cdc"
    assert config.source.tables == ()
    assert config.source.stream_in_progress == "auto"
    assert config.source.connect_timeout_seconds == 10
    assert config.store.schema_name == "cdc_history"
    assert config.capture.batch_max_rows == 5000
    assert config.capture.batch_max_seconds == pytest.approx(0.2)
    assert config.capture.status_interval_seconds == 10
    assert config.capture.memory_limit_bytes == 64 * 1024 * 1024
    assert config.capture.spill_dir is None
    assert config.capture.heartbeat_interval_seconds == 60
    assert config.capture.max_lag_bytes == 1024**3
    assert config.context.regex.fullmatch("req:abc-1")
    assert config.context.settings_prefix == "cdc"
    assert config.retention.default == timedelta(days=7)
    assert config.retention.tables == {}
    assert config.retention.partition_interval == timedelta(days=1)
    assert config.retention.prune_interval == timedelta(hours=1)
    assert config.retention.keyframe_on_prune is True
    assert config.columns == {}
    assert (config.server.host, config.server.port, config.server.is_loopback) == ("127.0.0.1", 8400, True)
    assert config.server.token is None
    assert config.server.open is False
    assert (config.logging.level, config.logging.format) == ("info", "auto")
    assert config.reconnect.initial_backoff_seconds == 0.5
    assert config.reconnect.max_backoff_seconds == 30


def test_no_file_and_no_dsn_loads_but_require_fails() -> None:
    config = load_config(env={})
    for require, variable in (
        (config.require_source, "CDC_SOURCE_DSN"),
        (config.require_store, "CDC_STORE_DSN"),
    ):
        with pytest.raises(ConfigError) as info:
            require()
        assert len(info.value.problems) == 1
        assert f"set {variable}, or" in info.value.problems[0]
        assert "in the config file" in info.value.problems[0]


def test_config_is_frozen() -> None:
    config = load_config(env=DSNS)
    with pytest.raises(pydantic.ValidationError):
        config.capture.batch_max_rows = 1
    with pytest.raises(pydantic.ValidationError):
        config.source = config.source


def test_env_beats_file_beats_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
source:
  dsn: postgresql://file@src/app
  slot: from_file
capture:
  batch_max_rows: 100
  batch_max_seconds: 1
retention:
  default: 3d
  tables: {audit_log: 30d}
""",
    )
    env = {
        "CDC_SOURCE_DSN": "postgresql://env@src/app",
        "CDC_CAPTURE__BATCH_MAX_ROWS": "7",
        "cdc_retention__tables__events": "2h",  # case-insensitive
        "CDC_LOGGING__LEVEL": "DEBUG",
    }
    config = load_config(path, env=env)
    assert config.require_source() == "postgresql://env@src/app"  # env > file
    assert config.capture.batch_max_rows == 7  # env > file
    assert config.source.slot == "from_file"  # file > default
    assert config.capture.batch_max_seconds == 1.0
    assert config.retention.default == timedelta(days=3)
    assert config.retention.tables == {
        "public.audit_log": timedelta(days=30),
        "public.events": timedelta(hours=2),
    }
    assert config.retention.for_table("AUDIT_LOG") == timedelta(days=30)
    assert config.retention.for_table("other.t") == timedelta(days=3)
    assert config.capture.status_interval_seconds == 10  # default
    assert config.logging.level == "debug"
    assert config.store.dsn is None


def test_file_from_cdc_config_and_explicit_path_wins(tmp_path: Path) -> None:
    by_env = write(tmp_path, "source: {slot: by_env}\n", "env.yaml")
    explicit = write(tmp_path, "source: {slot: explicit}\n", "explicit.yaml")
    assert load_config(env={"CDC_CONFIG": str(by_env)}).source.slot == "by_env"
    assert load_config(explicit, env={"CDC_CONFIG": str(by_env)}).source.slot == "explicit"
    assert load_config(str(explicit), env={}).source.slot == "explicit"


def test_env_values_are_parsed_leniently() -> None:
    env = {
        **DSNS,
        "CDC_CAPTURE__BATCH_MAX_SECONDS": "500ms",
        "CDC_CAPTURE__HEARTBEAT_INTERVAL_SECONDS": "0",
        "CDC_CAPTURE__MEMORY_LIMIT_BYTES": "128MiB",
        "CDC_CAPTURE__MAX_LAG_BYTES": "1048576",
        "CDC_CAPTURE__SPILL_DIR": "/var/tmp/cdc",
        "CDC_SERVER__OPEN": "yes",
        "CDC_SERVER__LISTEN": "[::1]:9000",
        "CDC_RETENTION__KEYFRAME_ON_PRUNE": "false",
        "CDC_SOURCE__STREAM_IN_PROGRESS": "OFF",
        "CDC_STORE__SCHEMA": "hist",
        "CDC_COLUMNS__USERS__EMAIL": "hash",
        "CDC_POLICIES__HASH_KEY": HASH_KEY,
        "CDC_UNRELATED": "ignored",  # not CDC_<SECTION>__<KEY>, not a typo of one
    }
    config = load_config(env=env)
    assert config.capture.batch_max_seconds == pytest.approx(0.5)
    assert config.capture.heartbeat_interval_seconds == 0
    assert config.capture.memory_limit_bytes == 128 * 1024**2
    assert config.capture.max_lag_bytes == 1048576
    assert config.capture.spill_dir == Path("/var/tmp/cdc")
    assert config.server.open is True
    assert (config.server.host, config.server.port, config.server.is_loopback) == ("::1", 9000, True)
    assert config.retention.keyframe_on_prune is False
    assert config.source.stream_in_progress == "off"
    assert config.store.schema_name == "hist"
    assert config.column_policies("public.users") == {"email": "hash"}


def test_env_list_is_comma_separated_and_normalized() -> None:
    env = {**DSNS, "CDC_SOURCE__TABLES": 'public.users, Orders,,billing.Invoices,"A,b".c, users'}
    config = load_config(env=env)
    assert config.source.tables == ("public.users", "public.orders", "billing.invoices", '"A,b".c')
    assert load_config(env={"CDC_SOURCE__TABLES": ""}).source.tables == ()


def test_context_extra_settings_and_emit_none(tmp_path: Path) -> None:
    assert load_config(env={}).context.extra_settings == ("tenant",)
    config = load_config(
        env={"CDC_CONTEXT__EXTRA_SETTINGS": "tenant, Region,region", "CDC_CONTEXT__EMIT_NONE": "false"}
    )
    assert config.context.extra_settings == ("tenant", "region") and config.context.emit_none is False
    path = write(tmp_path, "context:\n  extra_settings: [shard, actor, 'not ok']\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"context.extra_settings (from {path}):") and "reserved" in problem
    (problem,) = problems_of(env={"CDC_CONTEXT__EXTRA_SETTINGS": ",".join(f"s{i}" for i in range(51))})
    assert "at most 50" in problem
    assert load_config(env={"CDC_CONTEXT__EXTRA_SETTINGS": ""}).context.extra_settings == ()


def test_yaml_on_off_booleans_and_empty_sections(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  stream_in_progress: on\nretention:\ncolumns:\n")
    config = load_config(path, env={})
    assert config.source.stream_in_progress == "on"
    assert config.retention == load_config(env={}).retention
    assert config.columns == {}


def test_empty_env_dsn_counts_as_unset() -> None:
    config = load_config(env={"CDC_SOURCE_DSN": "", "CDC_STORE_DSN": "  "})
    assert config.source.dsn is None
    assert config.store.dsn is None


# ----------------------------------------------------------------- errors


def test_every_wrong_key_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
capture:
  batch_max_rows: lots
  memory_limit_bytes: 12XB
logging:
  level: verbose
""",
    )
    problems = problems_of(path)
    assert len(problems) == 3, problems
    assert f"capture.batch_max_rows (from {path}): Input should be a valid integer, got 'lots'" in problems
    assert any(p.startswith(f"capture.memory_limit_bytes (from {path}): invalid size") for p in problems)
    assert any(p.startswith(f"logging.level (from {path}):") and "'verbose'" in p for p in problems)


def test_file_and_env_problems_together_name_their_origin(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  slot: Bad-Slot\n")
    env = {"CDC_RETENTION__DEFAULT": "forever", "CDC_SERVER__LISTEN": "8400"}
    problems = problems_of(path, env)
    assert len(problems) == 3, problems
    assert any(p.startswith(f"source.slot (from {path}):") for p in problems)
    assert any(
        p.startswith("retention.default (from CDC_RETENTION__DEFAULT): invalid duration") for p in problems
    )
    assert any(p.startswith("server.listen (from CDC_SERVER__LISTEN): expected host:port") for p in problems)


def test_missing_file_reported_with_env_problems(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    problems = problems_of(missing, {"CDC_CAPTURE__BATCH_MAX_ROWS": "-1"})
    assert problems[0] == f"{missing}: config file not found"
    assert len(problems) == 2
    assert problems[1].startswith(
        "capture.batch_max_rows (from CDC_CAPTURE__BATCH_MAX_ROWS): Input should be greater"
    )


def test_unknown_keys_are_errors_with_suggestions(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  dns: x\nretension: {}\ncapture:\n  zzzz: 1\n")
    problems = problems_of(path, {"CDC_SOURCE__SOLT": "x"})
    assert f"source.dns (from {path}): unknown key (did you mean 'dsn'?)" in problems
    assert f"retension (from {path}): unknown key (did you mean 'retention'?)" in problems
    assert f"capture.zzzz (from {path}): unknown key" in problems
    assert "source.solt (from CDC_SOURCE__SOLT): unknown key (did you mean 'slot'?)" in problems
    assert len(problems) == 4


def test_single_underscore_typo_in_env_is_reported() -> None:
    problems = problems_of(env={"CDC_CAPTURE_BATCH_MAX_ROWS": "10"})
    assert problems == [
        "CDC_CAPTURE_BATCH_MAX_ROWS: not a config variable (did you mean CDC_CAPTURE__BATCH_MAX_ROWS?)"
    ]


def test_conflicting_env_spellings_are_reported() -> None:
    problems = problems_of(env={"CDC_SOURCE_DSN": "host=a", "CDC_SOURCE__DSN": "host=b"})
    assert len(problems) == 1
    assert "source.dsn: set by both" in problems[0]
    assert "host=a" not in problems[0] and "host=b" not in problems[0]


def test_bad_yaml_reports_line_number(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  slot: cdc\n  publication: [a, b\ncapture:\n  batch_max_rows: 1\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: invalid YAML at line 4")
    assert "line 3" in problems[0]  # where the unclosed flow sequence started

    path = write(tmp_path, "source:\n  slot: cdc\n slot: x\n", "indent.yaml")
    assert problems_of(path)[0].startswith(f"{path}: invalid YAML at line 3")


def test_duplicate_yaml_keys_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  slot: a\n  slot: b\n")
    assert problems_of(path) == [f"{path}: line 3: duplicate key 'slot'"]


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- source\n- store\n")
    problems = problems_of(path)
    assert len(problems) == 1
    assert "top level must be a mapping" in problems[0] and "got list" in problems[0]
    assert load_config(write(tmp_path, "# only comments\n", "empty.yaml"), env={}) == load_config(env={})


def test_regex_without_id_group_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "context:\n  application_name_pattern: 'req:(?P<rid>.+)'\n")
    (problem,) = problems_of(path)
    assert problem.startswith(f"context.application_name_pattern (from {path}):")
    assert 'named group "id"' in problem
    (problem,) = problems_of(env={"CDC_CONTEXT__APPLICATION_NAME_PATTERN": "req:(?P<id>"})
    assert "not a valid regular expression" in problem


def test_value_checks(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
source:
  publication: "1-2"
  tables: [users, "bad name"]
store:
  schema: ""
context:
  settings_prefix: "cdc.x"
retention:
  tables: {audit_log: 0s, public.audit_log: 1d}
columns:
  users: {email: encrypt}
reconnect:
  initial_backoff_seconds: 10
  max_backoff_seconds: 1
""",
    )
    problems = problems_of(path)
    expected_paths = [
        "source.publication",
        "source.tables[1]",
        "store.schema",
        "context.settings_prefix",
        "retention.tables",
        "columns.users.email",
        "reconnect.max_backoff_seconds",
    ]
    assert len(problems) == len(expected_paths), problems
    assert {p.split(" (from ")[0] for p in problems} == set(expected_paths)
    assert all(f" (from {path}): " in p for p in problems)
    assert any("listed twice" in p for p in problems)


def test_policies_for_tables_not_captured_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "source:\n  tables: [users]\ncolumns:\n  user: {password_digest: exclude}\n")
    (problem,) = problems_of(path)
    assert problem == (
        f"columns.user (from {path}): table public.user is not in source.tables"
        " (did you mean 'public.users'?)"
    )
    # with all tables captured there is nothing to check against
    assert load_config(path, env={"CDC_SOURCE__TABLES": ""}).columns == {
        "public.user": {"password_digest": "exclude"}
    }


# ----------------------------------------------------------------- durations, sizes, tables


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("24h", timedelta(hours=24)),
        ("90m", timedelta(minutes=90)),
        ("30s", timedelta(seconds=30)),
        ("500ms", timedelta(milliseconds=500)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(minutes=90)),
        (" 1.5H ", timedelta(minutes=90)),
        ("10", timedelta(seconds=10)),
        ("0.2", timedelta(milliseconds=200)),
        ("0", timedelta(0)),
        ("P7D", timedelta(days=7)),
        ("PT1H30M", timedelta(minutes=90)),
        ("P1DT0.5S", timedelta(days=1, milliseconds=500)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "d", "-1d", "7 days", "1y", "P", "PT", "P1DT", "1e3", "inf", "nan", "٣s", "99999999999d"]
)
def test_parse_duration_errors(text: str) -> None:
    with pytest.raises(UsageError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("64MiB", 64 * 1024**2),
        ("64mib", 64 * 1024**2),
        ("1GiB", 1024**3),
        ("1.5GiB", 3 * 1024**3 // 2),
        ("1kB", 1000),
        ("64MB", 64_000_000),
        ("1GB", 1_000_000_000),
        ("2 TB", 2 * 10**12),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5", "64M", "1XB", "one GB"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


@given(st.text(max_size=40))
@settings(max_examples=400)
def test_parse_duration_only_raises_usage_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except UsageError:
        return
    assert value >= timedelta(0)


@given(st.from_regex(r"\A[0-9.]{0,6}\s?(ms|s|m|h|d|w|P|T|H|M|S|D)?[0-9]{0,3}\Z"))
def test_parse_duration_only_raises_usage_error_near_valid(text: str) -> None:
    with contextlib.suppress(UsageError):
        parse_duration(text)


@given(st.text(max_size=40))
def test_parse_size_only_raises_usage_error(text: str) -> None:
    with contextlib.suppress(UsageError):
        assert parse_size(text) >= 0


@given(st.timedeltas(min_value=timedelta(0)))
def test_format_duration_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


@given(st.integers(min_value=0, max_value=2**70))
def test_format_size_round_trips(value: int) -> None:
    assert parse_size(format_size(value)) == value


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("users", ("public", "users")),
        ("Users", ("public", "users")),
        ("billing.Invoices", ("billing", "invoices")),
        ('"My Table"', ("public", "My Table")),
        ('"My Schema"."a.b"', ("My Schema", "a.b")),
        ('"say ""hi"""', ("public", 'say "hi"')),
        ("t$1", ("public", "t$1")),
    ],
)
def test_normalize_table(name: str, expected: tuple[str, str]) -> None:
    assert normalize_table(name) == expected
    assert normalize_table(format_table(*expected)) == expected


@pytest.mark.parametrize("name", ["", "a.b.c", "1abc", "a b", 'a."', '""', "a.", ".a", "a-b", "x" * 64])
def test_normalize_table_errors(name: str) -> None:
    with pytest.raises(UsageError, match="invalid table name"):
        normalize_table(name)


# ----------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://cdc:{SECRET}@db.internal:5432/app",
        f"postgres://cdc:{SECRET}@h1:5432,h2:5433/app?sslmode=require",
        f"postgresql://cdc:{SECRET}@with@at@host/app",
        f"postgresql://cdc@host/app?sslmode=require&password={SECRET}",
        f"host=db password={SECRET} dbname=app",
        f"host=db password = '{SECRET} with space\\' quote' dbname=app",
        f"host=db sslpassword={SECRET}",
        f"host=db password=x&{SECRET}",
        f"dbname=app password={SECRET}&x",
        f"password='{SECRET} unterminated",
    ],
)
def test_redact_dsn(dsn: str) -> None:
    redacted = redact_dsn(dsn)
    assert SECRET not in redacted
    assert "***" in redacted
    assert "cdc" in redacted or "db" in redacted or "password" in redacted


PASSWORDS = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="'\\"),
    min_size=8,
    max_size=30,
)


@given(PASSWORDS)
def test_redact_dsn_hides_any_password(password: str) -> None:
    for dsn in (
        f"postgresql://cdc:{password}@db.internal:5432/app?sslmode=require",
        f"host=db.internal password={password} dbname=app",
        f"host=db.internal password='{password} x' dbname=app",
    ):
        assume(password not in dsn.replace(password, "\0"))
        assert password not in redact_dsn(dsn), dsn


# Any character libpq takes in a password: spaces, quotes, backslashes, unicode, and the URI
# delimiters. Written as a user must write them for libpq to read this password.
ANY_PASSWORD = st.text(
    alphabet=st.one_of(
        st.sampled_from(" '\\\"@/?=&#:%"),
        st.characters(min_codepoint=33, max_codepoint=0x2FFF, exclude_categories=("Cs", "Cc")),
    ),
    min_size=3,
    max_size=30,
)


def _keyword_value(password: str) -> str:
    return "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _bare_value(password: str) -> str:
    return "".join("\\" + c if c in " \\'" else c for c in password)


def _fragments(text: str) -> set[str]:
    return {text[i:j] for i in range(len(text)) for j in range(i + 3, len(text) + 1)}


@settings(max_examples=300, deadline=None)
@given(ANY_PASSWORD)
@example("app")  # the same text as the DSN's dbname
def test_redact_dsn_no_fragment_of_any_password_survives(password: str) -> None:
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    encoded = quote(password, safe="")
    forms = [  # (the DSN with {} where the password is written, how it is written)
        ("host=db.internal password={} dbname=app", _keyword_value(password)),
        ("host=db.internal password={} dbname=app", _bare_value(password)),
        ("host=db.internal sslpassword = {} user=cdc", _keyword_value(password)),
        ("postgresql://cdc:{}@db.internal:5432/app?sslmode=require", encoded),
        ("postgresql://cdc@db.internal/app?password={}&sslmode=require", encoded),
        ("postgres://db.internal/app?sslpassword={}", encoded),
    ]
    for template, written in forms:
        dsn = template.format(written)
        params = conninfo_to_dict(dsn)
        assert password in (params.get("password"), params.get("sslpassword")), dsn  # libpq reads it so
        redacted = redact_dsn(dsn)
        # What the DSN says besides the password (dbname=app) may share fragments with it (a
        # password "app"): only those may show.
        expected = template.format("***")
        leaked = {f for f in _fragments(password) if f in redacted and f not in expected}
        assert not leaked, (dsn, redacted)


def test_redact_dsn_backslash_escaped_space() -> None:
    # the case: a bare value with an escaped space is one value for libpq
    assert redact_dsn(f"host=db password=abc\\ {SECRET} dbname=app") == "host=db password=*** dbname=app"
    text = f"cannot connect (host=db password=abc\\ {SECRET})"
    assert SECRET not in redact_dsn(text)
    assert redact_dsn(f"postgresql://cdc:a%40{SECRET}@db/app") == "postgresql://cdc:***@db/app"


def test_redact_dsn_keeps_the_rest() -> None:
    assert redact_dsn(f"postgresql://cdc:{SECRET}@db:5432/app") == "postgresql://cdc:***@db:5432/app"
    assert redact_dsn(f"host=db password={SECRET} dbname=app") == "host=db password=*** dbname=app"
    assert redact_dsn("postgresql://cdc@db/app") == "postgresql://cdc@db/app"
    assert redact_dsn("host=db dbname=app") == "host=db dbname=app"
    assert (
        redact_dsn(f"postgresql://db/app?password={SECRET}&sslmode=require")
        == "postgresql://db/app?password=***&sslmode=require"
    )


def test_passwords_never_printed(tmp_path: Path) -> None:
    token = "tok-" + SECRET
    config = load_config(
        env={
            "CDC_SOURCE_DSN": f"postgresql://cdc:{SECRET}@src/app",
            "CDC_STORE_DSN": f"host=store password={SECRET}",
            "CDC_SERVER__TOKEN": token,
        }
    )
    assert config.require_source() == f"postgresql://cdc:{SECRET}@src/app"
    assert config.server.token is not None and config.server.token.get_secret_value() == token
    for text in (str(config), repr(config), str(config.source), repr(config.store), str(config.redacted())):
        assert SECRET not in text
    assert "postgresql://cdc:***@src/app" in str(config)  # the rest of the DSN stays visible
    assert SECRET not in config.model_dump_json()


def test_passwords_never_in_error_messages(tmp_path: Path) -> None:
    path = write(
        tmp_path, f"source:\n  dsn: [postgresql://cdc:{SECRET}@src/app]\nserver:\n  token: {{t: {SECRET}}}\n"
    )
    env = {
        "CDC_SOURCE__SLOT": f"postgresql://cdc:{SECRET}@src/app",  # a DSN in the wrong variable
        "CDC_SOURCE__PUBLICATION": f"host=x password={SECRET}",
        "CDC_SOURCE__DSNN": f"postgresql://cdc:{SECRET}@src/app",
    }
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert len(info.value.problems) == 5, info.value.problems
    assert SECRET not in str(info.value)
    assert any(
        p.startswith("source.slot (from CDC_SOURCE__SLOT):") and "***" in p for p in info.value.problems
    )

    bad_yaml = write(tmp_path, f'source:\n  dsn: "postgresql://cdc:{SECRET}@src/app\n', "bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(bad_yaml, env={})
    assert SECRET not in str(info.value)


# ----------------------------------------------------------------- the example file and round trips


def test_example_file_loads_and_equals_defaults() -> None:
    example = load_config(EXAMPLE, env=DSNS)
    defaults = load_config(env=DSNS)
    assert example == defaults
    assert example.model_dump(exclude={"source": {"dsn"}, "store": {"dsn"}}) == load_config(
        env={}
    ).model_dump(exclude={"source": {"dsn"}, "store": {"dsn"}})


def test_example_file_documents_every_key() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert set(data) == set(Config.model_fields)
    for section, field in Config.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            keys = {f.alias or name for name, f in annotation.model_fields.items()}
            assert set(data[section]) == keys, section


def test_redacted_dump_loads_back(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
source: {tables: [users, '"Odd Name"'], stream_in_progress: "on"}
capture: {memory_limit_bytes: 3MB, spill_dir: /tmp/spill, batch_max_seconds: 50ms}
retention: {default: 36h, tables: {users: 90m}}
columns: {users: {'"Email"': hash}}
server: {listen: '0.0.0.0:8080', open: true}
""",
    )
    config = load_config(path, env={**DSNS, "CDC_POLICIES__HASH_KEY": HASH_KEY})
    assert config.column_policies('public."Odd Name"') == {}
    assert config.column_policies("USERS") == {"Email": "hash"}
    assert config.server.is_loopback is False
    dumped = config.redacted()
    assert dumped["retention"]["default"] == "36h"
    assert dumped["capture"]["memory_limit_bytes"] == "3000000"
    assert dumped["policies"]["hash_key"] == "***"
    again = load_config(
        write(tmp_path, yaml.safe_dump(dumped), "again.yaml"),
        env={**DSNS, "CDC_POLICIES__HASH_KEY": HASH_KEY},
    )
    assert again == config


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "CDC_SOURCE__SLOT",
                "CDC_SOURCE__TABLES",
                "CDC_SOURCE__STREAM_IN_PROGRESS",
                "CDC_CAPTURE__BATCH_MAX_ROWS",
                "CDC_CAPTURE__BATCH_MAX_SECONDS",
                "CDC_CAPTURE__MEMORY_LIMIT_BYTES",
                "CDC_CONTEXT__APPLICATION_NAME_PATTERN",
                "CDC_RETENTION__DEFAULT",
                "CDC_RETENTION__TABLES__X",
                "CDC_COLUMNS__T__C",
                "CDC_SERVER__LISTEN",
                "CDC_RECONNECT__MAX_BACKOFF_SECONDS",
                "CDC_X__Y",
            ]
        ),
        st.text(max_size=20),
    )
)
@settings(max_examples=200)
def test_arbitrary_env_values_give_config_or_config_error(env: dict[str, str]) -> None:
    try:
        load_config(env=env)
    except ConfigError as exc:
        assert exc.problems


YAML_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**400),
    st.floats(),
    st.text(max_size=20),
    st.dates(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
YAML_KEYS = st.sampled_from(
    [
        ("source", "dsn"),
        ("source", "tables"),
        ("source", "stream_in_progress"),
        ("source", "connect_timeout_seconds"),
        ("capture", "batch_max_rows"),
        ("capture", "memory_limit_bytes"),
        ("capture", "spill_dir"),
        ("capture", "heartbeat_interval_seconds"),
        ("retention", "default"),
        ("retention", "tables"),
        ("columns", "users"),
        ("server", "listen"),
        ("server", "token"),
        ("logging", "level"),
        ("reconnect", "max_backoff_seconds"),
    ]
)


@given(st.dictionaries(YAML_KEYS, YAML_VALUES, max_size=5))
@settings(max_examples=200)
def test_arbitrary_yaml_values_give_config_or_config_error(
    tmp_path_factory: pytest.TempPathFactory, values: dict[tuple[str, str], object]
) -> None:
    data: dict[str, dict[str, object]] = {}
    for (section, key), value in values.items():
        data.setdefault(section, {})[key] = value
    path = tmp_path_factory.mktemp("yaml") / "cdc.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    try:
        load_config(path, env={})
    except ConfigError as exc:
        assert exc.problems
        assert all(f"(from {path})" in p for p in exc.problems), exc.problems


def test_hash_policy_needs_a_key_reported_with_every_other_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "columns: {users: {email: hash, ssn: mask}}\nsource: {tables: [users]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={**DSNS, "CDC_RETENTION__TABLES__ORDERS": "1d"})
    problems = caught.value.problems
    assert any(p.startswith("policies.hash_key") and "public.users.email" in p for p in problems), problems
    assert any("retention.tables" in p for p in problems), problems  # all at once
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        load_config(path, env={**DSNS, "CDC_POLICIES__HASH_KEY": "short"})
    config = load_config(path, env={**DSNS, "CDC_POLICIES__HASH_KEY": SECRET + "-long-enough"})
    assert config.policies.hash_key_bytes() == (SECRET + "-long-enough").encode()
    for text in (str(config), repr(config), str(config.redacted())):
        assert SECRET not in text
    # a mask or exclude policy needs no key
    load_config(write(tmp_path, "columns: {users: {ssn: mask}}\n", "mask.yaml"), env=DSNS)
