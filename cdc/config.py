"""Configuration of cdc: defaults, overridden by a YAML file, overridden by ``CDC_*`` variables.

``load_config()`` returns a frozen :class:`Config` or raises one :class:`~cdc.errors.ConfigError`
listing every problem, each naming its key and where the value came from. DSN passwords and the
server token never appear in ``str()``/``repr()`` of the config or in error messages.

The sections and field types are in :mod:`cdc.config_models`, re-exported here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from cdc.config_models import (
    MIN_HASH_KEY_BYTES,
    CaptureConfig,
    ColumnPolicy,
    Config,
    ContextConfig,
    LoggingConfig,
    PoliciesConfig,
    ReconnectConfig,
    RetentionConfig,
    ServerConfig,
    SourceConfig,
    StoreConfig,
    check_table_key,
    format_table,
    normalize_table,
)
from cdc.config_text import SecretDsn, format_duration, format_size, parse_duration, parse_size, redact_dsn
from cdc.errors import ConfigError

__all__ = [
    "CaptureConfig",
    "ColumnPolicy",
    "Config",
    "ContextConfig",
    "LoggingConfig",
    "PoliciesConfig",
    "ReconnectConfig",
    "RetentionConfig",
    "SecretDsn",
    "ServerConfig",
    "SourceConfig",
    "StoreConfig",
    "format_duration",
    "format_size",
    "format_table",
    "load_config",
    "normalize_table",
    "parse_duration",
    "parse_size",
    "redact_dsn",
]


# --------------------------------------------------------------------------- loading

_Path = tuple[Any, ...]
_DSN_VARIABLES = {"CDC_SOURCE_DSN": ("source", "dsn"), "CDC_STORE_DSN": ("store", "dsn")}
_SECRET_KEYS = {"dsn", "token", "hash_key"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that records duplicate mapping keys instead of silently keeping the last."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, Any]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                marker = (key_node.tag, key_node.value)
                if marker in seen:
                    line = key_node.start_mark.line + 1
                    self.duplicates.append((line, f"line {line}: duplicate key {key_node.value!r}"))
                seen.add(marker)
        return super().construct_mapping(node, deep=deep)


def _read_file(path: Path, origin: str, problems: list[str]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(f"{origin}: config file not found")
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{origin}: cannot read config file ({getattr(exc, 'strerror', None) or exc})")
        return {}
    loader = _Loader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        where = ""
        if exc.problem_mark is not None:
            where = f" at line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}"
        context = ""
        if exc.context and exc.context_mark is not None:
            context = f" ({exc.context} at line {exc.context_mark.line + 1})"
        problems.append(f"{origin}: invalid YAML{where}: {exc.problem}{context}")
        return {}
    except yaml.YAMLError as exc:
        problems.append(f"{origin}: invalid YAML: {type(exc).__name__}")
        return {}
    finally:
        loader.dispose()
    problems.extend(f"{origin}: {duplicate}" for _, duplicate in sorted(loader.duplicates))
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(
            f"{origin}: the top level must be a mapping of sections (source:, store:, ...), "
            f"got {type(data).__name__}"
        )
        return {}
    return data


def _leaves(data: Any, prefix: _Path = ()) -> Iterator[_Path]:
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from _leaves(value, (*prefix, key))
    else:
        yield prefix


def _section_fields(section: str) -> set[str]:
    field = Config.model_fields.get(section)
    if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
        return set()
    return {f.alias or name for name, f in field.annotation.model_fields.items()}


def _read_env(env: Mapping[str, str], problems: list[str]) -> tuple[dict[str, Any], dict[_Path, str]]:
    data: dict[str, Any] = {}
    origins: dict[_Path, str] = {}
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith("CDC_") or upper == "CDC_CONFIG":
            continue
        rest = name[4:].lower()
        path: _Path
        if upper in _DSN_VARIABLES:
            path = _DSN_VARIABLES[upper]
        elif "__" in rest:
            path = tuple(rest.split("__"))
            if not all(path):
                problems.append(f"{name}: malformed variable name (use CDC_<SECTION>__<KEY>)")
                continue
        else:
            section, _, key = rest.partition("_")
            if key in _section_fields(section):
                problems.append(
                    f"{name}: not a config variable (did you mean CDC_{section.upper()}__{key.upper()}?)"
                )
            continue  # other CDC_* variables are not ours
        value = env[name].strip()
        node: dict[str, Any] = data
        conflict = None
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                conflict = origins.get(path[: i + 1])
                break
            node = child
        existing = node.get(path[-1]) if conflict is None else None
        if conflict is None and isinstance(existing, dict):
            conflict = next(o for p, o in origins.items() if p[: len(path)] == path)
        elif conflict is None and existing is not None and existing != value:
            conflict = origins[path]
        if conflict is not None:
            problems.append(f"{_format_path(path)}: set by both {conflict} and {name}")
            continue
        node[path[-1]] = value
        origins[path] = name
    return data, origins


def _merge(base: dict[Any, Any], override: dict[Any, Any]) -> dict[Any, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_path(loc: _Path) -> str:
    text = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            key = str(part)
            if not re.fullmatch(r"[A-Za-z0-9_$]+", key):
                key = '"' + key.replace('"', '\\"') + '"'
            text += f".{key}" if text else key
    return text or "(top level)"


def _origin(loc: _Path, origins: Mapping[_Path, str]) -> str:
    for end in range(len(loc), 0, -1):
        if loc[:end] in origins:
            return origins[loc[:end]]
    below = sorted({o for p, o in origins.items() if p[: len(loc)] == loc})
    return ", ".join(below) if below else "defaults"


def _model_at(loc: _Path) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: Mapping[str, Any]) -> str:
    loc: _Path = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = [f.alias or name for name, f in model.model_fields.items()] if model else []
        close = difflib.get_close_matches(str(loc[-1]).lower(), known, n=1, cutoff=0.6)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind in ("value_error", "assertion_error"):
        message = str(error.get("ctx", {}).get("error", error["msg"]))
    else:
        message = error["msg"]
        if kind.endswith("_parsing"):
            message = message.split(",")[0]
    if any(str(part) in _SECRET_KEYS for part in loc):
        return message
    got = repr(error.get("input"))
    if len(got) > 80:
        got = got[:77] + "..."
    return f"{message}, got {got}"


def _cross_checks(config: Config, data: Mapping[str, Any], origins: Mapping[_Path, str]) -> list[str]:
    """Policies naming a table that is not captured are almost surely typos: refuse them. A
    ``hash`` policy needs ``policies.hash_key``."""
    problems: list[str] = []
    hashed = [
        f"{table}.{column}"
        for table, columns in config.columns.items()
        for column, policy in columns.items()
        if policy == "hash"
    ]
    if hashed and config.policies.hash_key is None:
        problems.append(
            f"policies.hash_key (from {_origin(('policies', 'hash_key'), origins)}): required because "
            f"{', '.join(hashed[:5])}{' ...' if len(hashed) > 5 else ''} {'uses' if len(hashed) == 1 else 'use'} the hash policy; "
            "set CDC_POLICIES__HASH_KEY to a secret of at least "
            f"{MIN_HASH_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`)"
        )
    captured = set(config.source.tables)
    if not captured:
        return problems
    for section, keys in (("retention", ("retention", "tables")), ("columns", ("columns",))):
        raw = data.get(keys[0], {})
        raw = raw.get(keys[1], {}) if len(keys) > 1 and isinstance(raw, dict) else raw
        mapping = config.retention.tables if section == "retention" else config.columns
        for table in mapping:
            if table in captured:
                continue
            raw_key = next((k for k in raw if isinstance(k, str) and _safecheck_table_key(k) == table), table)
            close = difflib.get_close_matches(table, sorted(captured), n=1, cutoff=0.6)
            loc = (*keys, raw_key)
            problems.append(
                f"{_format_path(loc)} (from {_origin(loc, origins)}): table {table} is not in source.tables"
                + (f" (did you mean {close[0]!r}?)" if close else "")
            )
    return problems


def _safecheck_table_key(key: str) -> str | None:
    try:
        return check_table_key(key)
    except ValueError:
        return None


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the configuration: ``env`` (default ``os.environ``) over the YAML file over defaults.

    The file is ``path``, else ``$CDC_CONFIG``, else none. Environment: ``CDC_SOURCE_DSN``,
    ``CDC_STORE_DSN`` and ``CDC_<SECTION>__<KEY>[__<KEY>...]`` (case-insensitive; lists are
    comma-separated). Raises one :class:`ConfigError` listing every problem.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    origins: dict[_Path, str] = {}
    file_data: dict[str, Any] = {}
    if path is None and env.get("CDC_CONFIG", "").strip():
        path = env["CDC_CONFIG"].strip()
    if path is not None:
        origin = str(path)
        file_data = _read_file(Path(path).expanduser(), origin, problems)
        origins.update((leaf, origin) for leaf in _leaves(file_data) if leaf)
    env_data, env_origins = _read_env(env, problems)
    for env_path in env_origins:  # env replaces whatever the file had at and below its path
        for stale in [p for p in origins if p[: len(env_path)] == env_path]:
            del origins[stale]
    origins.update(env_origins)
    data = _merge(file_data, env_data)

    config: Config | None = None
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for error in errors:
            loc = tuple(error["loc"])
            problems.append(f"{_format_path(loc)} (from {_origin(loc, origins)}): {_describe(error)}")
    if config is not None:
        problems.extend(_cross_checks(config, data, origins))
    if problems:
        raise ConfigError([redact_dsn(problem) for problem in problems])
    assert config is not None
    return config
