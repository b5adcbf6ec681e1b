"""The publications cdc streams from, and tables without a replica identity (docs/baseline.md).

PostgreSQL refuses an application's UPDATE or DELETE on a table published for UPDATE/DELETE that
has no replica identity. cdc never publishes a table that way; ``source.keyless_tables`` says
what it does instead: ``full`` sets REPLICA IDENTITY FULL, ``inserts_only`` (the default) puts the
table in a second publication, ``<publication>_inserts`` (publish = 'insert, truncate'), ``skip``
leaves it out. With ``source.tables`` empty and a keyless mode other than ``full``, the first
publication is cdc's list of every table (``managed``); tables created later join it (or the
second one) inside their CREATE TABLE's transaction through the event trigger
``cdc_a_publication_sync`` (sql/publication.sql; superuser only), or else through the daemon's
periodic check (:func:`check_tables`), which also reports every table whose changes are not all
captured.

A publication created after the slot can be decoded only from a WAL position on which it
exists: ``capture_publications.usable_from`` in the store; the daemon streams from it once the
slot's ``restart_lsn`` has passed that point (:func:`stream_publications`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql

import cdc
from cdc.config import Config, format_table
from cdc.errors import SetupError, SourceUnavailableError, error_text
from cdc.lsn import parse_lsn

log = structlog.get_logger("cdc.publications")

SQL_FILE = Path(cdc.__file__).parent / "sql" / "publication.sql"
# Event triggers fire in the order of their names: this one before the schema-change ones
# (``cdc_ddl_*``, cdc/source_ddl.py), so a table the DDL brought into the publication is
# published when they look. (Named ``cdc_publication_sync`` before: dropped where found.)
EVENT_TRIGGER = "cdc_a_publication_sync"
_FORMER_EVENT_TRIGGER = "cdc_publication_sync"
_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast", "cdc")
_LOCK_TIMEOUT = "5s"

Conn = psycopg.Connection[Any]


def inserts_publication(publication: str) -> str:
    """The second publication: keyless tables' INSERTs and TRUNCATEs."""
    return f"{publication}_inserts"


@dataclass(frozen=True, slots=True)
class Candidate:
    oid: int
    schema: str
    name: str
    keyed: bool  # has a replica identity (UPDATE/DELETE can be published)

    @property
    def qualified(self) -> str:
        return format_table(self.schema, self.name)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass
class PublicationResult:
    """What setup did to the publications."""

    description: str
    names: list[str]  # the publications capture streams from (the first one first)
    joined: list[int] = field(default_factory=list)  # oids that joined capture now (rows to backfill)
    warnings: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    managed: bool = False
    inserts_created: bool = False
    #: "all": FOR ALL TABLES (or every schema); "managed": cdc's list of every table; "list":
    #: source.tables, or a list made otherwise: a table in it with no baseline needs a backfill
    kind: str = "list"


# ============================================================================ catalog


def _is_superuser(conn: Conn) -> bool:
    row = conn.execute("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user").fetchone()
    return bool(row and row[0])


def _identity_sql(alias: str) -> str:
    return (
        f"CASE {alias}.relreplident WHEN 'f' THEN true "
        f"WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i WHERE i.indrelid = {alias}.oid "
        "AND i.indisprimary) "
        f"WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i WHERE i.indrelid = {alias}.oid "
        "AND i.indisreplident) ELSE false END"
    )


def all_tables(conn: Conn, exclude: tuple[str, ...]) -> list[Candidate]:
    """Every permanent user table a FOR ALL TABLES publication would cover (partitioned tables
    by their root: a partition is published through it)."""
    rows = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, "
        + _identity_sql("c")
        + " FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' AND NOT c.relispartition "
        "AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%' ORDER BY n.nspname, c.relname",
        (list(_SYSTEM_SCHEMAS + exclude),),
    ).fetchall()
    return [Candidate(int(r[0]), str(r[1]), str(r[2]), bool(r[3])) for r in rows]


