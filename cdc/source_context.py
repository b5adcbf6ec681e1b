"""Install, update and remove the request-context trigger on the SOURCE database.

``install_context`` runs ``sql/context.sql`` (idempotent), writes the configuration into the
small immutable functions the trigger reads (settings prefix, application_name pattern, extra
setting names, schemas the event trigger skips), attaches the statement-level trigger
``cdc_context`` to the given tables and, when the connecting role is superuser, installs the
event trigger ``cdc_context_attach`` that attaches it to tables created later. Everything runs
in one transaction under an advisory lock, so concurrent ``cdc setup`` runs do not collide.

See ``sql/context.sql`` for what the trigger emits and how it is kept cheap.

Cost, measured on PostgreSQL 15 with pgbench's TPC-B transaction (the trigger on its four
tables; server instructions per transaction under callgrind, simple query protocol, so the
figures do not depend on the machine's load; pgbench TPS figures: see the project's notes):

- no trigger: 724 k instructions per transaction;
- any PL/pgSQL statement trigger at all (an empty body): 765 k (+5.7 %);
- ``emit_none=False`` (no message for a transaction without a request): 810 k (+11.9 %);
- the default (a "none" message per transaction): 851 k (+17.5 %);
- ``SET LOCAL cdc.request_id`` in every transaction: 894 k against 746 k without the trigger
  (+19.8 %).

Most of it is PL/pgSQL's per-transaction initialization of each trigger's expressions (every
table's trigger is a separately compiled function), about a microsecond per function call in
an expression, which is why the fast path is one expression with six calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc.context import (
    DEFAULT_APPLICATION_NAME_PATTERN,
    DEFAULT_EXTRA_SETTINGS,
    MAX_EXTRA_KEYS,
    pattern_to_postgres,
    required_literal,
    validate_setting_name,
)
from cdc.errors import ConfigError, SetupError

__all__ = [
    "EVENT_TRIGGER_NAME",
    "TRIGGER_NAME",
    "context_installed",
    "context_sql",
    "context_tables",
    "install_context",
    "uninstall_context",
]

TRIGGER_NAME: Final = "cdc_context"
EVENT_TRIGGER_NAME: Final = "cdc_context_attach"
_LOCK_KEY: Final = "cdc.context.install"
_LOCK_TIMEOUT: Final = "5s"  # CREATE TRIGGER blocks writers on the table while it waits
_SYSTEM_SCHEMAS: Final = frozenset({"cdc", "pg_catalog", "information_schema", "pg_toast"})


def context_sql() -> str:
    """The text of ``sql/context.sql``."""
    # This module sits in the package directory, like cdc/__init__.py; cdc/sql -> ../sql.
    return (Path(__file__).parent / "sql" / "context.sql").read_text(encoding="utf-8")


def _e_literal(value: str) -> str:
    """An E'' string literal: read the same whatever standard_conforming_strings says."""
    if "\x00" in value:
        raise ConfigError([f"{value!r}: NUL characters are not allowed"])
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _text_array(values: Iterable[str]) -> str:
    items = [_e_literal(v) for v in values]
    if not items:
        return "'{}'::text[]"
    return "ARRAY[" + ", ".join(items) + "]::text[]"


def _app_match(pattern: str, pg_pattern: str) -> str:
    """The body of cdc.request_id_from_application_name(app): the regex, behind a strpos()
    prefilter when the pattern has a mandatory literal (the regex costs far more)."""
    match = f"nullif(pg_catalog.substring(app, {_e_literal(pg_pattern)}::pg_catalog.text), '')"
    literal = required_literal(pattern)
    if literal is None:
        return f"SELECT {match}"
    return (
        f"SELECT CASE WHEN pg_catalog.strpos(app, {_e_literal(literal)}::pg_catalog.text) "
        f"OPERATOR(pg_catalog.>) 0 THEN {match} END"
    )


def _extra_json(prefix: str, names: Sequence[str]) -> str:
    """The expression of cdc.context_extra_json(): one json_build_object, no loop (see context.sql)."""
    if not names:
        return "'{}'::pg_catalog.json"
    pairs = ", ".join(
        f"{_e_literal(name)}::pg_catalog.text, "
        f"nullif(pg_catalog.current_setting({_e_literal(prefix + '.' + name)}, true), '')"
        for name in names
    )
    return f"pg_catalog.json_build_object({pairs})"


def _extra_key(prefix: str, names: Sequence[str]) -> str:
    """The expression of cdc.context_extra_key(): the extra settings' part of the cache key."""
    if not names:
        return "''::pg_catalog.text"
    return " OPERATOR(pg_catalog.||) ".join(
        f"E'\\x1f' OPERATOR(pg_catalog.||) "
        f"coalesce(pg_catalog.current_setting({_e_literal(prefix + '.' + name)}, true), '')"
        for name in names
    )


