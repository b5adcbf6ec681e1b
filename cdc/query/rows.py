"""One row: at a version, its history, per-column blame (docs/store.md "Reading")."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from psycopg import sql

from cdc.errors import NotFoundError
from cdc.query.changes import CHANGE_COLUMNS, MAX_ORDINAL, NO_TRANSACTION, Changes, RawChange, RowLookup
from cdc.query.completeness import check_complete
from cdc.query.model import BlameEntry, Key, Mutation, Row, TableInfo, format_key
from cdc.store.format import OP_CODES, OP_NAMES, ROW_OPS

__all__ = ["Rows"]

_MAX_KEY_HOPS = 1000
_TRUNCATE = OP_CODES["TRUNCATE"]


class Rows(Changes):
    """Reads of single rows."""

    def _key_filter(self, info: TableInfo, column: str) -> sql.Composed:
        """``table_id = %(t)s AND <column>_hash = hash(%(k)s) AND <column> = %(k)s`` (+ the name's bound)."""
        hashed = "key_hash" if column == "key_text" else "old_key_hash"
        return sql.SQL(
            'table_id = %(t)s AND {h} = hashtextextended(%(k)s::text COLLATE "C", 0) AND {c} = %(k)s{u}'
        ).format(h=sql.Identifier(hashed), c=sql.Identifier(column), u=self._until(info))

    @staticmethod
    def _until(info: TableInfo) -> sql.Composable:
        """The bound of a table read by an old name: only its history before the rename."""
        if info.until is None:
            return sql.SQL("")
        return sql.SQL(" AND position < {}").format(sql.Literal(info.until))

    @staticmethod
    def gone(info: TableInfo, version: int) -> bool:
        """Nothing of the table is read at ``version``: it was dropped by then, or the name it was
        found by was no longer its name (an old name reads the versions before the rename)."""
        if info.dropped_position is not None and version >= info.dropped_position:
            return True
        return info.until is not None and version >= info.until

    def has_history(self, table: str | TableInfo, key: Key) -> bool:
        """Whether any change (committed or not) ever named this row."""
        info = table if isinstance(table, TableInfo) else self.table(table)
        k = self.key_text_of(self.stored_key(info, key))
        c = self._t("changes_all")
        rows = self._rows(
            sql.SQL(
                "SELECT EXISTS (SELECT 1 FROM {c} WHERE {a}) OR EXISTS (SELECT 1 FROM {c} WHERE {b}) AS found"
            ).format(c=c, a=self._key_filter(info, "key_text"), b=self._key_filter(info, "old_key_text")),
            {"t": info.table_id, "k": k},
        )
        return bool(rows[0]["found"])

    def row_at(self, table: str | TableInfo, key: Key, version: int) -> Row | None:
        """The row at ``version`` (a dict in column order), None if absent then.

        The version is not checked against the floor or the current version here: see
        :meth:`check_version` (``History.at`` does both).
        """
        info = table if isinstance(table, TableInfo) else self.table(table, version)
        k = self.key_text_of(self.stored_key(info, key))
        if self.gone(info, version):
            return None
        check_complete(self, info, version)
        if info.keyless:
            count, image = self.keyless_count(info.table_id, k, version, MAX_ORDINAL)
            return image if count > 0 else None
        row, _ = self.rows_before([RowLookup(info.table_id, k, version, MAX_ORDINAL)])[0]
        return row

    # ------------------------------------------------------------------ history

    def key_history(
        self, info: TableInfo, k: str, *, before: tuple[int, int] | None = None
    ) -> tuple[list[Mutation], Row | None]:
        """Every change of the row at key ``k``, oldest first, with before images: its own, the
        UPDATE that moved it away (``old_key_text``), and each TRUNCATE that removed it; and the
        row as the committed ones left it. One statement.

        ``before``: only changes before this ``(position, ordinal)``.
        """
        c = self._t("changes_all")
        bound = sql.SQL("")
        params: dict[str, Any] = {"t": info.table_id, "k": k}
        if before is not None:
            bound = sql.SQL(" AND position <= %(bp)s AND (position < %(bp)s OR ordinal < %(bo)s)")
            params["bp"], params["bo"] = before
        raws = self._raw_changes(
            self._decorated(
                sql.SQL(
                    "WITH k AS MATERIALIZED ("
                    "  (SELECT {cols} FROM {c} WHERE {a}{b}) UNION ALL (SELECT {cols} FROM {c} WHERE {o}{b})) "
                    "SELECT * FROM k UNION ALL "
                    "SELECT {cols} FROM {c} WHERE table_id = %(t)s AND op = {t} "
                    "AND position >= (SELECT min(position) FROM k){u}{b}"
                ).format(
                    cols=CHANGE_COLUMNS,
                    c=c,
                    a=self._key_filter(info, "key_text"),
                    o=self._key_filter(info, "old_key_text"),
                    b=bound,
                    t=sql.Literal(_TRUNCATE),
                    u=self._until(info),
                )
            ),
            params,
        )
        return self._walk(k, raws, keyless=info.keyless)

    def _walk(
        self, k: str, raws: list[RawChange], *, keyless: bool = False
    ) -> tuple[list[Mutation], Row | None]:
        """Before images along one key's history, which TRUNCATEs removed the row, and the row as
        the committed changes left it.

        A keyless table's key is a whole row value, of which there may be several: its
        TRUNCATEs count when any of them was there.
        """
        committed: Row | None = None  # the row as committed changes left it
        seen: tuple[int, Row | None] = (-1, None)  # the row as the latest change of a transaction left it
        copies = 0  # keyless: how many rows have the value (committed)
        out: list[tuple[RawChange, Row | None]] = []
        moved_in: list[int] = []
        for raw in raws:
            state = seen[1] if raw.rolled_back and seen[0] == raw.position else committed
            if raw.op == _TRUNCATE:
                if state is None and not (keyless and copies > 0):
                    continue  # the row was not there: not part of its history
                new: Row | None = None
                out.append((raw, None))
                copies = 0 if not raw.rolled_back else copies
            else:
                at_key = raw.key_text == k
                if at_key and raw.old_key_text is not None and not keyless:
                    moved_in.append(len(out))  # its before image is at the old key
                out.append((raw, state))
                new = raw.image if at_key and OP_NAMES[raw.op] in ROW_OPS else None
                if keyless and not raw.rolled_back:
                    copies += _multiset_delta(raw, k)
                    new = raw.image if copies > 0 and at_key else (committed if copies > 0 else None)
            if not raw.rolled_back:
                committed = new
            seen = (raw.position, new)
        if moved_in:
            lookups = [
                RowLookup(
                    out[i][0].table_id,
                    out[i][0].old_key_text or "",
                    out[i][0].position,
                    out[i][0].ordinal,
                    out[i][0].position if out[i][0].rolled_back else NO_TRANSACTION,
                )
                for i in moved_in
            ]
            for i, (row, _schema_id) in zip(moved_in, self.rows_before(lookups), strict=True):
                out[i] = (out[i][0], row)
        return [self.mutation(raw, before) for raw, before in out], committed

    def row_history(
        self,
        table: str | TableInfo,
        key: Key,
        since: datetime | None = None,
        until: datetime | None = None,
        include_rolled_back: bool = True,
    ) -> list[Mutation]:
        """Every mutation of the row, oldest first: ``since <= committed_at < until``.

        Includes the UPDATE that moved the row away to another key (``old_key``), rolled-back
        attempts (unless ``include_rolled_back`` is false) and each TRUNCATE of the table that
        removed the row. :class:`NotFoundError` if the row never had any mutation.
        """
        info = table if isinstance(table, TableInfo) else self.table(table)
        stored = self.stored_key(info, key)
        found, _ = self.key_history(info, self.key_text_of(stored))
        if not found:
            raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
        return [
            m
            for m in found
            if (since is None or m.committed_at >= since)
            and (until is None or m.committed_at < until)
            and (include_rolled_back or not m.rolled_back)
        ]

    # ------------------------------------------------------------------ blame

    def blame(self, table: str | TableInfo, key: Key) -> list[BlameEntry]:
        """For each column of the row's current value: the last committed write to it.

        Key columns are left out unless the table has no key. A rolled-back attempt on a column
        after that write is reported as ``rolled_back_request_id``/``rolled_back_at``. A row moved
        here from another key (key-changing UPDATE) is followed to its old key.
        :class:`NotFoundError` if the row does not exist now.
        """
        info = table if isinstance(table, TableInfo) else self.table(table)
        stored = self.stored_key(info, key)
        if info.dropped and info.until is None:
            raise NotFoundError(
                f"{info.name} was dropped: none of its rows exists now",
                hint=f"its history stays: cdc state history {info.name} --id ...",
            )
        if info.until is not None:
            raise NotFoundError(
                f"{info.name} is a former name of {info.current_name}"
                + (" (dropped since)" if info.dropped else "")
                + ": blame reads the row as it is now",
                hint=f"cdc state blame {info.current_name} --id ..., or its history by the former name",
            )
        k = self.key_text_of(stored)
        history, row = self.key_history(info, k)  # the row now: as its committed changes left it
        if row is None:
            if not history:
                raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
            raise NotFoundError(
                f"{info.name} {format_key(stored)} does not exist now (deleted or moved)",
                hint=f"see its history: cdc state history {info.name} --id ...",
            )
        steps = self.ddl_steps(info.table_id)
        last = next((m for m in reversed(history) if not m.rolled_back and m.key_text == k), None)
        if steps and last is not None:  # the row as the table's DDLs since its last change left it
            row = self.evolve(info.table_id, row, last.cursor, (MAX_ORDINAL, MAX_ORDINAL)) or row

        def now_names(m: Mutation) -> set[str]:
            """The columns a change wrote, by their names now (renamed by later DDLs)."""
            names = set(m.changed)
            for step in steps:
                if step.cursor > m.cursor:
                    names = {step.renamed.get(n, n) for n in names if n not in step.dropped}
            return names

        columns = [c for c in row if info.keyless or c not in stored]
        written: dict[str, Mutation] = {}
        attempts: dict[str, Mutation] = {}
        unresolved = set(columns)
        for _ in range(_MAX_KEY_HOPS):  # a row moved between keys is followed to its old key
            moved_from = self._blame_key(history, k, unresolved, written, attempts, now_names)
            if moved_from is None or not unresolved or moved_from.old_key_text is None:
                break
            k = moved_from.old_key_text
            history, _ = self.key_history(info, k, before=moved_from.cursor)
        entries = []
        for column in columns:
            w = written.get(column)
            attempt = attempts.get(column)
            entries.append(
                BlameEntry(
                    column=column,
                    value=row[column],
                    request_id=w.request_id if w else None,
                    committed_at=w.committed_at if w else None,
                    version=w.version if w else None,
                    op=w.op if w else None,
                    rolled_back=attempt is not None,
                    rolled_back_request_id=attempt.request_id if attempt else None,
                    rolled_back_at=attempt.committed_at if attempt else None,
                )
            )
        return entries

    @staticmethod
    def _blame_key(
        history: list[Mutation],
        k: str,
        unresolved: set[str],
        written: dict[str, Mutation],
        attempts: dict[str, Mutation],
        now_names: Callable[[Mutation], set[str]],
    ) -> Mutation | None:
        """Walk the row's changes at ``k`` back; the UPDATE that moved it here, if any."""
        for mutation in reversed(history):
            if mutation.key_text != k:  # TRUNCATEs, the UPDATE moving the row away: its older lives
                continue
            if mutation.is_keyframe:
                unresolved.clear()  # older writes were pruned: "written before the history floor"
                return None
            if mutation.op == "DELETE" and not mutation.rolled_back:
                unresolved.clear()
                return None
            touched = (
                set(unresolved)
                if mutation.op in ("INSERT", "SNAPSHOT", "DELETE")
                else unresolved.intersection(now_names(mutation))
            )
            if mutation.rolled_back:
                for column in touched:
                    attempts.setdefault(column, mutation)
                continue
            for column in touched:
                written[column] = mutation
            unresolved -= touched
            if mutation.op in ("INSERT", "SNAPSHOT"):
                unresolved.clear()
            if mutation.op == "UPDATE" and mutation.old_key_text is not None:
                return mutation
            if not unresolved:
                return None
        return None


def _multiset_delta(raw: RawChange, k: str) -> int:
    """How a change of a keyless table changes the number of rows with value ``k``."""
    if raw.key_text == k:
        if raw.op == OP_CODES["DELETE"]:
            return -1
        if raw.op == OP_CODES["UPDATE"] and raw.old_key_text is None:
            return 0
        return 1
    return -1 if raw.old_key_text == k else 0
