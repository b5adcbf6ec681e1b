"""A whole table at a version, in key order.

The store indexes rows by a hash of their key, not in key order: a table at version V is read
whole (the latest committed change of each key at or before V, after the last TRUNCATE; keys
moved away by an UPDATE are gone) and sorted by the key, as PostgreSQL orders ``jsonb`` arrays:
key columns in key order, integers numerically, booleans false < true, strings in the store
database's collation (a keyless table by all its columns). ``table_at`` reads the table for
each page; ``iter_table_at`` reads it once through a server-side cursor.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row

from cdc.errors import UsageError
from cdc.query.changes import MAX_ORDINAL
from cdc.query.completeness import check_complete
from cdc.query.model import Key, Row, TableInfo, TablePage, parse_json
from cdc.query.rows import Rows
from cdc.store.format import OP_CODES, ROW_OPS, ChangeFlag

__all__ = ["Tables"]

_ROLLED_BACK = sql.Literal(int(ChangeFlag.ROLLED_BACK))
_LIVE_OPS = sql.SQL(", ").join(sql.Literal(OP_CODES[op]) for op in ROW_OPS)


class Tables(Rows):
    """Reads of whole tables."""

    def _table_query(
        self, info: TableInfo, version: int, after: Row | None
    ) -> tuple[sql.Composed, dict[str, Any]]:
        """Rows ``(k, n, image)`` of the table at ``version`` in key order (n: copies of the row)."""
        c = self._t("changes_all")
        params: dict[str, Any] = {"t": info.table_id, "v": version}
        live = sql.SQL(
            "table_id = %(t)s AND flags & {rb} = 0 AND position <= %(v)s{u} AND (position > %(tp)s "
            "OR (position = %(tp)s AND ordinal > %(to)s))"
        ).format(rb=_ROLLED_BACK, u=self._until(info))
        after_filter = sql.SQL("")
        if after is not None:
            after_filter = sql.SQL(" AND s.k::jsonb > %(after)s::jsonb")
            params["after"] = self.key_text_of(after)
        if info.keyless:
            query = sql.SQL(
                "SELECT s.k, s.n, s.image, NULL::bigint AS position, NULL::int AS ordinal FROM ("
                "  SELECT x.k, sum(x.d) AS n, max(x.image) AS image FROM ("
                "    SELECT key_text AS k, CASE WHEN op = {d} THEN -1 WHEN op = {u} AND old_key_text IS NULL "
                "      THEN 0 ELSE 1 END AS d, CASE WHEN op <> {d} THEN image END AS image "
                "    FROM {c} WHERE {live} AND key_text IS NOT NULL "
                "    UNION ALL "
                "    SELECT old_key_text, -1, NULL FROM {c} WHERE {live} AND old_key_text IS NOT NULL"
                "  ) x GROUP BY x.k"
                ") s WHERE s.n > 0{after} ORDER BY s.k::jsonb"
            ).format(
                c=c, live=live, after=after_filter, d=sql.Literal(OP_CODES["DELETE"]),
                u=sql.Literal(OP_CODES["UPDATE"]),
            )  # fmt: skip
        else:
            query = sql.SQL(
                "SELECT s.k, 1 AS n, s.image, s.position, s.ordinal FROM ("
                "  SELECT DISTINCT ON (key_hash, key_text) key_text AS k, op, image, position, ordinal "
                "  FROM {c} WHERE {live} AND key_text IS NOT NULL "
                "  ORDER BY key_hash, key_text, position DESC, ordinal DESC"
                ") s WHERE s.op IN ({ops}){after} AND NOT EXISTS ("
                "  SELECT 1 FROM {c} o WHERE o.table_id = %(t)s AND o.flags & {rb} = 0 "
                '  AND o.old_key_hash = hashtextextended(s.k COLLATE "C", 0) AND o.old_key_text = s.k '
                "  AND o.position <= %(v)s AND (o.position > s.position "
                "  OR (o.position = s.position AND o.ordinal > s.ordinal))) "
                "ORDER BY s.k::jsonb"
            ).format(c=c, live=live, after=after_filter, ops=_LIVE_OPS, rb=_ROLLED_BACK)
        truncate = self._rows(
            sql.SQL(
                "SELECT position, ordinal FROM {c} WHERE table_id = %(t)s AND op = {t} AND flags & {rb} = 0 "
                "AND position <= %(v)s ORDER BY position DESC, ordinal DESC LIMIT 1"
            ).format(c=c, t=sql.Literal(OP_CODES["TRUNCATE"]), rb=_ROLLED_BACK),
            params,
        )
        params["tp"] = truncate[0]["position"] if truncate else -1
        params["to"] = truncate[0]["ordinal"] if truncate else -1
        return query, params

    def table_at(
        self, table: str, version: int, after_key: Key | None = None, limit: int = 1000
    ) -> TablePage:
        """One page of the rows of ``table`` at ``version``, in key order (see the module doc).

        ``after_key``: the ``next_after`` of the previous page (or any key: the page starts after
        it). A keyless table's page never splits identical rows, so it may hold fewer than
        ``limit`` rows (or more, when one row value alone is repeated more than ``limit`` times).
        """
        if limit <= 0:
            raise UsageError(f"invalid limit {limit}: must be positive")
        info = self.table(table, version)
        after = self.stored_key(info, after_key) if after_key is not None else None
        if self.gone(info, version):
            return TablePage(rows=[], next_after=None)
        check_complete(self, info, version)
        query, params = self._table_query(info, version, after)
        params["limit"] = limit
        rows = self._rows(sql.SQL("{} LIMIT %(limit)s").format(query), params)
        out: list[Row] = []
        last: Row | None = None
        for i, r in enumerate(rows):
            n = int(r["n"])
            if out and len(out) + n > limit:
                return TablePage(rows=out, next_after=last)
            image = self._image_at(info, r, version)
            out.extend(dict(image) for _ in range(n))
            last = self._page_key(info, image, r["k"])
            if len(out) >= limit and i + 1 < len(rows):
                return TablePage(rows=out, next_after=last)
        return TablePage(rows=out, next_after=last if len(rows) == limit else None)

    def _image_at(self, info: TableInfo, r: Any, version: int) -> Row:
        """A row's stored image as the table's DDLs up to ``version`` left it (docs/ddl.md)."""
        image = parse_json(r["image"]) or {}
        if r["position"] is None:
            return dict(image)
        since = (int(r["position"]), int(r["ordinal"]))
        return self.evolve(info.table_id, image, since, (version, MAX_ORDINAL)) or {}

    def _page_key(self, info: TableInfo, image: Row, k: str) -> Row:
        """The stored key of a page's last row (what ``after_key`` takes)."""
        if info.keyless:
            values = parse_json(k)
            return dict(zip(image, values, strict=False)) if len(image) == len(values) else dict(image)
        return dict(zip(info.key_columns, parse_json(k), strict=False))

    def iter_table_at(self, table: str, version: int, page_size: int = 1000) -> Iterator[list[Row]]:
        """Every page of ``table`` at ``version`` (see :meth:`table_at`): the table is read once,
        through a server-side cursor, ``page_size`` rows at a time (identical rows of a keyless
        table never split)."""
        if page_size <= 0:
            raise UsageError(f"invalid page size {page_size}: must be positive")
        info = self.table(table, version)
        if self.gone(info, version):
            return
        check_complete(self, info, version)
        query, params = self._table_query(info, version, None)
        page: list[Row] = []
        with self._guard() as conn, conn.transaction():
            cursor = conn.cursor(f"cdc_table_{uuid.uuid4().hex[:12]}", row_factory=dict_row)
            try:
                cursor.execute(query, params)
                while True:
                    batch = cursor.fetchmany(page_size)
                    for r in batch:
                        n = int(r["n"])
                        if page and len(page) + n > page_size:
                            yield page
                            page = []
                        image = self._image_at(info, r, version)
                        page.extend(dict(image) for _ in range(n))
                    if len(batch) < page_size:
                        break
            finally:
                cursor.close()
        if page:
            yield page