def _config_function(name: str, returns: str, body: str, *, args: str = "", stable: bool = False) -> sql.SQL:
    tag = "$cdc_config$"
    if tag in body:
        raise ConfigError([f"configuration value contains {tag!r}"])
    volatility = "STABLE" if stable else "IMMUTABLE"
    return sql.SQL(
        f"CREATE OR REPLACE FUNCTION cdc.{name}({args}) RETURNS {returns}\n"
        f"LANGUAGE sql {volatility} PARALLEL SAFE\n"
        f"AS {tag} {body} {tag}"
    )


def _config_statements(
    *,
    application_name_pattern: str,
    settings_prefix: str,
    extra_settings: Sequence[str],
    exclude_schemas: Sequence[str],
    emit_none: bool,
) -> list[sql.SQL]:
    problems: list[str] = []
    try:
        prefix = validate_setting_name(settings_prefix, "settings_prefix")
    except ValueError as exc:
        problems.append(str(exc))
        prefix = "cdc"
    try:
        pg_pattern = pattern_to_postgres(application_name_pattern)
    except ConfigError as exc:
        problems.extend(exc.problems)
        pg_pattern = ""
    extras: list[str] = []
    for name in extra_settings:
        try:
            key = validate_setting_name(name, "extra setting")
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if key in ("request_id", "actor") or key.startswith("_"):
            problems.append(f"extra setting {name!r}: reserved name")
        elif key not in extras:
            extras.append(key)
    if len(extras) > MAX_EXTRA_KEYS:
        problems.append(f"extra settings: {len(extras)} names, at most {MAX_EXTRA_KEYS}")
    if problems:
        raise ConfigError(problems)
    return [
        _config_function("context_settings_prefix", "text", f"SELECT {_e_literal(prefix)}::pg_catalog.text"),
        _config_function(
            "request_id_from_application_name",
            "text",
            _app_match(application_name_pattern, pg_pattern),
            args="app text",
        ),
        _config_function(
            "context_config_id", "text", f"SELECT {_e_literal(uuid.uuid4().hex)}::pg_catalog.text"
        ),
        _config_function("context_emit_none", "boolean", f"SELECT {'true' if emit_none else 'false'}"),
        _config_function("context_extra_json", "json", f"SELECT {_extra_json(prefix, extras)}", stable=True),
        _config_function("context_extra_key", "text", f"SELECT {_extra_key(prefix, extras)}", stable=True),
        _config_function("context_excluded_schemas", "text[]", f"SELECT {_text_array(exclude_schemas)}"),
    ]


def _check_pattern(conn: psycopg.Connection[Any], pattern: str) -> None:
    """Compile the translated pattern now, so that the trigger never meets a bad one."""
    try:
        with conn.transaction():
            conn.execute(
                "SELECT pg_catalog.substring('', %s::pg_catalog.text)", [pattern_to_postgres(pattern)]
            )
    except (psycopg.errors.InvalidRegularExpression, psycopg.errors.ProgramLimitExceeded) as exc:
        raise ConfigError(
            [f"application_name pattern {pattern!r}: PostgreSQL refuses it: {exc.diag.message_primary}"]
        ) from None


