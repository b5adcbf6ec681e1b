"""Schema changes in the capture path: the source's ``cdc.ddl`` messages (sql/ddl.sql) into the
store (docs/ddl.md).

``DdlHandler.expand`` takes each finished transaction before it is batched. One without a
``cdc.ddl`` message (nearly all) is returned as it is. For a committed one with such messages,
in order:

* ``alter`` (a table created, altered, renamed, a partition detached): the new shape is
  registered at the transaction's position (``tables``, ``table_names``: the name from the DDL's
  version on, ``table_schemas``), and a ``ddl_events`` row records what readers apply to older
  images (renamed, added with the value existing rows got, dropped columns);
* ``drop``: ``tables.dropped_position`` = the position; the oid, if seen again, is a new table;
* ``rows``: the table's rows after a DDL that changed values without WAL rows, as SNAPSHOT
  changes (after a TRUNCATE line when ``reset``) inserted at the message's ordinal; the
  transaction's later changes (and its messages' ordinals) move up;
* ``inexact``: the table was too large to record: a ``ddl_events`` row marks its history inexact
  from this version until a backfill.

Store writes go through the registry's connection (idempotent, like its registrations). No row
value is logged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import orjson
import psycopg
import structlog

from cdc.capture.model import ColumnDesc, FinishedTransaction, Kind, RelationDesc, RelationInfo
from cdc.capture.registry import Registry
from cdc.config import format_table
from cdc.errors import StoreUnavailableError, error_text
from cdc.lsn import format_lsn
from cdc.source_ddl import ddl_installed

__all__ = ["DDL_PREFIX", "DdlHandler", "column_diff", "default_value"]

log = structlog.get_logger("cdc.ddl")

#: The prefix of schema-change messages (sql/ddl.sql).
DDL_PREFIX = "cdc.ddl"

_NULL = b"\\N"


class SnapshotLines(Protocol):
    def snapshot_lines(
        self, info: RelationInfo, copy_rows: bytes, *, position: int, first_ordinal: int, committed_at_us: int
    ) -> tuple[bytes, int]: ...


def default_value(column: Mapping[str, Any]) -> Any:
    """The JSON value rows older than ADD COLUMN read for it (its ``attmissingval``, or null)."""
    text = column.get("missing")
    if text is None or not column.get("has_missing"):
        return None
    kind = Kind.for_type(int(column.get("type_oid") or 25))
    if kind is Kind.INTEGER:
        try:
            return int(text)
        except ValueError:
            return text
    if kind is Kind.BOOLEAN:
        return text in ("t", "true")
    return str(text)


def _published(shape: Mapping[str, Any] | None) -> dict[int, Mapping[str, Any]]:
    if not shape:
        return {}
    return {int(c["attnum"]): c for c in shape.get("columns") or () if c.get("published", True)}


def column_diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
    """What a DDL did to a table, from its shapes before and after (columns matched by attnum)."""
    details: dict[str, Any] = {"name": [new.get("schema"), new.get("name")]}
    if old is None:
        details["created"] = True
        return details
    if (old.get("schema"), old.get("name")) != (new.get("schema"), new.get("name")):
        details["renamed_from"] = [old.get("schema"), old.get("name")]
    before, after = _published(old), _published(new)
    renamed = {
        before[a]["name"]: after[a]["name"]
        for a in before
        if a in after and before[a]["name"] != after[a]["name"]
    }
    added = {after[a]["name"]: default_value(after[a]) for a in after if a not in before}
    dropped = [before[a]["name"] for a in before if a not in after]
    retyped = [
        {"name": after[a]["name"], "from": before[a].get("type"), "to": after[a].get("type")}
        for a in after
        if a in before
        and (before[a].get("type_oid"), before[a].get("type_modifier"))
        != (after[a].get("type_oid"), after[a].get("type_modifier"))
    ]
    for key, value in (("renamed", renamed), ("added", added), ("dropped", dropped), ("retyped", retyped)):
        if value:
            details[key] = value
    return details


def relation_desc(shape: Mapping[str, Any], position: int) -> RelationDesc:
    """The Relation message pgoutput would send for the shape."""
    return RelationDesc(
        int(shape["oid"]),
        str(shape["schema"]),
        str(shape["name"]),
        str(shape.get("replica_identity") or "d"),
        tuple(
            ColumnDesc(str(c["name"]), int(c["type_oid"]), int(c["type_modifier"]), bool(c.get("key")))
            for c in sorted(shape.get("columns") or (), key=lambda c: int(c["attnum"]))
            if c.get("published", True)
        ),
        position,
    )


class _Lines:
    """COPY lines held in memory, handed out like a finished transaction's chunks."""

    def __init__(self, lines: list[bytes]) -> None:
        self._lines = lines

    def chunks(self, max_bytes: int) -> Iterator[bytes]:
        part: list[bytes] = []
        size = 0
        for line in self._lines:
            part.append(line)
            size += len(line)
            if size >= max_bytes:
                yield b"".join(part)
                part, size = [], 0
        if part:
            yield b"".join(part)