def named_tables(conn: Conn, names: tuple[str, ...]) -> list[Candidate]:
    """The tables of ``source.tables`` (canonical ``schema.name``); SetupError names missing ones."""
    found: list[Candidate] = []
    missing: list[str] = []
    for name in names:
        schema, table = name.split(".", 1)
        row = conn.execute(
            "SELECT c.oid, n.nspname, c.relname, "
            + _identity_sql("c")
            + " FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, table),
        ).fetchone()
        if row is None:
            missing.append(name)
        else:
            found.append(Candidate(int(row[0]), str(row[1]), str(row[2]), bool(row[3])))
    if missing:
        raise SetupError(
            "no such table on the source: " + ", ".join(missing),
            hint="check source.tables in the configuration",
        )
    return found


def members(conn: Conn, publication: str) -> set[int]:
    """Relation oids listed in a (list) publication (not its partitions)."""
    rows = conn.execute(
        "SELECT r.prrelid FROM pg_catalog.pg_publication_rel AS r "
        "JOIN pg_catalog.pg_publication AS p ON p.oid = r.prpubid WHERE p.pubname = %s",
        (publication,),
    ).fetchall()
    return {int(r[0]) for r in rows}


def _publication(conn: Conn, name: str) -> tuple[bool, bool, bool] | None:
    """(all tables, tables in schema, ours to change) of a publication, None when it does not exist."""
    row = conn.execute(
        "SELECT p.puballtables, EXISTS (SELECT 1 FROM pg_catalog.pg_publication_namespace AS s "
        "WHERE s.pnpubid = p.oid), pg_catalog.pg_has_role(current_user, p.pubowner, 'USAGE') "
        "FROM pg_catalog.pg_publication AS p WHERE p.pubname = %s",
        (name,),
    ).fetchone()
    if row is None:
        return None
    return bool(row[0]), bool(row[1]), bool(row[2]) or _is_superuser(conn)


def publication_kind(conn: Conn, publication: str) -> str | None:
    """ "all", "managed" or "list" (see PublicationResult.kind); None: no such publication."""
    state = _publication(conn, publication)
    if state is None:
        return None
    if state[0] or state[1]:
        return "all"
    return "managed" if _managed(conn, publication) else "list"


def sync_config(conn: Conn) -> list[tuple[str, str, str, bool, list[str]]]:
    """The rows of ``cdc.publication_sync_config()`` (none when it is not installed)."""
    exists = conn.execute("SELECT to_regprocedure('cdc.publication_sync_config()') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return []
    rows = conn.execute(
        "SELECT publication, inserts_publication, keyless, managed, excluded_schemas "
        "FROM cdc.publication_sync_config()"
    ).fetchall()
    return [(str(r[0]), str(r[1]), str(r[2]), bool(r[3]), list(r[4] or ())) for r in rows]


def _config_row(conn: Conn, publication: str) -> tuple[str, str, str, bool, list[str]] | None:
    for row in sync_config(conn):
        if row[0] == publication:
            return row
    return None


def _managed(conn: Conn, publication: str) -> bool:
    row = _config_row(conn, publication)
    return bool(row and row[3])


# ============================================================================ setup


def _set_members(conn: Conn, publication: str, wanted: list[Candidate]) -> None:
    """Make the list publication list exactly ``wanted``."""
    have = members(conn, publication)
    want = {c.oid: c for c in wanted}
    gone = [oid for oid in have if oid not in want]
    if gone:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(_regclass(conn, o) for o in gone)
            )
        )
    added = [c for oid, c in want.items() if oid not in have]
    if added:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(publication), sql.SQL(", ").join(c.ident for c in added)
            )
        )