def _is_superuser(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user").fetchone()
    return bool(row and row[0])


def install_context(
    conn: psycopg.Connection[Any],
    tables: list[tuple[str, str]],
    *,
    application_name_pattern: str = DEFAULT_APPLICATION_NAME_PATTERN,
    settings_prefix: str = "cdc",
    extra_settings: Sequence[str] = DEFAULT_EXTRA_SETTINGS,
    attach_new_tables: bool = True,
    exclude_schemas: Sequence[str] = (),
    emit_none: bool = True,
) -> list[str]:
    """Install or update the context trigger; return warnings for the operator.

    ``tables`` are (schema, table) pairs that get the trigger now. ``extra_settings`` are the
    ``<prefix>.<name>`` settings the trigger copies into ``extra`` (PostgreSQL cannot list
    custom settings, so the trigger reads a known list). With ``attach_new_tables`` and a
    superuser connection, tables created later get the trigger too, except in
    ``exclude_schemas`` (put the store's schema there when the store shares the database).

    Raises :class:`ConfigError` for a bad pattern, prefix or setting name (every problem at
    once) and :class:`SetupError` for missing tables or a lock that could not be taken.
    """
    config = _config_statements(
        application_name_pattern=application_name_pattern,
        settings_prefix=settings_prefix,
        extra_settings=extra_settings,
        exclude_schemas=exclude_schemas,
        emit_none=emit_none,
    )
    warnings: list[str] = []
    version = conn.info.server_version
    if version < 110000:
        raise SetupError(
            f"the source server is PostgreSQL {version // 10000}: the context trigger needs 11 or later"
        )
    if version < 140000:
        warnings.append(
            f"the source server is PostgreSQL {version // 10000}: pgoutput delivers the context "
            "messages only from PostgreSQL 14"
        )
    try:
        with conn.transaction():
            conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext(%s))", [_LOCK_KEY])
            conn.execute(context_sql())  # no parameters: sent as one simple-protocol script
            for statement in config:
                conn.execute(statement)
            _check_pattern(conn, application_name_pattern)
            warnings.extend(_attach(conn, tables))
            if _is_superuser(conn):
                conn.execute(
                    sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(EVENT_TRIGGER_NAME))
                )
                if attach_new_tables:
                    conn.execute(
                        sql.SQL(
                            "CREATE EVENT TRIGGER {} ON ddl_command_end"
                            " WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')"
                            " EXECUTE FUNCTION cdc.context_attach_new_tables()"
                        ).format(sql.Identifier(EVENT_TRIGGER_NAME))
                    )
            elif attach_new_tables:
                warnings.append("not superuser: tables created later need `cdc setup` again")
    except psycopg.errors.LockNotAvailable as exc:
        raise SetupError(
            f"could not take a lock to install the context trigger within {_LOCK_TIMEOUT}: {exc.diag.message_primary}",
            hint="a long transaction holds a lock on one of the tables; retry when it has finished",
        ) from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SetupError(
            f"not allowed to install the context trigger: {exc.diag.message_primary}",
            hint="run `cdc setup` as the owner of the captured tables (or a superuser)",
        ) from None
    return warnings


def _attach(conn: psycopg.Connection[Any], tables: Sequence[tuple[str, str]]) -> list[str]:
    warnings: list[str] = []
    missing: list[str] = []
    for schema, table in dict.fromkeys(tables):
        row = conn.execute(
            """
            SELECT c.oid, c.relkind, c.relpersistence,
                   EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                            WHERE t.tgrelid = c.oid AND t.tgname = %s
                              AND t.tgfoid = 'cdc.context_trigger()'::pg_catalog.regprocedure
                              AND t.tgtype = 62 AND t.tgenabled = 'O'
                              AND t.tgqual IS NULL AND t.tgnargs = 0)
              FROM pg_catalog.pg_class AS c
              JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
             WHERE n.nspname = %s AND c.relname = %s
            """,
            [TRIGGER_NAME, schema, table],
        ).fetchone()
        name = f"{schema}.{table}"
        if row is None:
            missing.append(name)
            continue
        _oid, relkind, persistence, attached = row
        if relkind not in ("r", "p"):
            warnings.append(f"{name} is not a table: no context trigger")
            continue
        if persistence != "p":
            warnings.append(
                f"{name} is {'unlogged' if persistence == 'u' else 'temporary'}: not captured, no trigger"
            )
            continue
        if schema in _SYSTEM_SCHEMAS:
            warnings.append(f"{name} is in a system schema: no context trigger")
            continue
        if attached:
            continue
        ident = sql.Identifier(schema, table)
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER_NAME), ident))
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {}"
                " FOR EACH STATEMENT EXECUTE FUNCTION cdc.context_trigger()"
            ).format(sql.Identifier(TRIGGER_NAME), ident)
        )
    if missing:
        raise SetupError(
            "no such table on the source: " + ", ".join(missing),
            hint="check the table list in the configuration",
        )
    return warnings