@dataclasses.dataclass
class _Insert:
    at: int  # the message's ordinal (before renumbering)
    index: int  # the message's place among the transaction's messages
    lines: list[bytes]
    table_id: int


class DdlHandler:
    """Applies the ``cdc.ddl`` messages of finished transactions (see the module doc)."""

    def __init__(
        self, registry: Registry, core: SnapshotLines | None = None, *, relation_only: bool = False
    ) -> None:
        self.registry = registry
        self.core = core
        #: no event trigger on the source: shape changes are read from Relation messages
        self.relation_only = relation_only
        self._shapes: dict[int, tuple[tuple[str, int, int], ...]] = {}  # oid -> columns last seen

    @classmethod
    def for_source(cls, registry: Registry, catalog: psycopg.Connection[Any]) -> DdlHandler:
        """A handler for the source's mode (docs/ddl.md "Two modes")."""
        try:
            relation_only = not ddl_installed(catalog)
        except psycopg.Error:
            relation_only = False
        if relation_only:
            log.warning("schema_changes_from_relation_messages_only")
        return cls(registry, relation_only=relation_only)

    # -- relation messages only ----------------------------------------------------------------
    def relation(self, desc: RelationDesc, info: RelationInfo) -> RelationInfo:
        """Without the event trigger: a column added, dropped or retyped between two Relation
        messages of a table becomes a ``ddl_events`` row at the second one's position (by name:
        a rename looks like a drop and an add; an added column's value in older rows is unknown,
        read as null)."""
        if not self.relation_only:
            return info
        columns = tuple((c.name, c.type_oid, c.type_modifier) for c in desc.columns)
        previous = self._shapes.get(desc.oid)
        if previous is None:
            previous = self._stored_shape(info, desc.lsn)
        self._shapes[desc.oid] = columns
        if previous is None or previous == columns:
            return info
        old = {name: (t, m) for name, t, m in previous}
        new = {name: (t, m) for name, t, m in columns}
        details: dict[str, Any] = {"name": [desc.namespace, desc.name], "relation_message": True}
        added = {name: None for name in new if name not in old}
        dropped = [name for name in old if name not in new]
        retyped = [
            {"name": n, "from": old[n][0], "to": new[n][0]} for n in new if n in old and old[n] != new[n]
        ]
        for key, value in (("added", added), ("dropped", dropped), ("retyped", retyped)):
            if value:
                details[key] = value
        self.registry.conn.execute(
            "INSERT INTO ddl_events (position, ordinal, seq, table_id, command, details) "
            "VALUES (%s, -1, %s, %s, '(relation message)', %s::jsonb) ON CONFLICT DO NOTHING",
            (desc.lsn, info.table_id, info.table_id, orjson.dumps(details).decode()),
        )
        log.info("schema_changed", table=format_table(desc.namespace, desc.name), lsn=format_lsn(desc.lsn))
        return info

    def _stored_shape(self, info: RelationInfo, lsn: int) -> tuple[tuple[str, int, int], ...] | None:
        """The table's shape in force before ``lsn`` as the store has it (an earlier session's; a
        new shape registered now starts at ``lsn``)."""
        row = self.registry.conn.execute(
            "SELECT columns FROM table_schemas WHERE table_id = %s AND first_position < %s "
            "ORDER BY first_position DESC, schema_id DESC LIMIT 1",
            (info.table_id, lsn),
        ).fetchone()
        if row is None:
            return None
        return tuple((str(c["name"]), int(c["type_oid"]), int(c["type_modifier"])) for c in row[0])

    def expand(self, txn: FinishedTransaction) -> FinishedTransaction:
        messages = txn.messages
        if txn.status != "c" or not any(m[2] == DDL_PREFIX for m in messages):
            return txn
        try:
            return self._expand(txn)
        except psycopg.OperationalError as exc:
            self.registry.close()
            raise StoreUnavailableError(
                f"cannot record a schema change in the store: {error_text(exc)}"
            ) from exc

    def _expand(self, txn: FinishedTransaction) -> FinishedTransaction:
        messages = txn.messages
        parsed = self._parse(messages)
        confirmed = {m.get("token") for _i, _o, _l, m in parsed if m.get("kind") == "confirm"}
        # A table attached as a partition and detached again in the same transaction stays the
        # table it was (its changes in the transaction were encoded for it already).
        attached = {m.get("oid") for _i, _o, _l, m in parsed if m.get("kind") == "drop" and m.get("attached")}
        both = {m.get("oid") for _i, _o, _l, m in parsed if m.get("detached") and m.get("oid") in attached}
        inserts: list[_Insert] = []
        events: list[tuple[int, int, dict[str, Any]]] = []  # (message index, table_id, row)
        infos: dict[int, RelationInfo] = {}  # oid -> the shape registered in this transaction
        for index, ordinal, lsn, message in parsed:
            kind = message.get("kind")
            if kind == "confirm":
                continue
            if "token" in message and message["token"] not in confirmed:
                log.info("ddl_rolled_back", lsn=format_lsn(lsn))  # undone by ROLLBACK TO SAVEPOINT
                continue
            oid = int(message["oid"])
            if oid in both and (message.get("attached") or message.get("detached")):
                continue
            if kind == "alter":
                found = self._alter(txn, oid, message, infos)
                if found is not None:
                    events.append((index, found[0], found[1]))
            elif kind == "drop":
                found_drop = self._drop(txn, oid, message)
                if found_drop is not None:
                    events.append((index, found_drop[0], found_drop[1]))
            elif kind == "rows":
                insert = self._rows(txn, oid, message, ordinal, index, infos)
                if insert is not None:
                    inserts.append(insert)
            elif kind == "inexact":
                table_id = self.registry.live_table(oid)
                if table_id is not None:
                    details = {
                        "inexact": True,
                        "reason": message.get("reason"),
                        "limit": message.get("limit"),
                    }
                    events.append((index, table_id, {"command": str(message.get("reason") or "ALTER TABLE"),
                                                       "details": details, "context": None}))  # fmt: skip
                    log.warning(
                        "ddl_rewrite_inexact",
                        table=self.registry.table_name(table_id),
                        table_id=table_id,
                        lsn=format_lsn(txn.position),
                    )
        if inserts:
            txn = self._insert(txn, inserts)
        self._store_events(txn, events)
        return txn

    # -- messages ------------------------------------------------------------------------
    @staticmethod
    def _parse(messages: list[tuple[int, int, str, bytes]]) -> list[tuple[int, int, int, dict[str, Any]]]:
        """(index among the messages, ordinal, lsn, message) of each well-formed ``cdc.ddl`` one."""
        out = []
        for index, (ordinal, lsn, prefix, content) in enumerate(messages):
            if prefix != DDL_PREFIX:
                continue
            try:
                message = orjson.loads(content)
                if not isinstance(message, dict) or (
                    message.get("kind") != "confirm" and "oid" not in message
                ):
                    raise ValueError(message)
                int(message.get("oid") or 0)
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.warning("ddl_message_malformed", lsn=format_lsn(lsn))
                continue
            out.append((index, ordinal, lsn, message))
        return out

    def _alter(
        self, txn: FinishedTransaction, oid: int, message: dict[str, Any], infos: dict[int, RelationInfo]
    ) -> tuple[int, dict[str, Any]] | None:
        new = message.get("new")
        if not isinstance(new, dict):
            return None
        known = self.registry.live_table(oid)
        if known is None and not message.get("published"):
            return None  # a table capture does not follow
        info = self.registry.describe(relation_desc(new, txn.position))
        infos[oid] = info
        # The core reads a whole drain of frames before their transactions come here: a later
        # transaction's Relation message may have registered the table first.
        self.registry.conn.execute(
            "UPDATE tables SET first_position = %s WHERE table_id = %s AND first_position > %s",
            (txn.position, info.table_id, txn.position),
        )
        old = message.get("old") if isinstance(message.get("old"), dict) else None
        if known is None and old is not None:
            old = None  # first seen now (it joined the publication): no earlier images to map
        details = column_diff(old, new)
        if message.get("rewritten"):
            details["rewritten"] = True
        if message.get("detached"):
            details["detached"] = True
        self._rename(info.table_id, new, txn.position)
        if "renamed_from" in details:
            log.info(
                "table_renamed",
                table=format_table(str(new["schema"]), str(new["name"])),
                table_id=info.table_id,
                lsn=format_lsn(txn.position),
            )
        command = str(message.get("tag") or "ALTER TABLE")
        return info.table_id, {"command": command, "details": details, "context": message.get("context")}

    def _rename(self, table_id: int, shape: Mapping[str, Any], position: int) -> None:
        """The table's name from the DDL's version on: the last name a transaction gave it wins
        (a swap by renames inside one transaction)."""
        conn = self.registry.conn
        row = conn.execute(
            "SELECT schema_name, table_name FROM table_names WHERE table_id = %s AND from_position < %s "
            "ORDER BY from_position DESC LIMIT 1",
            (table_id, position),
        ).fetchone()
        name = (str(shape["schema"]), str(shape["name"]))
        if row is not None and (row[0], row[1]) == name:
            conn.execute(
                "DELETE FROM table_names WHERE table_id = %s AND from_position = %s", (table_id, position)
            )
            return
        conn.execute(
            "INSERT INTO table_names (table_id, schema_name, table_name, from_position) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (table_id, from_position) DO UPDATE SET schema_name = EXCLUDED.schema_name, "
            "table_name = EXCLUDED.table_name",
            (table_id, name[0], name[1], position),
        )
        # A later transaction's Relation message (read in the same drain) may have named it so
        # already, from its own position: that row says nothing new.
        conn.execute(
            "DELETE FROM table_names WHERE table_id = %s AND schema_name = %s AND table_name = %s "
            "AND from_position = (SELECT min(from_position) FROM table_names WHERE table_id = %s AND from_position > %s)",
            (table_id, name[0], name[1], table_id, position),
        )

    def _drop(
        self, txn: FinishedTransaction, oid: int, message: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | None:
        table_id = self.registry.live_table(oid)
        if table_id is None:
            return None
        self.registry.conn.execute(
            "UPDATE tables SET dropped_position = %s WHERE table_id = %s AND dropped_position IS NULL",
            (txn.position, table_id),
        )
        self.registry.forget(oid)
        log.info(
            "table_dropped",
            table=format_table(str(message.get("schema")), str(message.get("name"))),
            table_id=table_id,
            lsn=format_lsn(txn.position),
        )
        details = {"dropped_table": True, "name": [message.get("schema"), message.get("name")]}
        return table_id, {"command": str(message.get("tag") or "DROP TABLE"), "details": details,
                          "context": message.get("context")}  # fmt: skip

    def _rows(
        self,
        txn: FinishedTransaction,
        oid: int,
        message: dict[str, Any],
        ordinal: int,
        index: int,
        infos: dict[int, RelationInfo],
    ) -> _Insert | None:
        info = infos.get(oid)
        if info is None:
            return None  # not a table capture follows
        lines: list[bytes] = []
        if message.get("reset"):
            lines.append(
                b"%d\t0\t%s\t%d\t%d\tT\t0\t%d\t\\N\t\\N\t\\N\t\\N\t\\N\t\\N\n"
                % (txn.position, txn.committed_at_text.encode(), info.table_id, info.schema_id, txn.position)
            )
        copy = str(message.get("copy") or "").encode()
        if copy:
            assert self.core is not None, "the capture core is set before the first transaction"
            data, _count = self.core.snapshot_lines(
                info, copy, position=txn.position, first_ordinal=0, committed_at_us=txn.committed_at_us
            )
            lines.extend(data.splitlines(keepends=True))
        return _Insert(ordinal, index, lines, info.table_id) if lines else None

    # -- the transaction's changes -----------------------------------------------------------
    @staticmethod
    def _insert(txn: FinishedTransaction, inserts: list[_Insert]) -> FinishedTransaction:
        """The transaction with the snapshot lines inserted at their ordinals, every line
        renumbered, the messages' ordinals moved with them."""
        original: list[bytes] = []
        for chunk in txn.chunks(1 << 30):
            original.extend(chunk.splitlines(keepends=True))
        merged: list[bytes] = []
        taken = 0
        counts = dict(txn.counts)
        for insert in inserts:
            merged.extend(original[taken : insert.at])
            taken = max(taken, insert.at)
            merged.extend(insert.lines)
            for line in insert.lines:
                op = "T" if line.split(b"\t", 6)[5] == b"T" else "S"
                key = (insert.table_id, op, False)
                counts[key] = counts.get(key, 0) + 1
        merged.extend(original[taken:])
        prefix = b"%d\t" % txn.position
        lines = [b"%s%d\t%s" % (prefix, i, line.split(b"\t", 2)[2]) for i, line in enumerate(merged)]
        shifted = []
        for index, (ordinal, lsn, prefix_text, content) in enumerate(txn.messages):
            # rows a message before this one inserted move it up (at its ordinal or before it)
            moved = sum(len(i.lines) for i in inserts if i.index < index)
            shifted.append((ordinal + moved, lsn, prefix_text, content))
        return dataclasses.replace(
            txn,
            change_count=len(lines),
            messages=shifted,
            counts=counts,
            _source=_Lines(lines),
        )

    def _store_events(
        self,
        txn: FinishedTransaction,
        events: list[tuple[int, int, dict[str, Any]]],
    ) -> None:
        if not events:
            return
        conn = self.registry.conn
        for seq, (index, table_id, row) in enumerate(events):
            # The event is at its message's ordinal, after the rows earlier messages inserted.
            # (txn is the renumbered transaction: its messages moved with the rows inserted)
            ordinal = txn.messages[index][0]
            context = row.get("context")
            conn.execute(
                "INSERT INTO ddl_events (position, ordinal, seq, table_id, command, details, committed_at, "
                "request_id, context) VALUES (%s, %s, %s, %s, %s, %s::jsonb, to_timestamp(%s), %s, %s) "
                "ON CONFLICT (position, ordinal, seq) DO NOTHING",
                (
                    txn.position,
                    ordinal,
                    seq,
                    table_id,
                    row["command"],
                    orjson.dumps(row["details"]).decode(),
                    txn.committed_at_us / 1e6 + 946_684_800,
                    context.get("request_id") if isinstance(context, dict) else None,
                    orjson.dumps(context).decode() if isinstance(context, dict) else None,
                ),
            )