def published(conn: Conn, publications: list[str]) -> set[int]:
    """Oids of the tables (leaves) the publications publish."""
    rows = conn.execute(
        "SELECT DISTINCT c.oid FROM pg_catalog.pg_publication_tables AS t "
        "JOIN pg_catalog.pg_namespace AS n ON n.nspname = t.schemaname "
        "JOIN pg_catalog.pg_class AS c ON c.relnamespace = n.oid AND c.relname = t.tablename "
        "WHERE t.pubname = ANY(%s)",
        (publications,),
    ).fetchall()
    return {int(r[0]) for r in rows}


def _member_tables(conn: Conn, publication: str) -> list[Candidate]:
    rows = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, "
        + _identity_sql("c")
        + " FROM pg_catalog.pg_publication_rel AS r JOIN pg_catalog.pg_publication AS p ON p.oid = r.prpubid "
        "JOIN pg_catalog.pg_class AS c ON c.oid = r.prrelid "
        "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace WHERE p.pubname = %s "
        "ORDER BY n.nspname, c.relname",
        (publication,),
    ).fetchall()
    return [Candidate(int(r[0]), str(r[1]), str(r[2]), bool(r[3])) for r in rows]


def _regclass(conn: Conn, oid: int) -> sql.Composable:
    row = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_catalog.pg_class AS c "
        "JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = %s",
        (oid,),
    ).fetchone()
    assert row is not None
    return sql.Identifier(str(row[0]), str(row[1]))


def _create_list(conn: Conn, publication: str, tables: list[Candidate], publish: str | None = None) -> None:
    with_clause = sql.SQL(" WITH (publish = {})").format(sql.Literal(publish)) if publish else sql.SQL("")
    if tables:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {}{}").format(
                sql.Identifier(publication), sql.SQL(", ").join(c.ident for c in tables), with_clause
            )
        )
    else:
        conn.execute(sql.SQL("CREATE PUBLICATION {}{}").format(sql.Identifier(publication), with_clause))


def _replica_identity_full(conn: Conn, tables: list[Candidate], result: PublicationResult) -> list[Candidate]:
    """REPLICA IDENTITY FULL on ``tables`` (source.keyless_tables: full); those it could not set."""
    failed = []
    for table in tables:
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                conn.execute(sql.SQL("ALTER TABLE {} REPLICA IDENTITY FULL").format(table.ident))
            result.steps.append(f"source: {table.qualified} has no primary key: REPLICA IDENTITY FULL set")
        except psycopg.Error as exc:
            failed.append(table)
            result.warnings.append(
                f"{table.qualified} has no primary key and REPLICA IDENTITY FULL could not be set "
                f"({error_text(exc)}): it is left out of capture"
            )
    return failed


