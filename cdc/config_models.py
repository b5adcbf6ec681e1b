"""The configuration's model: each section of the config file as a frozen pydantic model with
its defaults and checks, and the field types they share (durations, sizes, names, DSNs).
cdc/config.py loads it (defaults, the YAML file, ``CDC_*`` variables) and re-exports it."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Secret,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cdc import names, source_hosts
from cdc.config_text import (
    MASK,
    SecretDsn,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
    short,
)
from cdc.context import MAX_EXTRA_KEYS, validate_setting_name
from cdc.errors import MissingSettingError, UsageError

__all__ = [
    "CaptureConfig",
    "ColumnPolicy",
    "Config",
    "ContextConfig",
    "LoggingConfig",
    "PoliciesConfig",
    "ReconnectConfig",
    "RetentionConfig",
    "ServerConfig",
    "SourceConfig",
    "StoreConfig",
    "format_table",
    "normalize_table",
]

ColumnPolicy = Literal["exclude", "hash", "mask"]

# --------------------------------------------------------------------------- table names


def normalize_table(name: str) -> tuple[str, str]:
    """Return ``(schema, table)`` for ``name``, ``schema.name`` or quoted ``"My Schema"."My Table"``.

    Read as PostgreSQL reads a table name (:func:`cdc.names.parse_table`): unquoted parts are
    lowercased, the schema defaults to ``public``. Raises :class:`UsageError` on an invalid name.
    """
    return names.parse_table(name)


def _quote_identifier(part: str) -> str:
    return names.quote_ident(part)


def format_table(schema: str, name: str) -> str:
    """The canonical ``schema.name`` spelling (parts quoted only when needed); inverse of normalize_table."""
    return names.format_table(schema, name)


# --------------------------------------------------------------------------- field types


def _wrap_usage(func: Callable[[str], Any], value: str) -> Any:
    try:
        return func(value)
    except UsageError as exc:
        # The problem line shows the input already ("got ..."): do not repeat it.
        raise ValueError(exc.message.replace(f" {short(value)}", "", 1)) from None


def _duration_before(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 24h or 7d")
    if isinstance(value, str):
        return _wrap_usage(parse_duration, value)
    if isinstance(value, int | float):
        try:
            if not math.isfinite(value) or value < 0:
                raise OverflowError
            return timedelta(seconds=value)
        except OverflowError:
            raise ValueError("expected a finite, non-negative number of seconds in range") from None
    return value


def _seconds_before(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds or a duration such as 500ms or 30s")
    if isinstance(value, str):
        return _wrap_usage(parse_duration, value).total_seconds()
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


def _size_before(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB or 1GB")
    if isinstance(value, str):
        return _wrap_usage(parse_size, value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("expected a whole number of bytes or a size such as 64MiB")
        return int(value)
    return value


def _positive_duration(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be greater than zero")
    return value


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _empty_to_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


def _check_name(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]{1,63}", value, re.ASCII):
        raise ValueError("must be 1 to 63 lowercase letters, digits or underscores")
    return value


def _check_prefix(value: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value, re.ASCII):
        raise ValueError("must be a lowercase identifier (letters, digits, _; not starting with a digit)")
    return value


def check_table_key(value: str) -> str:
    return format_table(*_wrap_usage(normalize_table, value))


def _column_key(value: str) -> str:
    try:
        parts = names.parse_identifiers(value.strip())
    except ValueError as exc:
        raise ValueError(f"invalid column name ({exc})") from None
    if len(parts) != 1:
        raise ValueError('invalid column name (a dot needs double quotes: "a.b")')
    return parts[0]


def _split_list(value: Any) -> Any:
    """``a,b`` → ``["a", "b"]`` (commas inside double quotes do not split); ``None`` → ``[]``."""
    if value is None:
        return []
    if not isinstance(value, str):
        return value
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _none_to_dict(value: Any) -> Any:
    return {} if value is None else value


def _no_duplicate_tables(value: Any) -> Any:
    if isinstance(value, Mapping):
        seen: dict[str, Any] = {}
        for key in value:
            try:
                canonical = check_table_key(key) if isinstance(key, str) else key
            except ValueError:
                continue  # reported by the key validator
            if canonical in seen:
                raise ValueError(f"table {canonical} is listed twice (as {seen[canonical]!r} and {key!r})")
            seen[canonical] = key
    return value


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


Duration = Annotated[timedelta, BeforeValidator(_duration_before), AfterValidator(_positive_duration)]
Seconds = Annotated[float, BeforeValidator(_seconds_before), Field(allow_inf_nan=False)]
PositiveSeconds = Annotated[Seconds, Field(gt=0)]
Size = Annotated[int, BeforeValidator(_size_before), Field(gt=0)]
Name = Annotated[str, AfterValidator(_check_name)]
TableKey = Annotated[str, AfterValidator(check_table_key)]
ColumnKey = Annotated[str, AfterValidator(_column_key)]
OptionalDsn = Annotated[SecretDsn | None, BeforeValidator(_empty_to_none)]
OnOffAuto = Literal["auto", "on", "off"]


# --------------------------------------------------------------------------- the models


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True)

    @model_validator(mode="before")
    @classmethod
    def _none_is_empty(cls, data: Any) -> Any:
        # A section whose keys are all commented out is parsed by YAML as null.
        return {} if data is None else data


def _on_off(value: Any) -> Any:
    # YAML 1.1 reads unquoted on/off as booleans.
    if isinstance(value, bool):
        return "on" if value else "off"
    value = _lower(value)
    return {"true": "on", "false": "off"}.get(value, value) if isinstance(value, str) else value


def _source_hosts(value: tuple[str, ...]) -> tuple[str, ...]:
    for host in value:
        source_hosts.parse_host(host)
    return _unique(value)


class SourceConfig(_Section):
    """The captured database."""

    dsn: OptionalDsn = None
    slot: Name = "cdc"
    publication: Name = "cdc"
    #: canonical ``schema.name`` strings (see :func:`normalize_table`); empty = all tables
    tables: Annotated[tuple[TableKey, ...], BeforeValidator(_split_list), AfterValidator(_unique)] = ()
    stream_in_progress: Annotated[OnOffAuto, BeforeValidator(_on_off)] = "auto"
    connect_timeout_seconds: PositiveSeconds = 10.0
    #: silence after which a source connection counts as broken (a query unanswered, the
    #: replication stream quiet although pinged): the daemon then reconnects
    timeout_seconds: PositiveSeconds = 30.0
    #: PostgreSQL 17+: the slot is a failover slot, synchronized to the standbys (docs/reliability.md)
    failover: bool = False
    #: the source's servers, primary and standbys (``host:port``): replace the DSN's host and
    #: port; capture follows whichever is the primary (cdc/source_hosts.py)
    hosts: Annotated[tuple[str, ...], BeforeValidator(_split_list), AfterValidator(_source_hosts)] = ()

    @model_validator(mode="after")
    def _dsn_follows_primary(self) -> SourceConfig:
        if self.dsn is not None:
            problems = source_hosts.dsn_problems(
                source_hosts.source_dsn(self.dsn.get_secret_value(), self.hosts)
            )
            if problems:
                raise ValueError("; ".join(problems))
        return self

    #: tables without a replica identity (no primary key, no REPLICA IDENTITY FULL/INDEX):
    #: ``full`` sets REPLICA IDENTITY FULL on them (the operator's consent: more WAL per UPDATE and
    #: DELETE), ``inserts_only`` publishes only their INSERTs and TRUNCATEs (a second publication),
    #: ``skip`` leaves them out. Never is one published for UPDATE/DELETE without an identity:
    #: PostgreSQL would refuse the application's UPDATE and DELETE (docs/baseline.md).
    keyless_tables: Literal["full", "inserts_only", "skip"] = "inserts_only"


class StoreConfig(_Section):
    """The history store."""

    dsn: OptionalDsn = None
    #: the ``schema`` key (``BaseModel.schema`` is taken)
    schema_name: Name = Field(default="cdc_history", alias="schema")
    #: a store write lasting longer makes the daemon unready and check on the store; the
    #: write is abandoned (and retried) when the store is unreachable or no longer working on it
    timeout_seconds: PositiveSeconds = 30.0


class CaptureConfig(_Section):
    """Batching, memory and lag limits of the capture loop."""

    batch_max_rows: Annotated[int, BeforeValidator(_no_bool), Field(gt=0)] = 5000
    batch_max_seconds: PositiveSeconds = 0.2
    status_interval_seconds: PositiveSeconds = 10.0
    memory_limit_bytes: Size = 64 * 1024**2
    # A value whose text is longer is stored by reference (size and SHA-256, docs/store.md).
    max_value_bytes: Size = 64 * 1024**2
    spill_dir: Annotated[Path | None, BeforeValidator(_empty_to_none)] = None
    heartbeat_interval_seconds: Annotated[Seconds, Field(ge=0)] = 60.0
    max_lag_bytes: Size = 1024**3
    #: `cdc status` is unhealthy (exit 10) when the oldest change not yet stored is older
    max_lag_seconds: PositiveSeconds = 300.0


def _setting_names(value: tuple[str, ...]) -> tuple[str, ...]:
    names_seen: list[str] = []
    for name in value:
        key = validate_setting_name(name, "setting")
        if key in ("request_id", "actor") or key.startswith("_"):
            raise ValueError(f"{name!r} is reserved (request_id and actor are always recorded)")
        if key not in names_seen:
            names_seen.append(key)
    if len(names_seen) > MAX_EXTRA_KEYS:
        raise ValueError(f"{len(names_seen)} names, at most {MAX_EXTRA_KEYS}")
    return tuple(names_seen)


class DdlConfig(_Section):
    """Schema changes (docs/ddl.md)."""

    #: a DDL that rewrites values without row changes in the WAL (ALTER COLUMN TYPE, a volatile
    #: default) records the table's rows at its version up to this many rows; a larger table's
    #: history is marked inexact from that version until a backfill
    rewrite_snapshot_max_rows: Annotated[int, BeforeValidator(_no_bool), Field(ge=0)] = 100_000


class ContextConfig(_Section):
    """How the request context of a change is found."""

    application_name_pattern: str = r"req:(?P<id>[A-Za-z0-9._:-]+)"
    settings_prefix: Annotated[str, AfterValidator(_check_prefix)] = "cdc"
    #: the ``<settings_prefix>.<name>`` settings recorded in each context's ``extra`` (by the
    #: trigger and by the client helper). PostgreSQL cannot list custom settings, so each one is
    #: named here.
    extra_settings: Annotated[
        tuple[str, ...], BeforeValidator(_split_list), AfterValidator(_setting_names)
    ] = ("tenant",)
    #: a "none" context (db user, backend pid, application_name) for each transaction without a
    #: request id; off: such transactions carry no context and cost the source nothing
    emit_none: bool = True

    @field_validator("application_name_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        if "id" not in compiled.groupindex:
            raise ValueError('must contain a named group "id", e.g. req:(?P<id>[A-Za-z0-9._:-]+)')
        return value

    @property
    def regex(self) -> re.Pattern[str]:
        """``application_name_pattern`` compiled."""
        return re.compile(self.application_name_pattern)


class RetentionConfig(_Section):
    """How long history is kept, and how it is partitioned and pruned."""

    default: Duration = timedelta(days=7)
    #: keys are canonical ``schema.name`` strings
    tables: Annotated[
        dict[TableKey, Duration], BeforeValidator(_none_to_dict), BeforeValidator(_no_duplicate_tables)
    ] = Field(default_factory=dict)
    partition_interval: Duration = timedelta(days=1)
    prune_interval: Duration = timedelta(hours=1)
    keyframe_on_prune: bool = True

    def for_table(self, table: str) -> timedelta:
        """Retention of ``table`` (any spelling accepted by :func:`normalize_table`)."""
        return self.tables.get(format_table(*normalize_table(table)), self.default)


def _check_listen(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("expected host:port, e.g. 127.0.0.1:8400")
    host, sep, port = value.strip().rpartition(":")
    valid = bool(sep) and re.fullmatch(r"[0-9]{1,5}", port, re.ASCII) is not None and int(port) <= 65535
    if valid and host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            valid = False
    elif valid:
        valid = re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host, re.ASCII) is not None
    if not valid:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8400 or [::1]:8400")
    return value.strip()


class SecretValue(Secret[str]):
    """A secret shown as ``***``, like the password of a DSN."""

    def _display(self) -> str:
        return MASK


#: shortest ``policies.hash_key`` accepted (UTF-8 bytes): a short key can be searched for
MIN_HASH_KEY_BYTES = 16


def _check_hash_key(value: SecretValue | None) -> SecretValue | None:
    if value is not None and len(value.get_secret_value().encode()) < MIN_HASH_KEY_BYTES:
        raise ValueError(f"must be at least {MIN_HASH_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)")
    return value


class PoliciesConfig(_Section):
    """Secrets of the column policies (``columns``)."""

    #: the HMAC-SHA256 key of the ``hash`` policy (env CDC_POLICIES__HASH_KEY); required when a
    #: column is hashed. Values hashed under different keys do not compare equal (docs/security.md).
    hash_key: Annotated[
        SecretValue | None, BeforeValidator(_empty_to_none), AfterValidator(_check_hash_key)
    ] = None

    def hash_key_bytes(self) -> bytes | None:
        return None if self.hash_key is None else self.hash_key.get_secret_value().encode()


class ServerConfig(_Section):
    """``cdc serve``: HTTP API, page and metrics."""

    listen: Annotated[str, BeforeValidator(_check_listen)] = "127.0.0.1:8400"
    token: Annotated[SecretStr | None, BeforeValidator(_empty_to_none)] = None
    open: bool = False

    @property
    def host(self) -> str:
        """Host part of ``listen`` (IPv6 without brackets)."""
        return self.listen.rpartition(":")[0].removeprefix("[").removesuffix("]")

    @property
    def port(self) -> int:
        """Port part of ``listen``."""
        return int(self.listen.rpartition(":")[2])

    @property
    def is_loopback(self) -> bool:
        """Whether ``listen`` is only reachable from this machine."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class LoggingConfig(_Section):
    """Log level and format."""

    level: Annotated[
        Literal["debug", "info", "warning", "error"],
        BeforeValidator(lambda v: "warning" if _lower(v) == "warn" else _lower(v)),
    ] = "info"
    format: Annotated[Literal["auto", "json", "console"], BeforeValidator(_lower)] = "auto"


