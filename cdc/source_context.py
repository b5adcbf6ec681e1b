"""Install, update and remove the request-context trigger on the SOURCE database.

``install_context`` runs ``sql/context.sql`` (idempotent), writes the configuration into the
small immutable functions the trigger reads (settings prefix, application_name pattern, extra
setting names, schemas the event trigger skips), creates the signing key of the context
messages when there is none (``cdc.context_key``), attaches the statement-level trigger
``cdc_context`` to the given tables and, when the connecting role is superuser, installs the
event trigger ``cdc_context_attach`` that attaches it to tables created later and revokes
``pg_logical_emit_message`` from PUBLIC. Everything runs in one transaction under an advisory
lock, so concurrent ``cdc setup`` runs do not collide. This module also reads the key for the
daemon (:func:`read_context_keys`), rotates it (:func:`rotate_context_key`) and reports the
state of signing (:func:`signing_status`); it never logs the key or a setting's value.

See ``sql/context.sql`` for what the trigger emits, how messages are signed and how it is kept
cheap, and docs/security.md for the trust model.

Cost, measured on PostgreSQL 15 with pgbench's TPC-B transaction (the trigger on its four
tables; server instructions per transaction under callgrind, ``postgres --single`` running 1000
transactions, simple query protocol, ``fsync=off``, so the figures do not depend on the
machine's load):

- no trigger: 633 k instructions per transaction (670 k with the two ``SET LOCAL`` statements);
- the default (a "none" message per transaction): 885 k (+40 %); before messages were signed
  (an unsigned "none" message cached in the session): 770 k;
- ``SET LOCAL cdc.request_id`` (and ``cdc.actor``) in every transaction: 918 k against 670 k
  without the trigger (+37 %); unsigned: 826 k. The signed emission costs 92 k instructions per
  request transaction (about 30 µs of one core), of which the SECURITY DEFINER call itself (its
  ``SET search_path``) is ~14 k, reading the key ~16 k, the two SHA-256 ~24 k, and setting up
  its expressions in each new transaction the rest;
- the client helper's round trip (``client.request``): 1,555 k against 1,526 k unsigned (+2 %).

On PostgreSQL 18 (same method): no trigger 560 k / 589 k; "none" 774 k (unsigned 672 k);
``SET LOCAL cdc.request_id`` 805 k (unsigned 719 k): +85 k per request transaction.

Most of the trigger's cost is PL/pgSQL's per-transaction initialization of each trigger's
expressions (every table's trigger is a separately compiled function), about a microsecond per
function call in an expression, which is why the fast path is one expression with six calls.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import psycopg
import structlog
from psycopg import sql

from cdc.context import (
    DEFAULT_APPLICATION_NAME_PATTERN,
    DEFAULT_EXTRA_SETTINGS,
    MAX_EXTRA_KEYS,
    ContextKeys,
    context_key_id,
    key_from_pad,
    key_pads,
    pattern_to_postgres,
    required_literal,
    validate_setting_name,
)
from cdc.errors import ConfigError, SetupError

__all__ = [
    "EVENT_TRIGGER_NAME",
    "TRIGGER_NAME",
    "SigningStatus",
    "context_installed",
    "context_sql",
    "context_tables",
    "ensure_context_key",
    "install_context",
    "read_context_keys",
    "rotate_context_key",
    "signing_status",
    "uninstall_context",
]

log = structlog.get_logger("cdc.source_context")

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
        _config_function("context_emit_none", "boolean", f"SELECT {'true' if emit_none else 'false'}"),
        _config_function("context_extra_json", "json", f"SELECT {_extra_json(prefix, extras)}", stable=True),
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
            ensure_context_key(conn)
            warnings.extend(_attach(conn, tables))
            if _is_superuser(conn):
                _revoke_emit_message(conn)
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
        _restore_emit_message(conn)
        for signature in (
            "cdc.context_attach_new_tables()",
            "cdc.context_trigger()",
            "cdc.emit_none_context()",
            "cdc.context_quiet()",
            "cdc.emit_application_name_context()",
            "cdc.emit_setting_context()",
            "cdc.context_actor()",
            "cdc.emit_context(text, text, json, text)",
            "cdc.report_error(text, text, text, text, text, text)",
            "cdc.session_proof(text, text, integer, bigint, bytea, bytea)",
            "cdc.context_fingerprint()",
            "cdc.context_extra_json()",
            "cdc.context_emit_none()",
            "cdc.context_excluded_schemas()",
            "cdc.request_id_from_application_name(text)",
            "cdc.context_settings_prefix()",
            # earlier versions
            "cdc.sign_message(bytea, bytea, bytea, bytea)",
            "cdc.emit_cached_none()",
            "cdc.emit_and_cache_none()",
            "cdc.context_message(text, text)",
            "cdc.context_cache_key()",
            "cdc.context_extra_key()",
            "cdc.context_config_id()",
        ):
            # CASCADE: a trigger attached by hand under another name goes with the function
            conn.execute(f"DROP FUNCTION IF EXISTS {signature} CASCADE")
        for type_name in ("cdc.context_body_t", "cdc.error_body_t", "cdc.context_message_t"):
            conn.execute(f"DROP TYPE IF EXISTS {type_name}")
        conn.execute("DROP TABLE IF EXISTS cdc.context_key")
        try:
            with conn.transaction():
                conn.execute("DROP SCHEMA IF EXISTS cdc RESTRICT")
        except psycopg.errors.DependentObjectsStillExist:
            pass  # something else lives in schema cdc: leave it


# ============================================================================ the signing key


@dataclass(frozen=True)
class SigningStatus:
    """What `cdc setup` and `cdc status` say about message signing on the source."""

    key_id: str | None  # None: no key (setup not run, or the role cannot read it)
    previous_key_id: str | None
    emit_revoked: bool  # pg_logical_emit_message() is not executable by PUBLIC
    problem: str | None = None

    def describe(self) -> str:
        if self.key_id is None:
            return f"context messages: NOT SIGNED ({self.problem or 'no key'}): run `cdc setup`"
        text = f"context messages signed (key {self.key_id}"
        text += f", previous {self.previous_key_id} still accepted)" if self.previous_key_id else ")"
        if self.emit_revoked:
            return text + "; pg_logical_emit_message revoked from PUBLIC"
        return (
            text + "; pg_logical_emit_message executable by PUBLIC (not superuser at setup): forged "
            "messages are refused by their MAC"
        )


def _new_key_row(conn: psycopg.Connection[Any], *, rotate: bool) -> str:
    key = secrets.token_bytes(32)
    ipad, opad = key_pads(key)
    key_id = context_key_id(key)
    if rotate:
        conn.execute(
            "UPDATE cdc.context_key SET previous_key_id = key_id, previous_ipad = ipad, previous_opad = opad, "
            "key_id = %s, ipad = %s, opad = %s, created_at = pg_catalog.now()",
            [key_id, ipad, opad],
        )
    else:
        conn.execute(
            "INSERT INTO cdc.context_key (key_id, ipad, opad) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            [key_id, ipad, opad],
        )
    return key_id


def ensure_context_key(conn: psycopg.Connection[Any]) -> str:
    """Create the signing key when there is none; return its id. (Inside install_context's
    transaction: the table comes from context.sql.)"""
    row = conn.execute("SELECT key_id FROM cdc.context_key").fetchone()
    if row is not None:
        return str(row[0])
    return _new_key_row(conn, rotate=False)


def rotate_context_key(conn: psycopg.Connection[Any]) -> SigningStatus:
    """A new signing key; the current one becomes the previous one, still accepted (a key two
    rotations old is gone: rotate twice to retire a leaked key at once). The daemon picks the new
    key up at its next session, or at once when a message signed with it arrives."""
    if not context_installed(conn):
        raise SetupError("the context trigger is not installed on the source", hint="run `cdc setup` first")
    try:
        with conn.transaction():
            conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext(%s))", [_LOCK_KEY])
            if conn.execute("SELECT 1 FROM cdc.context_key").fetchone() is None:
                _new_key_row(conn, rotate=False)
            else:
                _new_key_row(conn, rotate=True)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SetupError(
            f"not allowed to rotate the context key: {exc.diag.message_primary}",
            hint="run it as the role that ran `cdc setup` (it owns cdc.context_key)",
        ) from None
    log.info("context_key_rotated")
    return signing_status(conn)


def read_context_keys(conn: psycopg.Connection[Any]) -> ContextKeys | None:
    """The keys the daemon verifies messages with; None when there are none it may read."""
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT key_id, ipad, previous_key_id, previous_ipad FROM cdc.context_key"
            ).fetchone()
    except (
        psycopg.errors.UndefinedTable,
        psycopg.errors.InvalidSchemaName,
        psycopg.errors.InsufficientPrivilege,
    ):
        return None
    if row is None:
        return None
    return ContextKeys(
        key=key_from_pad(bytes(row[1])),
        key_id=str(row[0]),
        previous=key_from_pad(bytes(row[3])) if row[3] is not None else None,
        previous_key_id=str(row[2]) if row[2] is not None else None,
    )


def _emit_message_functions(conn: psycopg.Connection[Any]) -> list[str]:
    """Every signature of pg_logical_emit_message (text and bytea; PG17+ with flush)."""
    rows = conn.execute(
        "SELECT p.oid::pg_catalog.regprocedure::pg_catalog.text FROM pg_catalog.pg_proc AS p "
        "WHERE p.proname = 'pg_logical_emit_message' "
        "AND p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace ORDER BY 1"
    ).fetchall()
    return [str(r[0]) for r in rows]


def _revoke_emit_message(conn: psycopg.Connection[Any]) -> None:
    """Superuser setup: only the setup role (the signing functions' owner) keeps
    pg_logical_emit_message. Defense in depth: the MAC is what the daemon relies on."""
    for signature in _emit_message_functions(conn):
        conn.execute(f"REVOKE EXECUTE ON FUNCTION {signature} FROM PUBLIC")
        conn.execute(
            sql.SQL(f"GRANT EXECUTE ON FUNCTION {signature} TO {{}}").format(sql.Identifier(conn.info.user))
        )
    conn.execute("UPDATE cdc.context_key SET emit_revoked = true WHERE NOT emit_revoked")


def _restore_emit_message(conn: psycopg.Connection[Any]) -> None:
    """Teardown: give pg_logical_emit_message back to PUBLIC if setup took it (and only then)."""
    exists = conn.execute("SELECT pg_catalog.to_regclass('cdc.context_key') IS NOT NULL").fetchone()
    if not (exists and exists[0]):
        return
    row = conn.execute("SELECT emit_revoked FROM cdc.context_key").fetchone()
    if row is None or not row[0]:
        return
    if not _is_superuser(conn):
        raise SetupError(
            "setup revoked pg_logical_emit_message from PUBLIC; only a superuser can give it back",
            hint="run `cdc teardown` as a superuser",
        )
    for signature in _emit_message_functions(conn):
        conn.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO PUBLIC")


def signing_status(conn: psycopg.Connection[Any]) -> SigningStatus:
    """Whether context messages are signed on this source, with which key, and whether
    pg_logical_emit_message is still executable by PUBLIC."""
    public = conn.execute(
        "SELECT pg_catalog.bool_or(pg_catalog.has_function_privilege('public', p.oid, 'EXECUTE')) "
        "FROM pg_catalog.pg_proc AS p WHERE p.proname = 'pg_logical_emit_message' "
        "AND p.pronamespace = 'pg_catalog'::pg_catalog.regnamespace"
    ).fetchone()
    revoked = not (public and public[0])
    try:
        with conn.transaction():
            row = conn.execute("SELECT key_id, previous_key_id FROM cdc.context_key").fetchone()
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        return SigningStatus(None, None, revoked, "cdc.context_key does not exist")
    except psycopg.errors.InsufficientPrivilege:
        return SigningStatus(None, None, revoked, "this role may not read cdc.context_key")
    if row is None:
        return SigningStatus(None, None, revoked, "cdc.context_key is empty")
    return SigningStatus(str(row[0]), None if row[1] is None else str(row[1]), revoked)


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