def uninstall_context(conn: psycopg.Connection[Any]) -> None:
    """Remove the triggers, the event trigger and the ``cdc`` functions installed here.

    The schema ``cdc`` itself is dropped only when nothing else is left in it (another part of
    cdc, or the user, may keep objects there). Idempotent.
    """
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
        conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext(%s))", [_LOCK_KEY])
        has_event_trigger = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = %s)",
            [EVENT_TRIGGER_NAME],
        ).fetchone()
        if has_event_trigger and has_event_trigger[0]:
            if not _is_superuser(conn):
                raise SetupError(
                    f"the event trigger {EVENT_TRIGGER_NAME} can only be dropped by a superuser",
                    hint="run `cdc teardown` as a superuser",
                )
            conn.execute(sql.SQL("DROP EVENT TRIGGER {}").format(sql.Identifier(EVENT_TRIGGER_NAME)))
        for schema, table in context_tables(conn):
            conn.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(
                    sql.Identifier(TRIGGER_NAME), sql.Identifier(schema, table)
                )
            )
        for signature in (
            "cdc.context_attach_new_tables()",
            "cdc.context_trigger()",
            "cdc.emit_cached_none()",
            "cdc.emit_and_cache_none()",
            "cdc.context_quiet()",
            "cdc.emit_application_name_context()",
            "cdc.emit_setting_context()",
            "cdc.context_message(text, text)",
            "cdc.context_cache_key()",
            "cdc.context_fingerprint()",
            "cdc.context_extra_key()",
            "cdc.context_extra_json()",
            "cdc.context_emit_none()",
            "cdc.context_config_id()",
            "cdc.context_excluded_schemas()",
            "cdc.request_id_from_application_name(text)",
            "cdc.context_settings_prefix()",
        ):
            # CASCADE: a trigger attached by hand under another name goes with the function
            conn.execute(f"DROP FUNCTION IF EXISTS {signature} CASCADE")
        conn.execute("DROP TYPE IF EXISTS cdc.context_message_t")
        try:
            with conn.transaction():
                conn.execute("DROP SCHEMA IF EXISTS cdc RESTRICT")
        except psycopg.errors.DependentObjectsStillExist:
            pass  # something else lives in schema cdc: leave it


def context_installed(conn: psycopg.Connection[Any]) -> bool:
    """Whether the context trigger function is installed on this database."""
    row = conn.execute("SELECT pg_catalog.to_regprocedure('cdc.context_trigger()') IS NOT NULL").fetchone()
    return bool(row and row[0])


def context_tables(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    """The (schema, table) pairs that carry the context trigger, sorted."""
    if not context_installed(conn):
        return []
    return tables_with_trigger(conn, "cdc.context_trigger()")


def tables_with_trigger(conn: psycopg.Connection[Any], function: str) -> list[tuple[str, str]]:
    """The (schema, table) pairs with a (user) trigger running ``function`` (its signature,
    which must exist), sorted."""
    rows = conn.execute(
        """
        SELECT n.nspname, c.relname
          FROM pg_catalog.pg_trigger AS t
          JOIN pg_catalog.pg_class AS c ON c.oid = t.tgrelid
          JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
         WHERE t.tgfoid = %s::pg_catalog.regprocedure AND NOT t.tgisinternal
         ORDER BY 1, 2
        """,
        (function,),
    ).fetchall()
    return [(str(schema), str(table)) for schema, table in rows]