class SimulateConfig(_Section):
    """Dry-run support (`cdc.simulate`): a row trigger that costs a little on every write."""

    enabled: bool = False
    tables: Annotated[tuple[TableKey, ...], BeforeValidator(_split_list), AfterValidator(_unique)] = ()


class BaselineConfig(_Section):
    """Baselines (`cdc setup`) and backfills (`cdc backfill`, docs/baseline.md)."""

    #: parallel readers of a baseline (tables, and block ranges of a large table); 0 = one per
    #: CPU, at least 4 (each is a pipeline of three processes: source backend, reader, store backend)
    workers: Annotated[int, BeforeValidator(_no_bool), Field(ge=0, le=64)] = 0
    #: rows per backfill chunk (one pair of watermarks; a chunk is one short read on the source)
    chunk_rows: Annotated[int, BeforeValidator(_no_bool), Field(gt=0)] = 20_000

    def worker_count(self) -> int:
        return self.workers or max(4, min(8, os.cpu_count() or 1))


class ReconnectConfig(_Section):
    """Backoff between reconnection attempts."""

    initial_backoff_seconds: PositiveSeconds = 0.5
    max_backoff_seconds: PositiveSeconds = 30.0

    @field_validator("max_backoff_seconds")
    @classmethod
    def _not_below_initial(cls, value: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial_backoff_seconds")
        if initial is not None and value < initial:
            raise ValueError(f"must be at least initial_backoff_seconds ({initial:g})")
        return value


class Config(_Section):
    """The whole configuration (frozen). Build it with :func:`load_config`."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    context: ContextConfig = Field(default_factory=ContextConfig)
    ddl: DdlConfig = Field(default_factory=DdlConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    #: canonical ``schema.name`` → column name (case preserved) → policy
    columns: Annotated[
        dict[
            TableKey,
            Annotated[
                dict[ColumnKey, Annotated[ColumnPolicy, BeforeValidator(_lower)]],
                BeforeValidator(_none_to_dict),
            ],
        ],
        BeforeValidator(_none_to_dict),
        BeforeValidator(_no_duplicate_tables),
    ] = Field(default_factory=dict)
    policies: PoliciesConfig = Field(default_factory=PoliciesConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    reconnect: ReconnectConfig = Field(default_factory=ReconnectConfig)
    simulate: SimulateConfig = Field(default_factory=SimulateConfig)
    baseline: BaselineConfig = Field(default_factory=BaselineConfig)

    def require_source(self) -> str:
        """The source DSN; raises :class:`ConfigError` when none is configured."""
        if self.source.dsn is None:
            raise MissingSettingError(
                "no source database given: pass --source DSN, set CDC_SOURCE_DSN, or set source.dsn in "
                "the config file"
            )
        return source_hosts.source_dsn(self.source.dsn.get_secret_value(), self.source.hosts)

    def require_store(self) -> str:
        """The store DSN; raises :class:`ConfigError` when none is configured."""
        if self.store.dsn is None:
            raise MissingSettingError(
                "no history store given: pass --store DSN, set CDC_STORE_DSN, or set store.dsn in the "
                "config file"
            )
        return self.store.dsn.get_secret_value()

    def column_policies(self, table: str) -> dict[str, ColumnPolicy]:
        """Column name → policy for ``table`` (any spelling accepted by :func:`normalize_table`)."""
        return dict(self.columns.get(format_table(*normalize_table(table)), {}))

    def redacted(self) -> dict[str, Any]:
        """Plain data for display (``cdc config``): secrets redacted, durations and sizes formatted.

        Dumped as YAML it loads back to an equal config, except for the secrets.
        """

        def convert(value: Any, key: str) -> Any:
            if isinstance(value, dict):
                return {k: convert(v, k) for k, v in value.items()}
            if isinstance(value, tuple | list):
                return [convert(v, key) for v in value]
            if isinstance(value, Secret | SecretStr):
                return str(value)
            if isinstance(value, timedelta):
                return format_duration(value)
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, int) and not isinstance(value, bool) and key.endswith("_bytes"):
                return format_size(value)
            return value

        result: dict[str, Any] = convert(self.model_dump(by_alias=True), "")
        result["columns"] = {
            table: {_quote_identifier(column): policy for column, policy in policies.items()}
            for table, policies in result["columns"].items()
        }
        return result
