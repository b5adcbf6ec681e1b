"""Catalog questions asked of the source database on a normal (not replication) connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from cdc.protocol.pgoutput import Column, Relation

#: cdc's own schema on the source (context trigger, signing key, dry-run guard). Never captured:
#: an all-tables publication includes cdc.context_key, whose rows are the signing key.
INTERNAL_SCHEMA = "cdc"


@dataclass(frozen=True, slots=True)
class SourceTable:
    oid: int
    schema: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def relation(self) -> Relation:
        """The Relation message pgoutput would send for this table now."""
        return Relation(
            xid=None,
            oid=self.oid,
            namespace=self.schema,
            name=self.name,
            replica_identity=self.replica_identity,
            columns=self.columns,
        )


def primary_key(conn: psycopg.Connection[Any], relation_oid: int) -> tuple[str, ...] | None:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
        (relation_oid,),
    ).fetchall()
    return tuple(str(r[0]) for r in rows) or None


def published_tables(conn: psycopg.Connection[Any], publication: str) -> list[SourceTable]:
    """Every table of the publication but cdc's own, with its columns as pgoutput would describe them."""
    rows = conn.execute(
        "SELECT c.oid, n.nspname, c.relname, c.relreplident "
        "FROM pg_publication_tables pt "
        "JOIN pg_namespace n ON n.nspname = pt.schemaname "
        "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename "
        "WHERE pt.pubname = %s AND n.nspname <> %s ORDER BY n.nspname, c.relname",
        (publication, INTERNAL_SCHEMA),
    ).fetchall()
    return [describe_table(conn, int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in rows]


def describe_table(
    conn: psycopg.Connection[Any], oid: int, schema: str, name: str, identity: str
) -> SourceTable:
    identity_columns = {
        str(r[0])
        for r in conn.execute(
            "SELECT a.attname FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = %s AND ((%s = 'd' AND i.indisprimary) OR (%s = 'i' AND i.indisreplident))",
            (oid, identity, identity),
        ).fetchall()
    }
    columns = tuple(
        Column(
            flags=1 if identity == "f" or str(r[0]) in identity_columns else 0,
            name=str(r[0]),
            type_oid=int(r[1]),
            type_modifier=int(r[2]),
        )
        for r in conn.execute(
            "SELECT attname, atttypid, atttypmod FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped AND (attgenerated = '' OR (attgenerated = 's' "
            "AND current_setting('server_version_num')::int >= 180000)) ORDER BY attnum",
            (oid,),
        ).fetchall()
    )
    return SourceTable(oid, schema, name, identity, columns, primary_key(conn, oid) or ())
