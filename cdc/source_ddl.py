"""Install, check and remove the schema-change event triggers on the SOURCE (sql/ddl.sql).

Event triggers need a superuser: ``install_ddl`` installs them only then, and says so otherwise
(history then follows schema changes through the Relation messages alone: docs/ddl.md). The
configuration (publication, rewrite snapshot limit, whether stored generated columns are
published) is written into small immutable functions, as for the context trigger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import psycopg
from psycopg import sql

__all__ = [
    "DDL_EVENT_TRIGGERS",
    "MODE_EVENT_TRIGGER",
    "MODE_RELATION_MESSAGES",
    "ddl_installed",
    "install_ddl",
    "uninstall_ddl",
]

#: (name, event, function) of the event triggers.
DDL_EVENT_TRIGGERS: Final = (
    ("cdc_ddl_end", "ddl_command_end", "cdc.ddl_command_end()"),
    ("cdc_ddl_drop", "sql_drop", "cdc.ddl_sql_drop()"),
    ("cdc_ddl_rewrite", "table_rewrite", "cdc.ddl_table_rewrite()"),
)
MODE_EVENT_TRIGGER: Final = "event trigger"
MODE_RELATION_MESSAGES: Final = "relation messages only"

_FUNCTIONS: Final = (
    "cdc.ddl_command_end()",
    "cdc.ddl_table_rewrite()",
    "cdc.ddl_sql_drop()",
    "cdc.ddl_seed_shapes()",
    "cdc.ddl_record_detached(oid, text)",
    "cdc.ddl_record(oid, text)",
    "cdc.ddl_was_rewritten(oid)",
    "cdc.ddl_snapshot(oid, jsonb, text, boolean)",
    "cdc.ddl_copy_field(anyelement)",
    "cdc.ddl_context()",
    "cdc.ddl_shape(oid)",
    "cdc.ddl_emit(text)",
    "cdc.ddl_confirm() CASCADE",
    "cdc.ddl_token()",
    "cdc.ddl_publishes_generated()",
    "cdc.ddl_publication()",
    "cdc.ddl_rewrite_max_rows()",
)


def ddl_sql() -> str:
    return (Path(__file__).parent / "sql" / "ddl.sql").read_text(encoding="utf-8")


def _is_superuser(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user").fetchone()
    return bool(row and row[0])


def install_ddl(
    conn: psycopg.Connection[Any],
    *,
    publication: str,
    rewrite_snapshot_max_rows: int,
    publishes_generated: bool,
) -> list[str]:
    """Install (or update) the schema-change event triggers; warnings for the operator.

    Runs after ``install_context`` (it uses its functions). Not superuser: nothing is installed.
    """
    if not _is_superuser(conn):
        return [
            "not superuser: no schema-change event trigger; history follows schema changes through "
            "Relation messages only (docs/ddl.md says what is then lost)"
        ]
    limit = max(0, int(rewrite_snapshot_max_rows))
    with conn.transaction():
        conn.execute(ddl_sql())
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION cdc.ddl_rewrite_max_rows() RETURNS bigint "
                "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $cfg$ SELECT {}::pg_catalog.int8 $cfg$"
            ).format(sql.Literal(limit))
        )
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION cdc.ddl_publication() RETURNS text "
                "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $cfg$ SELECT {}::pg_catalog.text $cfg$"
            ).format(sql.Literal(publication))
        )
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION cdc.ddl_publishes_generated() RETURNS boolean "
                "LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $cfg$ SELECT {} $cfg$"
            ).format(sql.SQL("true" if publishes_generated else "false"))
        )
        for name, event, function in DDL_EVENT_TRIGGERS:
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(
                sql.SQL("CREATE EVENT TRIGGER {} ON {} EXECUTE FUNCTION {}").format(
                    sql.Identifier(name), sql.SQL(event), sql.SQL(function)
                )
            )
        conn.execute("SELECT cdc.ddl_seed_shapes()")
    return []


def ddl_installed(conn: psycopg.Connection[Any]) -> bool:
    """Whether the schema-change event triggers are installed and enabled on this database."""
    row = conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_event_trigger WHERE evtname = ANY(%s) AND evtenabled <> 'D'",
        ([name for name, _, _ in DDL_EVENT_TRIGGERS],),
    ).fetchone()
    return bool(row and row[0] == len(DDL_EVENT_TRIGGERS))


def ddl_mode(conn: psycopg.Connection[Any]) -> str:
    """``event trigger`` or ``relation messages only`` (for `cdc status`)."""
    return MODE_EVENT_TRIGGER if ddl_installed(conn) else MODE_RELATION_MESSAGES


def uninstall_ddl(conn: psycopg.Connection[Any]) -> None:
    """Remove the event triggers, their functions and the shape mirror. Idempotent; the event
    triggers need a superuser (a role that is not one leaves them)."""
    with conn.transaction():
        if _is_superuser(conn):
            for name, _, _ in DDL_EVENT_TRIGGERS:
                conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
        elif ddl_installed(conn):
            return
        for signature in _FUNCTIONS:
            conn.execute(f"DROP FUNCTION IF EXISTS {signature}")
        conn.execute("DROP TABLE IF EXISTS cdc.ddl_shapes, cdc.ddl_pending")
