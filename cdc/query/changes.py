"""Stored changes as mutations: their context, their table's name then, their before images.

A change stores one image (docs/store.md "Changes"); the before image is ``before`` when the
WAL sent it, else the row at the change's key just before the change (``row_before``: the
latest event among the key's changes, the changes moving a row away from the key, and the
table's TRUNCATEs, one index seek per partition each). For a rolled-back change, earlier
changes of its own transaction count even though they were rolled back too (the attempt saw
them); for a committed one only committed changes do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from cdc.query.evolution import Evolution
from cdc.query.model import Mutation, Row, parse_json
from cdc.store.format import OP_CODES, OP_NAMES, ROW_OPS, ChangeFlag

__all__ = [
    "CHANGE_COLUMNS",
    "CHANGE_FIELDS",
    "MAX_ORDINAL",
    "Changes",
    "RawChange",
    "RowLookup",
    "parse_json",  # from cdc.query.model, where cdc.query.evolution finds it too
]

#: Larger than any ordinal: ``(V, MAX_ORDINAL)`` bounds "every change at or before version V".
MAX_ORDINAL = 2**31 - 1
NO_TRANSACTION = -1  # a lookup for a committed read: no rolled-back change counts

_ROLLED_BACK = sql.Literal(int(ChangeFlag.ROLLED_BACK))
_TRUNCATE = sql.Literal(OP_CODES["TRUNCATE"])
_DELETE = OP_CODES["DELETE"]
_UPDATE = OP_CODES["UPDATE"]

#: What a reader reads of a change (changes_all), then its transaction's xid and context.
CHANGE_FIELDS = ("position", "ordinal", "committed_at", "table_id", "schema_id", "op", "flags", "lsn", "xid",
                 "key_text", "image", "before", "old_key_text")  # fmt: skip
CHANGE_COLUMNS = sql.SQL(", ").join(map(sql.Identifier, CHANGE_FIELDS))


@dataclass(frozen=True)
class RawChange:
    """A stored change as read, images parsed."""

    position: int
    ordinal: int
    committed_at: datetime
    table_id: int
    schema_id: int | None
    op: str  # the letter
    flags: int
    lsn: int
    xid: int
    key_text: str | None
    image: Row | None
    before: Row | None
    old_key_text: str | None
    request_id: str | None
    context: dict[str, Any] | None
    txn_flags: int = 0  # its transaction's (docs/store.md "Transaction flags")

    @property
    def rolled_back(self) -> bool:
        return bool(self.flags & ChangeFlag.ROLLED_BACK)

    @property
    def cursor(self) -> tuple[int, int]:
        return (self.position, self.ordinal)

    @property
    def from_key(self) -> str | None:
        """The key the row had before the change (its old key when an UPDATE moved it)."""
        return self.old_key_text if self.old_key_text is not None else self.key_text


@dataclass(frozen=True)
class RowLookup:
    """The row of table ``table_id`` at key ``key_text`` just before ``(position, ordinal)``.

    ``transaction``: the position of a rolled-back change's transaction, whose earlier
    (rolled-back) changes count; :data:`NO_TRANSACTION` for a committed read.
    """

    table_id: int
    key_text: str
    position: int
    ordinal: int
    transaction: int = NO_TRANSACTION


class Changes(Evolution):
    """Reading changes with their context and deriving what the store does not keep."""

    def _decorated(self, inner: sql.Composable, *, newest_first: bool = False) -> sql.Composed:
        """``inner`` (a query of CHANGE_COLUMNS over changes_all) with each change's xid, request
        id and context (its transaction's, or the context_changes row in force at its ordinal),
        and its transaction's flags."""
        direction = sql.SQL("DESC" if newest_first else "ASC")
        return sql.SQL(
            "SELECT c.position, c.ordinal, c.committed_at, c.table_id, c.schema_id, c.op, c.flags, c.lsn, "
            "coalesce(c.xid, t.xid, 0) AS xid, c.key_text, c.image, c.before, c.old_key_text, "
            "CASE WHEN cc.from_ordinal IS NULL THEN t.request_id ELSE cc.request_id END AS request_id, "
            "CASE WHEN cc.from_ordinal IS NULL THEN t.context ELSE cc.context END AS context, "
            "coalesce(t.flags, 0) AS txn_flags "
            "FROM ({inner}) c "
            "LEFT JOIN LATERAL (SELECT xid, request_id, context, flags FROM {tx} t WHERE t.position = c.position "
            "  AND t.committed_at = c.committed_at LIMIT 1) t ON true "
            "LEFT JOIN LATERAL (SELECT from_ordinal, request_id, context FROM {cc} cc "
            "  WHERE cc.position = c.position AND cc.committed_at = c.committed_at "
            "  AND cc.from_ordinal <= c.ordinal ORDER BY cc.from_ordinal DESC LIMIT 1) cc ON true "
            "ORDER BY c.position {d}, c.ordinal {d}"
        ).format(inner=inner, tx=self._t("transactions_all"), cc=self._t("context_changes_all"), d=direction)

    def _raw_changes(self, query: sql.Composable, params: Mapping[str, Any]) -> list[RawChange]:
        contexts: dict[str, Any] = {}
        out = []
        for r in self._rows(sql.Composed([query]), params):
            context_text = r["context"]
            if context_text is not None and context_text not in contexts:
                contexts[context_text] = parse_json(context_text)
            out.append(
                RawChange(
                    position=int(r["position"]),
                    ordinal=int(r["ordinal"]),
                    committed_at=r["committed_at"],
                    table_id=int(r["table_id"]),
                    schema_id=r["schema_id"],
                    op=r["op"],
                    flags=int(r["flags"]),
                    lsn=int(r["lsn"]),
                    xid=int(r["xid"]),
                    key_text=r["key_text"],
                    image=parse_json(r["image"]),
                    before=parse_json(r["before"]),
                    old_key_text=r["old_key_text"],
                    request_id=r["request_id"],
                    context=contexts.get(context_text) if context_text is not None else None,
                    txn_flags=int(r["txn_flags"]),
                )
            )
        return out

    # ------------------------------------------------------------------ rows before a point

    def rows_before(self, lookups: Sequence[RowLookup]) -> list[tuple[Row | None, int | None]]:
        """For each lookup, the row there (None: absent) and the schema its image follows.

        One statement; per lookup one index seek per partition on each of ``changes_row``,
        ``changes_old_row`` and ``changes_truncate``.
        """
        if not lookups:
            return []
        c = self._t("changes_all")
        bound = sql.SQL(
            "table_id = r.tid AND position <= r.p AND (position < r.p OR ordinal < r.o) "
            "AND (flags & {rb} = 0 OR position = r.tx)"
        ).format(rb=_ROLLED_BACK)
        rows = self._rows(
            sql.SQL(
                "SELECT r.i, l.op, l.image, l.schema_id, l.at_key, l.position, l.ordinal "
                "FROM unnest(%(tids)s::int[], %(keys)s::text[], %(ps)s::bigint[], %(os)s::bigint[], "
                "  %(txs)s::bigint[]) WITH ORDINALITY AS r(tid, k, p, o, tx, i) "
                "CROSS JOIN LATERAL ("
                "  SELECT x.op, x.image, x.schema_id, x.at_key, x.position, x.ordinal FROM ("
                "    (SELECT op, image, schema_id, true AS at_key, position, ordinal FROM {c} "
                '     WHERE {bound} AND key_hash = hashtextextended(r.k COLLATE "C", 0) AND key_text = r.k '
                "     ORDER BY position DESC, ordinal DESC LIMIT 1) "
                "    UNION ALL "
                "    (SELECT op, NULL, NULL, false, position, ordinal FROM {c} "
                '     WHERE {bound} AND old_key_hash = hashtextextended(r.k COLLATE "C", 0) '
                "     AND old_key_text = r.k ORDER BY position DESC, ordinal DESC LIMIT 1) "
                "    UNION ALL "
                "    (SELECT op, NULL, NULL, false, position, ordinal FROM {c} "
                "     WHERE {bound} AND op = {t} ORDER BY position DESC, ordinal DESC LIMIT 1)"
                "  ) x ORDER BY x.position DESC, x.ordinal DESC LIMIT 1"
                ") l"
            ).format(c=c, bound=bound, t=_TRUNCATE),
            {
                "tids": [x.table_id for x in lookups],
                "keys": [x.key_text for x in lookups],
                "ps": [x.position for x in lookups],
                "os": [x.ordinal for x in lookups],
                "txs": [x.transaction for x in lookups],
            },
        )
        out: list[tuple[Row | None, int | None]] = [(None, None)] * len(lookups)
        for r in rows:
            if r["at_key"] and OP_NAMES[r["op"]] in ROW_OPS:
                lookup = lookups[int(r["i"]) - 1]
                image = self.evolve(
                    lookup.table_id,
                    parse_json(r["image"]),
                    (int(r["position"]), int(r["ordinal"])),
                    (lookup.position, lookup.ordinal),
                )
                out[int(r["i"]) - 1] = (image, r["schema_id"])
        return out

    def keyless_count(self, table_id: int, key: str, position: int, ordinal: int) -> tuple[int, Row | None]:
        """How many rows equal to ``key`` (a keyless table's whole row) there are just before
        ``(position, ordinal)``, and one image of them: a multiset since the last TRUNCATE."""
        c = self._t("changes_all")
        bound = sql.SQL(
            "table_id = %(t)s AND flags & {rb} = 0 AND position <= %(p)s AND (position < %(p)s OR ordinal < %(o)s)"
        ).format(rb=_ROLLED_BACK)
        rows = self._rows(
            sql.SQL(
                "WITH tr AS (SELECT position, ordinal FROM {c} WHERE {bound} AND op = {t} "
                "  ORDER BY position DESC, ordinal DESC LIMIT 1) "
                "SELECT coalesce(sum(x.d), 0) AS n, max(x.image) AS image FROM ("
                "  SELECT CASE WHEN op = {d} THEN -1 WHEN op = {u} AND old_key_text IS NULL THEN 0 ELSE 1 END AS d,"
                "    CASE WHEN op <> {d} THEN image END AS image, position, ordinal FROM {c} "
                '  WHERE {bound} AND key_hash = hashtextextended(%(k)s::text COLLATE "C", 0) AND key_text = %(k)s '
                "  UNION ALL "
                "  SELECT -1, NULL, position, ordinal FROM {c} WHERE {bound} "
                '  AND old_key_hash = hashtextextended(%(k)s::text COLLATE "C", 0) AND old_key_text = %(k)s'
                ") x WHERE NOT EXISTS (SELECT 1 FROM tr WHERE (x.position, x.ordinal) < (tr.position, tr.ordinal))"
            ).format(c=c, bound=bound, t=_TRUNCATE, d=sql.Literal(_DELETE), u=sql.Literal(_UPDATE)),
            {"t": table_id, "k": key, "p": position, "o": ordinal},
        )
        count = int(rows[0]["n"]) if rows else 0
        return count, parse_json(rows[0]["image"]) if rows and count > 0 else None

    # ------------------------------------------------------------------ mutations

    def derive_befores(self, raws: Sequence[RawChange]) -> dict[int, Row | None]:
        """The derived before image of every UPDATE and DELETE in ``raws`` that needs one, by index."""
        wanted: dict[int, RowLookup] = {}
        found: dict[int, Row | None] = {}
        for i, raw in enumerate(raws):
            if raw.before is not None or raw.op not in (_UPDATE, _DELETE):
                continue
            shape = self._shape(raw.schema_id) if raw.schema_id is not None else None
            if shape is not None and not shape.key_columns:  # keyless: the old row is the old key
                found[i] = self._keyless_row(raw)
                continue
            if raw.op == _DELETE and self._whole_row(raw):
                continue
            if raw.from_key is not None:
                wanted[i] = RowLookup(
                    raw.table_id, raw.from_key, raw.position, raw.ordinal,
                    raw.position if raw.rolled_back else NO_TRANSACTION,
                )  # fmt: skip
        looked = self.rows_before(list(wanted.values()))
        for i, (row, _schema_id) in zip(wanted, looked, strict=True):
            found[i] = row
        return found

    def _keyless_row(self, raw: RawChange) -> Row | None:
        if raw.op == _DELETE:
            return raw.image
        columns = self.columns_of(raw.schema_id)
        values = parse_json(raw.from_key)
        return dict(zip(columns, values, strict=False)) if isinstance(values, list) else None

    def _whole_row(self, raw: RawChange) -> bool:
        """A DELETE whose image is the whole old row (the WAL sent it: REPLICA IDENTITY FULL)."""
        shape = self._shape(raw.schema_id) if raw.schema_id is not None else None
        if raw.image is None or shape is None:
            return False
        return any(c not in shape.key_columns for c in raw.image)

    def mutation(self, raw: RawChange, derived: Row | None = None) -> Mutation:
        """The mutation a stored change describes; ``derived``: its before image when not stored."""
        op = OP_NAMES[raw.op]
        image = raw.image
        after = image if op in ROW_OPS else None
        before: Row | None = None
        if op == "DELETE":
            before = raw.before or (image if self._whole_row(raw) else derived)
        elif op == "UPDATE":
            before = raw.before if raw.before is not None else derived
        key_image = image if op in ROW_OPS or op == "DELETE" else None
        if op == "UPDATE":
            changed = (
                tuple(c for c, v in (after or {}).items() if c in before and before[c] != v)
                if before is not None
                else tuple(after or {})
            )
        elif op == "DELETE":
            changed = tuple(before or image or {})
        else:
            changed = tuple(after or {})
        unknown: tuple[str, ...] = ()
        if raw.flags & ChangeFlag.INCOMPLETE and image is not None:
            unknown = tuple(c for c in self.columns_of(raw.schema_id) if c not in image)
        rolled_back = raw.rolled_back
        return Mutation(
            position=raw.position,
            ordinal=raw.ordinal,
            version=None if rolled_back else raw.position,
            lsn=raw.lsn,
            xid=raw.xid,
            committed_at=raw.committed_at,
            table=self.name_at(raw.table_id, raw.position),
            op=op,
            key=self.key_of(raw.schema_id, raw.table_id, raw.key_text, key_image),
            old_key=self.key_of(raw.schema_id, raw.table_id, raw.old_key_text, before),
            before=before,
            after=after,
            changed=changed,
            status="rolled_back" if rolled_back else "committed",
            request_id=raw.request_id,
            context=raw.context,
            schema_id=raw.schema_id,
            flags=raw.flags,
            table_id=raw.table_id,
            unknown=unknown,
            key_text=raw.key_text,
            old_key_text=raw.old_key_text,
            txn_flags=raw.txn_flags,
        )

    def mutations_of(self, raws: Sequence[RawChange]) -> list[Mutation]:
        """Mutations of ``raws``, before images derived (one statement for all of them)."""
        derived = self.derive_befores(raws)
        return [self.mutation(raw, derived.get(i)) for i, raw in enumerate(raws)]