def ensure_publications(
    conn: Conn, config: Config, exclude_schema: str | None, *, slot_exists: bool
) -> PublicationResult:
    """Create or align the publications (autocommit ``conn``); never one that would publish
    UPDATE/DELETE of a table without a replica identity when cdc may change it.

    ``joined``: the tables capture covers from now on that it did not before (with ``slot_exists``,
    their rows need a backfill)."""
    main = config.source.publication
    second = inserts_publication(main)
    mode = config.source.keyless_tables
    explicit = tuple(config.source.tables)
    exclude = (exclude_schema,) if exclude_schema else ()
    state = _publication(conn, main)
    result = PublicationResult("", [main])
    if state is not None and not state[2]:
        # Someone else's publication (an administrator's, docs/security.md): used as it is.
        result.description = "as its owner made it"
        result.kind = publication_kind(conn, main) or "list"
        result.warnings.extend(_dangerous_warnings(conn, [main]))
        return result
    was_all = state is not None and (state[0] or state[1])
    if explicit:
        kind = "list"
        candidates = named_tables(conn, explicit)
    elif state is None and not _is_superuser(conn):
        # PostgreSQL's own rule for FOR ALL TABLES; cdc's list of every table needs as much.
        raise SetupError(
            "a privilege is missing: must be superuser to create FOR ALL TABLES publication "
            "(source.tables is empty: cdc publishes every table)",
            hint="set source.tables to tables the role owns, or have an administrator create the "
            "publication and grant what sql/grants.sql lists (docs/security.md)",
        )
    elif state is None or was_all:
        kind = "all" if mode == "full" else "managed"
        candidates = all_tables(conn, exclude)
    elif _managed(conn, main):
        kind = "managed"
        candidates = all_tables(conn, exclude)
    else:
        kind = "as_is"  # a list cdc did not make for "all tables": its tables, made safe
        candidates = _member_tables(conn, main) + _member_tables(conn, second)
    result.kind = "list" if kind == "as_is" else kind
    before = published(conn, [main, second]) if state is not None else set()
    keyless = [c for c in candidates if not c.keyed]
    if keyless and mode == "full":
        left_out = {c.oid for c in _replica_identity_full(conn, keyless, result)}
        candidates = [Candidate(c.oid, c.schema, c.name, c.oid not in left_out) for c in candidates]
        keyless = [c for c in candidates if not c.keyed]
    keyed = [c for c in candidates if c.keyed]
    second_wanted = keyless if mode == "inserts_only" else []
    with conn.transaction():
        if kind == "all":
            if state is None:
                _create_all(conn, main, exclude)
            result.description = "all tables" if not exclude else f"every schema but {exclude_schema}"
        else:
            if state is None:
                _create_list(conn, main, keyed)
            elif was_all:
                # A FOR ALL TABLES (or schema) publication becomes a list: dropped and created in
                # one transaction, so no WAL position is without it.
                conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(main)))
                _create_list(conn, main, keyed)
            else:
                _set_members(conn, main, keyed)
            result.managed = kind == "managed"
            result.description = (
                f"every table with a replica identity ({len(keyed)}), kept up to date"
                if result.managed
                else ", ".join(c.qualified for c in keyed) or "no table yet"
            )
        # The second publication exists whenever cdc manages the first: a slot created later
        # can decode with it from its first position.
        if _publication(conn, second) is None:
            _create_list(conn, second, second_wanted, publish="insert, truncate")
            result.inserts_created = True
        else:
            _set_members(conn, second, second_wanted)
    result.names.append(second)
    if second_wanted:
        result.steps.append(
            f"source: {len(second_wanted)} table(s) without a primary key: only their INSERTs and "
            f"TRUNCATEs are captured (publication {second}; source.keyless_tables)"
        )
    if keyless and mode == "skip":
        result.warnings.append(
            "not captured (no primary key; source.keyless_tables: skip): "
            + ", ".join(c.qualified for c in keyless)
        )
    after = published(conn, [main, second])
    if state is not None:
        joined = after - before
        if result.inserts_created and slot_exists:
            # Decoded only once the slot has passed its creation: their inserts until then are lost.
            joined |= published(conn, [second])
        result.joined = sorted(joined)
    _save_config(conn, config, second, managed=result.managed, exclude=exclude)
    result.warnings.extend(_install_event_trigger(conn, needed=result.managed or mode == "full"))
    result.warnings.extend(_dangerous_warnings(conn, result.names))
    return result


def _create_all(conn: Conn, publication: str, exclude: tuple[str, ...]) -> None:
    if not exclude:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(publication)))
        return
    # The store lives in this database: publish every schema but the store's, so its own
    # writes are never captured back.
    schemas = [
        str(r[0])
        for r in conn.execute(
            "SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname NOT LIKE 'pg\\_%%' "
            "AND nspname <> ALL(%s) ORDER BY 1",
            (list(_SYSTEM_SCHEMAS + exclude),),
        ).fetchall()
    ]
    conn.execute(
        sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}").format(
            sql.Identifier(publication), sql.SQL(", ").join(sql.Identifier(s) for s in schemas)
        )
    )


