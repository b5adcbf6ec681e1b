"""Erasure of one row's images from a format-2 history store (``cdc erase``).

A row is named by its table and key. :func:`row_chain` follows it through its key changes
(``old_key_text`` links of committed key-changing UPDATEs, backwards to the keys it had before
and forwards to the keys it had after), each earlier or later key only over the span the row held
it; :func:`erase_row` then deletes every change holding an image of it under any of those keys
(``key_text`` or ``old_key_text``: after images, DELETE images, the ``before`` images of REPLICA
IDENTITY FULL, SNAPSHOT rows, keyframes, pending keyframes) in one transaction serialized with
prunes, and records the erasure in ``erasures`` with counts and the SHA-256 of the named key.

Must not: store, log or raise with a key or a value (digests only); erase anything when the
transaction fails.
"""

from __future__ import annotations

import getpass
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc.errors import NotFoundError, RefusedError, StoreUnavailableError, UsageError, error_text
from cdc.store.keyframes import KEYFRAME, ROLLED_BACK
from cdc.store.retention import _ADVISORY
from cdc.store.table_refs import TableRef

__all__ = [
    "ErasureReport",
    "RowStillLiveError",
    "Segment",
    "default_actor",
    "erase_row",
    "has_history",
    "key_sha256",
    "row_chain",
    "row_on_source",
]

log = structlog.get_logger("cdc.retention")

Conn = psycopg.Connection[Any]
Position = tuple[int, int]  # (position, ordinal)

_COMMITTED = sql.SQL("flags & {} = 0").format(sql.Literal(ROLLED_BACK))
_AT_KEY = sql.SQL('key_hash = hashtextextended(%(k)s::text COLLATE "C", 0) AND key_text = %(k)s')
_AT_OLD_KEY = sql.SQL('old_key_hash = hashtextextended(%(k)s::text COLLATE "C", 0) AND old_key_text = %(k)s')


class RowStillLiveError(RefusedError):
    """``cdc erase`` refused: the row still exists on the source (or the source was not checked)."""


@dataclass(frozen=True)
class Segment:
    """The changes of a table at one key within ``(after, upto]`` (None: unbounded)."""

    key_text: str
    after: Position | None = None
    upto: Position | None = None


@dataclass(frozen=True)
class ErasureReport:
    erasure_id: int | None  # None for a dry run
    table: str
    table_id: int
    key_sha256: str
    earlier_keys: int  # other keys the row had (followed through key changes)
    earlier_key_sha256: list[str]
    mutations_removed: int  # changes removed, keyframes included
    keyframes_removed: int
    partitions: dict[str, int]  # relation -> rows removed there
    source_check: str
    forced: bool
    actor: str
    since: datetime | None
    until: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "erasure_id": self.erasure_id,
            "table": self.table,
            "table_id": self.table_id,
            "key_sha256": self.key_sha256,
            "earlier_keys": self.earlier_keys,
            "earlier_key_sha256": self.earlier_key_sha256,
            "mutations_removed": self.mutations_removed,
            "keyframes_removed": self.keyframes_removed,
            "partitions": self.partitions,
            "source_check": self.source_check,
            "forced": self.forced,
            "actor": self.actor,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }


def key_sha256(key_text: str) -> str:
    """Hex SHA-256 of a canonical ``key_text`` (UTF-8): ``sha256('[42]')``. The same row always
    hashes the same, so "was this row erased?" can be answered without storing the key."""
    return hashlib.sha256(key_text.encode()).hexdigest()


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _t(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def _bounds(segment: Segment, params: dict[str, Any]) -> sql.Composable:
    out: list[sql.Composable] = []
    if segment.after is not None:
        params["ap"], params["ao"] = segment.after
        out.append(sql.SQL(" AND (position, ordinal) > (%(ap)s, %(ao)s)"))
    if segment.upto is not None:
        params["up"], params["uo"] = segment.upto
        out.append(sql.SQL(" AND (position, ordinal) <= (%(up)s, %(uo)s)"))
    return sql.Composed(out)


def _links(
    conn: Conn, schema: str, table_id: int, segment: Segment, backwards: bool
) -> list[tuple[Position, str]]:
    """Committed key-changing UPDATEs inside ``segment``: arriving at its key (``backwards``:
    the key they came from) or leaving it (the key they went to)."""
    params: dict[str, Any] = {"t": table_id, "k": segment.key_text}
    at, other = (_AT_KEY, "old_key_text") if backwards else (_AT_OLD_KEY, "key_text")
    rows = conn.execute(
        sql.SQL(
            "SELECT position, ordinal, {o} FROM {c} WHERE table_id = %(t)s AND {at} AND {ok} "
            "AND old_key_text IS NOT NULL{b} ORDER BY position, ordinal"
        ).format(
            o=sql.Identifier(other),
            c=_t(schema, "changes_all"),
            at=at,
            ok=_COMMITTED,
            b=_bounds(segment, params),
        ),
        params,
    ).fetchall()
    return [((int(r[0]), int(r[1])), str(r[2])) for r in rows if r[2] is not None]


def _vacated(conn: Conn, schema: str, table_id: int, key: str, at: Position, before: bool) -> Position | None:
    """The committed change nearest ``at`` (before it, or after it) that ended a row at ``key``:
    its DELETE, an UPDATE moving it to another key, a TRUNCATE of the table."""
    params: dict[str, Any] = {"t": table_id, "k": key, "p": at[0], "o": at[1]}
    cmp, order = (sql.SQL("<"), sql.SQL("DESC")) if before else (sql.SQL(">"), sql.SQL("ASC"))
    parts = [
        sql.SQL("{} AND op = 'D'").format(_AT_KEY),
        _AT_OLD_KEY,
        sql.SQL("op = 'T'"),
    ]
    found: list[Position] = []
    for cond in parts:
        row = conn.execute(
            sql.SQL(
                "SELECT position, ordinal FROM {c} WHERE table_id = %(t)s AND {cond} AND {ok} "
                "AND (position, ordinal) {cmp} (%(p)s, %(o)s) ORDER BY position {d}, ordinal {d} LIMIT 1"
            ).format(c=_t(schema, "changes_all"), cond=cond, ok=_COMMITTED, cmp=cmp, d=order),
            params,
        ).fetchone()
        if row is not None:
            found.append((int(row[0]), int(row[1])))
    if not found:
        return None
    return max(found) if before else min(found)


def row_chain(conn: Conn, schema: str, table: TableRef, key_text: str) -> list[Segment]:
    """The named key (its whole history) and every other key the row had, each over the span
    the row held it: backwards from a key-changing UPDATE arriving at a key of the chain to the
    change that last ended a row at the key it came from; forwards from one leaving a key of
    the chain to the next change ending the row at the key it went to. A keyless table's row
    values are multisets: every linked value is followed over its whole history."""
    chain = [Segment(key_text)]
    seen = {chain[0]}
    todo = list(chain)
    while todo:
        segment = todo.pop()
        found: list[Segment] = []
        for at, came_from in _links(conn, schema, table.table_id, segment, backwards=True):
            if table.keyless:
                found.append(Segment(came_from))
            else:
                found.append(
                    Segment(came_from, _vacated(conn, schema, table.table_id, came_from, at, True), at)
                )
        for at, went_to in _links(conn, schema, table.table_id, segment, backwards=False):
            if table.keyless:
                found.append(Segment(went_to))
            else:
                found.append(Segment(went_to, at, _vacated(conn, schema, table.table_id, went_to, at, False)))
        for s in found:
            if s not in seen and s.key_text != key_text:
                seen.add(s)
                chain.append(s)
                todo.append(s)
    return chain


def has_history(conn: Conn, schema: str, table_id: int, key_text: str) -> bool:
    """Whether any stored change (committed or not, keyframes included) names this key."""
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {c} WHERE table_id = %(t)s AND {a}) "
            "OR EXISTS (SELECT 1 FROM {c} WHERE table_id = %(t)s AND {o})"
        ).format(c=_t(schema, "changes_all"), a=_AT_KEY, o=_AT_OLD_KEY),
        {"t": table_id, "k": key_text},
    ).fetchone()
    return bool(row and row[0])


@dataclass
class _Removed:
    relations: dict[str, int] = field(default_factory=dict)
    keyframes: int = 0

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        for relation, count, keyframes in rows:
            self.relations[str(relation)] = self.relations.get(str(relation), 0) + int(count)
            self.keyframes += int(keyframes)

    @property
    def total(self) -> int:
        return sum(self.relations.values())


