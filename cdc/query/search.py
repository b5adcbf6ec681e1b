"""Searching a table's changes by a column's value (``Store.search_values``).

``changes.image`` is JSON text with no index on its values, and none is added: an index over
every stored image (a GIN index on its jsonb, or one per searched column) would cost the store
writer on every captured row, and values are unbounded. A search is therefore a **bounded
scan**: the table's changes newest first (the mutation log's order, ``since``/``until``
narrowing it to the partitions of that window), at most ``scan_limit`` of them per call. Each
examined image is matched with a substring test on the value's canonical JSON text (images are
written escaped as PostgreSQL's ``escape_json`` does: cdc/store/keys.py) before the JSON is
parsed, so most non-matching images are never parsed. The result says how many changes were
examined, down to which time, whether the whole window was, and where to continue.

What matches: the row image stored with an INSERT, UPDATE or SNAPSHOT (the row after it) whose
column, as text (an integer's digits, ``true``/``false``, any other value as the server prints
it), equals the value given. Rolled-back attempts match too (``status`` filters them).

Redacted columns (``columns:`` policies, as recorded in the stored schema or configured) are
never searched by their clear value: ``mask`` and ``exclude`` are refused (the store holds
``****`` or null, nothing to compare), and ``hash`` is searched by the keyed digest of the value
given (``policies.hash_key``, the same HMAC capture applied), or refused without the key. A
digest made under another key (before a key rotation) does not match.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from psycopg import sql

from cdc.errors import NotFoundError, UsageError
from cdc.names import parse_table
from cdc.policies import normalized_policies, text_hasher
from cdc.query.changes import CHANGE_FIELDS
from cdc.query.model import Mutation, TableInfo
from cdc.query.requests import Requests
from cdc.store.format import OP_CODES, STATUSES, ChangeFlag
from cdc.store.keys import json_string
from cdc.values import key_value_from_user

__all__ = ["SCAN_LIMIT", "SEARCHED_OPS", "Search", "ValueSearch"]

#: The most changes one search call examines (the default too).
SCAN_LIMIT: Final = 50_000
#: The operations whose stored image is the row after the change.
SEARCHED_OPS: Final = ("INSERT", "UPDATE", "SNAPSHOT")
MAX_VALUE_CHARS: Final = 4096

_ROLLED_BACK = sql.Literal(int(ChangeFlag.ROLLED_BACK))


@dataclass(frozen=True)
class ValueSearch:
    """One page of a value search, newest first, and how far the bounded scan went."""

    table: str
    column: str
    policy: str | None  # "hash": the value was searched as its keyed digest
    mutations: list[Mutation]
    next_cursor: tuple[int, int] | None  # pass as ``before=`` to go on (None: the window is done)
    scanned: int  # changes of the table examined by this call
    scan_limit: int
    complete: bool  # every change of the window (below ``before``) was examined
    searched_to: datetime | None  # commit time of the oldest change examined

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "column": self.column,
            "policy": self.policy,
            "scanned": self.scanned,
            "scan_limit": self.scan_limit,
            "complete": self.complete,
            "searched_to": self.searched_to,
        }


class Search(Requests):
    """Value searches over the stored images."""

    def column_policies(
        self, info: TableInfo, configured: Mapping[str, Mapping[str, str]] | None = None
    ) -> dict[str, str]:
        """Column -> redaction policy of ``info``'s table: recorded by capture in any schema version,
        else configured (``configured``: the ``columns`` config section)."""
        schema, name = parse_table(info.current_name or info.name)
        found = dict(normalized_policies(configured or {}).get(f"{schema}.{name}", {}))
        found.update(self.recorded_policies(info.table_id))
        return found

    def search_values(
        self,
        table: str,
        column: str,
        value: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | None = None,
        op: str | None = None,
        before: tuple[int, int] | None = None,
        limit: int = 100,
        scan_limit: int = SCAN_LIMIT,
        policies: Mapping[str, Mapping[str, str]] | None = None,
        hash_key: bytes | None = None,
    ) -> ValueSearch:
        """The changes of ``table`` whose row image had ``column`` = ``value``, newest first.

        Examines at most ``scan_limit`` changes of the table (below ``before``, within
        ``since``/``until``); see the module documentation for what matches and for redacted
        columns (``policies``: the ``columns`` config section; ``hash_key``: ``policies.hash_key``).
        """
        if limit < 1:
            raise UsageError(f"invalid limit {limit}: must be positive")
        if not 1 <= scan_limit <= SCAN_LIMIT:
            raise UsageError(f"invalid scan limit {scan_limit}: expected 1 to {SCAN_LIMIT}")
        if len(value) > MAX_VALUE_CHARS:
            raise UsageError(f"invalid value: longer than {MAX_VALUE_CHARS} characters")
        info = self.table(table)
        known = self._known_columns(info)
        if column not in known:
            raise NotFoundError(
                f"{info.name} has no column {column!r} in its history; its columns: {', '.join(known)}"
            )
        policy = self.column_policies(info, policies).get(column)
        text = self._search_text(info, column, value, policy, hash_key)
        ops = (op.upper(),) if op is not None else SEARCHED_OPS
        if ops[0] not in SEARCHED_OPS:
            raise UsageError(
                f"invalid op {op!r}: a search matches the row after a change: one of {', '.join(SEARCHED_OPS)}"
            )
        where: list[sql.Composable] = [
            sql.SQL("c.table_id = %(t)s"),
            sql.SQL('c.op = ANY(%(ops)s::"char"[])'),
        ]
        params: dict[str, Any] = {
            "t": info.table_id,
            "ops": [OP_CODES[o] for o in ops],
            "col": column,
            "text": text,
            "needle": json_string(text)[1:-1],
            "scan": scan_limit,
            "limit": limit,
        }
        if info.until is not None:
            where.append(sql.SQL("c.position < %(tu)s"))
            params["tu"] = info.until
        if since is not None:
            where.append(sql.SQL("c.committed_at >= %(since)s"))
            params["since"] = since
        if until is not None:
            where.append(sql.SQL("c.committed_at < %(until)s"))
            params["until"] = until
        if status is not None:
            if status not in STATUSES:
                raise UsageError(f"invalid status {status!r}: expected one of {', '.join(STATUSES)}")
            where.append(
                sql.SQL("c.flags & {} {} 0").format(
                    _ROLLED_BACK, sql.SQL("=" if status == "committed" else "<>")
                )
            )
        if before is not None:
            where.append(sql.SQL("c.position <= %(cp)s AND (c.position < %(cp)s OR c.ordinal < %(co)s)"))
            params["cp"], params["co"] = before
        # The scan: the table's changes newest first, at most %(scan)s; only (position, ordinal,
        # time, hit) are kept. Then every hit up to limit + 1 and the last row examined.
        query = sql.SQL(
            "WITH s AS MATERIALIZED ("
            "  SELECT c.position, c.ordinal, c.committed_at, "
            "    (strpos(c.image, %(needle)s) > 0 AND (c.image::json ->> %(col)s) = %(text)s) AS hit "
            "  FROM {c} c WHERE {w} ORDER BY c.position DESC, c.ordinal DESC LIMIT %(scan)s) "
            "SELECT position, ordinal, committed_at, hit, n, total FROM ("
            "  SELECT s.*, row_number() OVER w AS n, count(*) OVER () AS total, "
            "    count(*) FILTER (WHERE hit) OVER w AS hits FROM s "
            "  WINDOW w AS (ORDER BY position DESC, ordinal DESC)) x "
            "WHERE (hit AND hits <= %(limit)s + 1) OR n = total ORDER BY n"
        ).format(c=self._t("changes_all"), w=sql.SQL(" AND ").join(where))
        rows = self._rows(query, params)
        hits = [r for r in rows if r["hit"]]
        total = int(rows[0]["total"]) if rows else 0
        last = rows[-1] if rows else None
        end: Mapping[str, Any] | None
        if len(hits) > limit:  # more hits in the scan than the page holds: go on after the last shown
            shown = hits[:limit]
            end = shown[-1]
            scanned = int(end["n"])
            next_cursor: tuple[int, int] | None = (int(end["position"]), int(end["ordinal"]))
            complete = False
        else:
            shown = hits
            scanned = total
            end = last
            complete = total < scan_limit
            next_cursor = None if complete or last is None else (int(last["position"]), int(last["ordinal"]))
        mutations = self._changes_at(
            [(int(r["position"]), int(r["ordinal"]), r["committed_at"]) for r in shown]
        )
        return ValueSearch(
            table=info.name,
            column=column,
            policy="hash" if policy == "hash" else None,
            mutations=mutations,
            next_cursor=next_cursor,
            scanned=scanned,
            scan_limit=scan_limit,
            complete=complete,
            searched_to=end["committed_at"] if end is not None else None,
        )

    def _known_columns(self, info: TableInfo) -> list[str]:
        """Every column any schema version of the table had, the current ones first."""
        names = list(info.columns)
        for schema in self._schemas_of(info.table_id):
            names.extend(c for c in schema.columns if c not in names)
        return names

    def _search_text(
        self, info: TableInfo, column: str, value: str, policy: str | None, hash_key: bytes | None
    ) -> str:
        """The text the stored value must have (``->>`` of the image): refused for a redacted column
        unless hashed with the configured key."""
        if policy == "exclude":
            raise UsageError(
                f"{info.name}.{column} is excluded (column policy): it is never captured, so it cannot be "
                "searched"
            )
        if policy == "mask":
            raise UsageError(
                f"{info.name}.{column} is masked (column policy): the history holds **** for it, so it "
                "cannot be searched by value"
            )
        if policy == "hash":
            if hash_key is None:
                raise UsageError(
                    f"{info.name}.{column} is hashed (column policy) and this server has no "
                    "policies.hash_key: it cannot be searched by value",
                    hint="give cdc serve the capture's key (CDC_POLICIES__HASH_KEY) to search it by the "
                    "digest of a value",
                )
            return text_hasher(hash_key)(value.encode("utf-8"))
        try:
            typed = key_value_from_user(info.type_oids.get(column, 25), value)
        except ValueError as exc:
            raise UsageError(f"invalid value for {info.name}.{column}: {exc}") from None
        if typed is True or typed is False:
            return "true" if typed else "false"
        return str(typed)

    def _changes_at(self, cursors: list[tuple[int, int, datetime]]) -> list[Mutation]:
        """The mutations at these (position, ordinal, committed_at), newest first."""
        if not cursors:
            return []
        inner = sql.SQL(
            "SELECT {cols} FROM {c} c JOIN unnest(%(ps)s::bigint[], %(os)s::int[], %(ts)s::timestamptz[]) "
            "AS k(p, o, ts) ON c.position = k.p AND c.ordinal = k.o AND c.committed_at = k.ts"
        ).format(
            cols=sql.SQL(", ").join(sql.SQL("c.") + sql.Identifier(f) for f in CHANGE_FIELDS),
            c=self._t("changes_all"),
        )
        params = {
            "ps": [p for p, _, _ in cursors],
            "os": [o for _, o, _ in cursors],
            "ts": [t for _, _, t in cursors],
        }
        return self.mutations_of(self._raw_changes(self._decorated(inner, newest_first=True), params))