def _write_config(conn: Conn, rows: list[tuple[str, str, str, bool, list[str]]]) -> None:
    """``cdc.publication_sync_config()`` returning ``rows`` (literals: no parameter in a body)."""
    if rows:
        body: sql.Composable = sql.SQL(" UNION ALL ").join(
            sql.SQL("SELECT {}::text, {}::text, {}::text, {}::boolean, {}::text[]").format(
                sql.Literal(p), sql.Literal(i), sql.Literal(k), sql.Literal(m), sql.Literal(list(e))
            )
            for p, i, k, m, e in rows
        )
    else:
        body = sql.SQL("SELECT NULL::text, NULL::text, NULL::text, NULL::boolean, NULL::text[] WHERE false")
    conn.execute(
        sql.SQL(
            "CREATE OR REPLACE FUNCTION cdc.publication_sync_config(OUT publication text, "
            "OUT inserts_publication text, OUT keyless text, OUT managed boolean, OUT excluded_schemas text[]) "
            "RETURNS SETOF record LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS {}"
        ).format(sql.Literal(body.as_string(conn)))
    )


def _save_config(conn: Conn, config: Config, second: str, *, managed: bool, exclude: tuple[str, ...]) -> None:
    with conn.transaction():
        previous = [r for r in sync_config(conn) if r[0] != config.source.publication]
        conn.execute(SQL_FILE.read_bytes())  # a trusted file shipped with the package
        mine = (config.source.publication, second, config.source.keyless_tables, managed, list(exclude))
        _write_config(conn, [*previous, mine])


def _install_event_trigger(conn: Conn, *, needed: bool) -> list[str]:
    if not _is_superuser(conn):
        if needed:
            return [
                "not superuser: tables created later join capture through the daemon's periodic check "
                "(until then an UPDATE on a new table without a primary key may fail); a superuser's "
                "`cdc setup` installs the event trigger that does it at once"
            ]
        return []
    with conn.transaction():
        for name in (EVENT_TRIGGER, _FORMER_EVENT_TRIGGER):
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(
            sql.SQL(
                "CREATE EVENT TRIGGER {} ON ddl_command_end "
                "WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE') "
                "EXECUTE FUNCTION cdc.publication_sync()"
            ).format(sql.Identifier(EVENT_TRIGGER))
        )
    return []


def uninstall_publications(conn: Conn, publication: str) -> None:
    """`cdc teardown`: the second publication and the configuration row; the event trigger and
    the functions once no configuration is left."""
    conn.execute(
        sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(inserts_publication(publication)))
    )
    rows = sync_config(conn)
    if not rows:
        return
    left = [r for r in rows if r[0] != publication]
    if left:
        _write_config(conn, left)
        return
    if _is_superuser(conn):
        for name in (EVENT_TRIGGER, _FORMER_EVENT_TRIGGER):
            conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
    for signature in (
        "cdc.publication_sync()",
        "cdc.publication_sync_table(oid)",
        "cdc.publication_member(text, oid, boolean)",
        "cdc.has_replica_identity(oid)",
        "cdc.publication_sync_config()",
    ):
        conn.execute(f"DROP FUNCTION IF EXISTS {signature} CASCADE")


# ============================================================================ checks


@dataclass(frozen=True, slots=True)
class PartialTable:
    """A table whose changes are not all captured, and why."""

    table: str
    reason: str  # "updates_fail" | "inserts_only" | "not_captured"
    detail: str

    def as_json(self) -> dict[str, str]:
        return {"table": self.table, "reason": self.reason, "detail": self.detail}