def erase_row(
    conn: Conn,
    schema: str,
    table: TableRef,
    key_text: str,
    *,
    actor: str,
    source_check: str,
    forced: bool,
    since: datetime | None = None,
    until: datetime | None = None,
    dry_run: bool = False,
) -> ErasureReport:
    """Delete every change of ``table`` holding an image of the row named by ``key_text``, under
    that key or any other key it had (:func:`row_chain`), optionally only those committed in
    ``[since, until)``; the row's pending keyframes (staged for the next prune) go whatever the
    window, and the staging is voided. Records the erasure (``erasures``: who, when, the key's
    SHA-256, counts), one transaction. Raises NotFoundError when nothing matches. ``conn`` must be
    in autocommit mode (this runs its own transaction)."""
    window: list[sql.Composable] = []
    if since is not None:
        window.append(sql.SQL(" AND committed_at >= %(since)s"))
    if until is not None:
        window.append(sql.SQL(" AND committed_at < %(until)s"))
    removed = _Removed()
    erasure_id: int | None = None
    try:
        with conn.transaction(force_rollback=dry_run):
            # One at a time with prunes (which may be dropping a partition, or staging keyframes).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_ADVISORY + schema,))
            chain = row_chain(conn, schema, table, key_text)
            keys = list(dict.fromkeys(s.key_text for s in chain))
            # Keyframes staged for the next prune (pending, above the floor) may copy an image of
            # the row: they go whatever the window, and the staging is void (the prune recomputes).
            for key in keys:
                removed.add(
                    conn.execute(
                        sql.SQL(
                            "WITH d AS (DELETE FROM {k} WHERE table_id = %(t)s AND {a} AND flags & {kf} <> 0 "
                            "AND position > coalesce((SELECT max(history_floor) FROM {c}), -1) "
                            "RETURNING tableoid::regclass::text AS r) SELECT r, count(*), count(*) FROM d GROUP BY r"
                        ).format(
                            k=_t(schema, "changes_keep"),
                            a=_AT_KEY,
                            kf=sql.Literal(KEYFRAME),
                            c=_t(schema, "capture_state"),
                        ),
                        {"t": table.table_id, "k": key},
                    ).fetchall()
                )
            for segment in chain:
                for relation in ("changes", "changes_keep"):
                    params: dict[str, Any] = {"t": table.table_id, "k": segment.key_text, "since": since,
                                              "until": until}  # fmt: skip
                    bounds = _bounds(segment, params)
                    removed.add(
                        conn.execute(
                            sql.SQL(
                                "WITH d AS (DELETE FROM {r} WHERE table_id = %(t)s AND (({a}) OR ({o})){b}{w} "
                                "RETURNING tableoid::regclass::text AS r, flags & {kf} <> 0 AS keyframe) "
                                "SELECT r, count(*), count(*) FILTER (WHERE keyframe) FROM d GROUP BY r"
                            ).format(
                                r=_t(schema, relation),
                                a=_AT_KEY,
                                o=_AT_OLD_KEY,
                                b=bounds,
                                w=sql.Composed(window),
                                kf=sql.Literal(KEYFRAME),
                            ),
                            params,
                        ).fetchall()
                    )
            if removed.total:
                conn.execute(
                    sql.SQL("UPDATE {} SET staged = NULL WHERE staged IS NOT NULL").format(
                        _t(schema, "retention_state")
                    )
                )
            else:
                if since is not None or until is not None:
                    raise NotFoundError(
                        f"no image of that row of {table.name} in that time window: nothing erased"
                    )
                raise NotFoundError(f"no history for that row of {table.name}: nothing to erase")
            digest = key_sha256(key_text)
            earlier = [key_sha256(k) for k in keys[1:]]
            if not dry_run:
                found = conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (actor, table_id, key_sha256, key_columns, earlier_keys, from_time, "
                        "until_time, mutations_removed, keyframes_removed, source_check, forced) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING erasure_id"
                    ).format(_t(schema, "erasures")),
                    (actor, table.table_id, digest, list(table.naming_columns), len(earlier), since, until,
                     removed.total, removed.keyframes, source_check, forced),
                ).fetchone()  # fmt: skip
                erasure_id = int(found[0]) if found else None
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"erasure failed, nothing was removed: {error_text(exc)}") from None
    log.info(
        "row_erased", table_id=table.table_id, key_sha256=digest, earlier_keys=len(earlier),
        changes=removed.total, keyframes=removed.keyframes, dry_run=dry_run,
    )  # fmt: skip
    return ErasureReport(
        erasure_id=erasure_id,
        table=table.name,
        table_id=table.table_id,
        key_sha256=digest,
        earlier_keys=len(earlier),
        earlier_key_sha256=earlier,
        mutations_removed=removed.total,
        keyframes_removed=removed.keyframes,
        partitions=removed.relations,
        source_check=source_check,
        forced=forced,
        actor=actor,
        since=since,
        until=until,
    )


def row_on_source(source: Conn, table: TableRef, key: Mapping[str, Any]) -> bool:
    """Whether the row named by the stored ``key`` (column → value) exists on the source now.

    The table is found by its relation oid (renames do not matter; a dropped table holds no
    row). Keyed tables: ``key column = value::type`` for each key column (an index seek).
    Keyless tables: every column compared IS NOT DISTINCT FROM (a scan). Values are given in
    their text form and cast to the column's type, so the comparison is the server's. Raises
    psycopg errors (bad value) and UsageError (a column gone) to the caller.
    """
    if table.dropped:
        return False
    relation = source.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = %s AND c.relkind IN ('r', 'p')",
        (table.relation_oid,),
    ).fetchone()
    if relation is None:
        return False
    types = dict(
        source.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (table.relation_oid,),
        ).fetchall()
    )
    conditions: list[sql.Composable] = []
    values: list[Any] = []
    for column, value in key.items():
        if column not in types:
            raise UsageError(f"the source table {table.name} has no column {column!r} any more")
        op = sql.SQL("IS NOT DISTINCT FROM") if table.keyless or value is None else sql.SQL("=")
        conditions.append(
            sql.SQL("{} {} CAST(%s AS {})").format(sql.Identifier(column), op, sql.SQL(types[column]))
        )
        values.append(_text_value(value))
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM ONLY {} WHERE {})").format(
        sql.Identifier(str(relation[0]), str(relation[1])),
        sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true"),
    )
    row = source.execute(query, values).fetchone()
    return bool(row and row[0])


def _text_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)
