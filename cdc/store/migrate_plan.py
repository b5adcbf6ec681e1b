"""What a format-1 store's migration plans before it writes: each table's names from the format-1
"schema.name" texts (split by the source catalog when it can be read), and the partitions of the
format-1 tables with the names of their format-2 counterparts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from cdc.store.migrate_base import NAMEDATALEN, SUFFIX, AmbiguousName, Conn, MigrationReport
from cdc.store.retention import partition_name

# ============================================================================ names


@dataclass(frozen=True, slots=True)
class Catalog:
    """What the source catalog says: relation oid -> (schema, name), and the schema names."""

    relations: dict[int, tuple[str, str]]
    namespaces: frozenset[str]


def source_catalog(
    store: Conn, schema: str, source: Conn | None, oids: Sequence[int]
) -> tuple[Catalog | None, str | None]:
    """The source catalog, when ``source`` is the server and database the store captured; else
    None and why (a warning)."""
    if source is None:
        return None, None
    recorded = store.execute(
        sql.SQL(
            "SELECT DISTINCT source_system_id, source_database FROM {} WHERE source_system_id IS NOT NULL"
        ).format(sql.Identifier(schema, "capture_state"))
    ).fetchall()
    try:
        ident = source.execute(
            "SELECT system_identifier::text, current_database() FROM pg_control_system()"
        ).fetchone()
        rows = source.execute(
            "SELECT c.oid::bigint, n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid::bigint = ANY(%s)",
            (list(oids),),
        ).fetchall()
        spaces = source.execute("SELECT nspname FROM pg_namespace").fetchall()
    except psycopg.Error as exc:
        return (
            None,
            f"the source catalog could not be read ({type(exc).__name__}): table names split at the first dot",
        )
    if (
        ident is not None
        and recorded
        and all((r[0], r[1] or ident[1]) != (ident[0], ident[1]) for r in recorded)
    ):
        return (
            None,
            "the source given is not the database this store captured: table names split at the first dot",
        )
    return Catalog(
        {int(r[0]): (str(r[1]), str(r[2])) for r in rows}, frozenset(str(r[0]) for r in spaces)
    ), None


def split_name(text: str, oid: int, catalog: Catalog | None) -> tuple[str, str, str | None]:
    """Split a format-1 "schema.name" into (schema, name, how); ``how`` is None when unambiguous."""
    dots = [i for i, ch in enumerate(text) if ch == "."]
    if not dots:
        return "public", text, "no dot"
    candidates = [(text[:i], text[i + 1 :]) for i in dots]
    if len(candidates) == 1:
        return candidates[0][0], candidates[0][1], None
    if catalog is not None:
        current = catalog.relations.get(oid)
        if current is not None and current in candidates:
            return current[0], current[1], "catalog"
        if current is not None:
            same = [c for c in candidates if c[0] == current[0]]
            if len(same) == 1:
                return same[0][0], same[0][1], "catalog schema"
        known = [c for c in candidates if c[0] in catalog.namespaces]
        if len(known) == 1:
            return known[0][0], known[0][1], "namespace"
    return candidates[0][0], candidates[0][1], "first dot"


@dataclass
class Table:
    table_id: int
    relation_oid: int
    first_position: int
    names: list[tuple[str, str, int]]  # (schema, name, from_position)
    dropped: bool = False


def plan_tables(
    schema_rows: Iterable[tuple[int, str, int, int]], catalog: Catalog | None, report: MigrationReport
) -> tuple[list[Table], dict[int, int]]:
    """Tables by relation oid from (schema_id, text, oid, first_position); schema_id -> table_id."""
    by_oid: dict[int, list[tuple[int, int, str]]] = {}
    for schema_id, text, oid, first in schema_rows:
        by_oid.setdefault(oid, []).append((first, schema_id, text))
    tables: list[Table] = []
    table_of: dict[int, int] = {}
    seen_ambiguous: set[tuple[str, int]] = set()
    for table_id, oid in enumerate(sorted(by_oid, key=lambda o: (min(by_oid[o])[0], o)), start=1):
        rows = sorted(by_oid[oid])
        table = Table(table_id, oid, rows[0][0], [])
        last_text: str | None = None
        for first, schema_id, text in rows:
            table_of[schema_id] = table_id
            if text == last_text:
                continue
            last_text = text
            nsp, name, how = split_name(text, oid, catalog)
            if how is not None and (text, oid) not in seen_ambiguous:
                seen_ambiguous.add((text, oid))
                report.ambiguous.append(AmbiguousName(text, oid, nsp, name, how))
            start = table.first_position if not table.names else first
            if table.names and table.names[-1][2] == start:
                table.names[-1] = (nsp, name, start)  # two names at one position: the later wins
            else:
                table.names.append((nsp, name, start))
        table.dropped = catalog is not None and oid not in catalog.relations
        tables.append(table)
    live: dict[tuple[str, str], list[int]] = {}
    for t in tables:
        if not t.dropped:
            live.setdefault(t.names[-1][:2], []).append(t.relation_oid)
    for (nsp, name), oids in live.items():
        if len(oids) > 1:
            report.warnings.append(
                f"{len(oids)} tables (relation oids {', '.join(map(str, oids))}) are now named {nsp}.{name}: "
                "run the migration with the source reachable to tell them apart"
            )
    return tables, table_of


# ============================================================================ partitions


@dataclass(frozen=True, slots=True)
class Part:
    """A partition of a format-1 table (after its rename), or the table itself if not partitioned."""

    name: str
    bound: str | None  # "FOR VALUES FROM (...) TO (...)", "DEFAULT"; None: not a partition
    lo: datetime | None
    hi: datetime | None

    @property
    def default(self) -> bool:
        return self.bound == "DEFAULT"


def parts(conn: Conn, schema: str, table: str) -> list[Part]:
    kind = conn.execute(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchone()
    if kind is None:
        return []
    if kind[0] != "p":
        return [Part(table, None, None, None)]
    rows = conn.execute(
        "SELECT c.relname, b.bound, "
        "  CASE WHEN f.v IS NULL OR f.v = 'MINVALUE' THEN NULL ELSE btrim(f.v, '''')::timestamptz END, "
        "  CASE WHEN t.v IS NULL OR t.v = 'MAXVALUE' THEN NULL ELSE btrim(t.v, '''')::timestamptz END "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b "
        "CROSS JOIN LATERAL (SELECT substring(b.bound FROM 'FROM \\((.*)\\) TO') AS v) f "
        "CROSS JOIN LATERAL (SELECT substring(b.bound FROM ' TO \\((.*)\\)$') AS v) t "
        "WHERE i.inhparent = to_regclass(%s) ORDER BY 3 NULLS FIRST, 1",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return [Part(str(r[0]), str(r[1]), r[2], r[3]) for r in rows]


def target_name(parent: str, part: Part, taken: set[str]) -> str:
    base = (
        parent + "_default"
        if part.default
        else partition_name(parent, part.lo)
        if part.lo
        else parent + "_pmin"
    )
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def v1_name(name: str) -> str:
    if len(name.encode()) + len(SUFFIX) <= NAMEDATALEN:
        return name + SUFFIX
    return name.encode()[: NAMEDATALEN - len(SUFFIX)].decode(errors="ignore") + SUFFIX