def _dangerous(conn: Conn, publications: list[str]) -> list[tuple[int, str]]:
    """Published tables (leaves) whose UPDATE or DELETE the source refuses: no replica identity."""
    rows = conn.execute(
        "SELECT DISTINCT c.oid, pg_catalog.format('%%I.%%I', t.schemaname, t.tablename) "
        "FROM pg_catalog.pg_publication_tables AS t "
        "JOIN pg_catalog.pg_publication AS p ON p.pubname = t.pubname "
        "JOIN pg_catalog.pg_namespace AS n ON n.nspname = t.schemaname "
        "JOIN pg_catalog.pg_class AS c ON c.relnamespace = n.oid AND c.relname = t.tablename "
        "WHERE t.pubname = ANY(%s) AND (p.pubupdate OR p.pubdelete) AND NOT " + _identity_sql("c"),
        (publications,),
    ).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def _dangerous_warnings(conn: Conn, publications: list[str]) -> list[str]:
    return [
        f"{name} has no replica identity and is published for UPDATE and DELETE: the application's "
        f"UPDATE and DELETE on it FAIL; run `ALTER TABLE {name} REPLICA IDENTITY FULL;` or set "
        "source.keyless_tables and run `cdc setup` as the publication's owner"
        for _, name in _dangerous(conn, publications)
    ]


def partial_tables(conn: Conn, config: Config) -> list[PartialTable]:
    """Every table whose changes are not all captured (the source's catalog now)."""
    main = config.source.publication
    second = inserts_publication(main)
    found = [
        PartialTable(name, "updates_fail", "no replica identity, published for UPDATE/DELETE: they fail")
        for _, name in _dangerous(conn, [main, second])
    ]
    inserts_only = conn.execute(
        "SELECT pg_catalog.format('%%I.%%I', t.schemaname, t.tablename) FROM pg_catalog.pg_publication_tables t "
        "WHERE t.pubname = %s AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables m "
        "WHERE m.pubname = %s AND m.schemaname = t.schemaname AND m.tablename = t.tablename) ORDER BY 1",
        (second, main),
    ).fetchall()
    found.extend(
        PartialTable(
            str(r[0]), "inserts_only", "no primary key: INSERT and TRUNCATE captured, UPDATE and DELETE not"
        )
        for r in inserts_only
    )
    config_row = _config_row(conn, main)
    if config_row is not None and config_row[3]:
        exclude = tuple(config_row[4])
        published = members(conn, main) | members(conn, second)
        for table in all_tables(conn, exclude):
            if table.oid in published:
                continue
            if table.keyed or config.source.keyless_tables != "skip":
                found.append(PartialTable(table.qualified, "not_captured", "not in the publication yet"))
            else:
                found.append(
                    PartialTable(
                        table.qualified, "not_captured", "no primary key (source.keyless_tables: skip)"
                    )
                )
    return found


def check_tables(conn: Conn, config: Config) -> tuple[list[PartialTable], list[str]]:
    """The daemon's periodic check: repair what it may (tables created without the event trigger,
    keys dropped), then report what is still not fully captured. (partial tables, repairs done)."""
    repairs: list[str] = []
    main = config.source.publication
    if _publication(conn, main) is None:
        return [], repairs
    installed = conn.execute(
        "SELECT to_regprocedure('cdc.publication_sync_table(oid)') IS NOT NULL"
    ).fetchone()
    if installed and installed[0]:
        candidates: list[int] = [oid for oid, _ in _dangerous(conn, [main, inserts_publication(main)])]
        config_row = _config_row(conn, main)
        if config_row is not None and config_row[3]:
            exclude = tuple(config_row[4])
            published = members(conn, main) | members(conn, inserts_publication(main))
            candidates += [
                t.oid
                for t in all_tables(conn, exclude)
                if t.oid not in published and (t.keyed or config.source.keyless_tables == "inserts_only")
            ]
        for oid in dict.fromkeys(candidates):
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                    name = conn.execute("SELECT %s::oid::regclass::text", (oid,)).fetchone()
                    conn.execute("SELECT cdc.publication_sync_table(%s)", (oid,))
                repairs.append(str(name[0]) if name else str(oid))
            except psycopg.Error as exc:
                log.warning("publication_repair_failed", relation_oid=oid, error=error_text(exc))
    return partial_tables(conn, config), repairs


# ============================================================================ streaming


def record_publications(
    store: Conn, source: Conn, slot: str, result: PublicationResult, *, slot_created_after: bool
) -> None:
    """``capture_publications`` rows for the publications beyond the first (store schema on the
    search_path): usable from 0 when the slot is (re)created after them, else from now."""
    for name in result.names[1:]:
        usable = 0
        if not slot_created_after and result.inserts_created:
            row = source.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            usable = parse_lsn(row[0]) if row else 0
        store.execute(
            "INSERT INTO capture_publications (slot_name, publication, usable_from) VALUES (%s, %s, %s) "
            "ON CONFLICT (slot_name, publication) DO UPDATE SET usable_from = CASE WHEN %s THEN 0 "
            "ELSE capture_publications.usable_from END",
            (slot, name, usable, slot_created_after),
        )


def stream_publications(store: Conn, source: Conn, slot: str, main: str) -> tuple[list[str], list[str]]:
    """(publications to stream from now, those the slot cannot decode with yet)."""
    exists = store.execute("SELECT to_regclass('capture_publications') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return [main], []
    rows = store.execute(
        "SELECT publication, usable_from FROM capture_publications WHERE slot_name = %s ORDER BY publication",
        (slot,),
    ).fetchall()
    slot_row = source.execute(
        "SELECT restart_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    restart = parse_lsn(slot_row[0]) if slot_row and slot_row[0] else 0
    names, waiting = [main], []
    for name, usable in rows:
        if _publication(source, str(name)) is None:
            continue
        if int(usable) == 0 or restart >= int(usable):
            names.append(str(name))
        else:
            waiting.append(str(name))
    return names, waiting


def mark_streamed(store: Conn, slot: str, names: list[str]) -> None:
    """The session streams from ``names`` from now on (and every later one will): a backfill
    of their tables may start (``usable_from`` 0)."""
    store.execute(
        "UPDATE capture_publications SET usable_from = 0 WHERE slot_name = %s AND publication = ANY(%s) "
        "AND usable_from <> 0",
        (slot, names),
    )


def streamed(store: Conn, source: Conn, slot: str, main: str, relation_oid: int) -> list[str]:
    """The publications the daemon streams from that publish the table (empty: none yet; the
    table's changes are not decoded, a backfill of it must wait)."""
    rows = source.execute(
        "SELECT DISTINCT t.pubname FROM pg_catalog.pg_publication_tables AS t "
        "JOIN pg_catalog.pg_namespace AS n ON n.nspname = t.schemaname "
        "JOIN pg_catalog.pg_class AS c ON c.relnamespace = n.oid AND c.relname = t.tablename "
        "WHERE c.oid = %s",
        (relation_oid,),
    ).fetchall()
    found = {str(r[0]) for r in rows}
    if main in found:
        return [main]
    usable = store.execute(
        "SELECT publication FROM capture_publications WHERE slot_name = %s AND usable_from = 0 "
        "AND publication = ANY(%s)",
        (slot, sorted(found)),
    ).fetchall()
    return [str(r[0]) for r in usable]


def session_publications(config: Config, source_dsn: str, store_dsn: str) -> list[str]:
    """The publications a capture session streams from (a second one once the slot can decode
    with it); marked streamed in the store."""
    main, slot = config.source.publication, config.source.slot
    try:
        with (
            psycopg.connect(source_dsn, autocommit=True, connect_timeout=10) as source,
            psycopg.connect(store_dsn, autocommit=True, connect_timeout=10) as store,
        ):
            store.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(config.store.schema_name)))
            names, waiting = stream_publications(store, source, slot, main)
            mark_streamed(store, slot, names)
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(f"cannot read the publications: {error_text(exc)}") from exc
    if waiting:
        log.warning("publication_not_yet_usable", publications=",".join(waiting), slot=slot)
    return names
