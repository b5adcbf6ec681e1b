"""The store writer's part of a backfill (docs/baseline.md "Backfill"): a chunk staged in
``backfill_rows`` becomes SNAPSHOT changes at its high watermark's position, in the store
transaction that acknowledges that position.

The daemon (cdc/capture/backfill.py) sends, per high watermark, the chunk and the keys that a
captured change touched between the chunk's two watermarks: those rows are left out (the
stream's change is newer); the rest are copied into ``changes`` by one INSERT ... SELECT (no row
travels through Python), the chunk and the table's ``baselines`` row move on, the staged rows
go. A chunk the daemon cannot vouch for (its low watermark was not seen, a keyless table changed
meanwhile) is discarded: `cdc backfill` reads it again. Idempotent: only a chunk in state
``s`` (staged) is taken.

A table whose history a rewrite left inexact (an ``inexact`` ``ddl_events`` row not resolved:
docs/ddl.md) is recorded again from the start: its first chunk's rows follow a reset (a
TRUNCATE change) at the chunk's low watermark, so that no row lives on under a key the rewrite
changed; the changes captured between the watermarks come after the reset and stay. When the
last chunk is written, the table's inexact events up to that first chunk are resolved
(``resolved_position`` = the last chunk's position): history is exact again from there. A chunk
whose window a rewrite too large to record fell into is discarded (its rows may predate it).
"""

from __future__ import annotations

from typing import Any, TypedDict

import psycopg
import structlog

from cdc.lsn import format_lsn

log = structlog.get_logger("cdc.writer")

#: ``transactions.origin`` of a high watermark's transaction row.
BACKFILL_ORIGIN = "cdc.backfill"


class ChunkDone(TypedDict, total=False):
    """A high watermark, as the daemon hands it to the writer (JSON over the pipe)."""

    chunk: int
    table_id: int
    position: int
    committed_at: str
    xid: int
    commit_lsn: int | None
    keys: list[str]  # keys (key_text) a captured change touched between the watermarks
    truncated: bool  # the table was truncated between the watermarks: no row of the chunk holds
    keyless: bool  # the chunk is the whole keyless table: a TRUNCATE first, then its rows
    discard: str | None  # why the chunk cannot be written (it is read again)
    opened_at: int  # the low watermark's position, its transaction's commit time and xid
    opened_committed_at: str
    opened_xid: int


def apply_chunks(cur: psycopg.Cursor[Any], items: list[ChunkDone]) -> None:
    """Write (or discard) each chunk in the current store transaction (search_path: the store)."""
    for item in items:
        _apply(cur, item)


def _apply(cur: psycopg.Cursor[Any], item: ChunkDone) -> None:
    chunk = int(item["chunk"])
    cur.execute(
        "SELECT table_id, last_chunk, range_last, range_after FROM backfill_chunks "
        "WHERE chunk_id = %s AND state = 's' FOR UPDATE",
        (chunk,),
    )
    row = cur.fetchone()
    if row is None or int(row[0]) != int(item["table_id"]):
        return  # not staged (done already, or a message nobody staged): nothing to do
    table_id, last_chunk, range_last, first = int(row[0]), bool(row[1]), row[2], row[3] is None
    position = int(item["position"])
    reason = item.get("discard")
    opened = item.get("opened_at")
    if not reason and opened is not None and _inexact_events(cur, table_id, int(opened), position):
        reason = "the table was rewritten (too large to record) while it was read"
    if reason:
        cur.execute(
            "UPDATE backfill_chunks SET state = 'x', reason = %s, finished_at = now() WHERE chunk_id = %s",
            (reason, chunk),
        )
        cur.execute("DELETE FROM backfill_rows WHERE position = %s", (chunk,))
        log.info(
            "backfill_chunk_discarded",
            chunk=chunk,
            table_id=table_id,
            lsn=format_lsn(position),
            reason=reason,
        )
        return
    at = item["committed_at"]
    cur.execute("SELECT coalesce(max(ordinal) + 1, 0) FROM changes WHERE position = %s", (position,))
    found = cur.fetchone()
    base = int(found[0]) if found else 0
    written = 0
    if item.get("keyless"):
        # The whole table, read in one window in which it did not change: it starts afresh here.
        cur.execute(
            "INSERT INTO changes (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn) "
            "SELECT %s, %s, %s, %s, (SELECT schema_id FROM backfill_rows WHERE position = %s LIMIT 1), 'T', 0, %s",
            (position, base, at, table_id, chunk, position),
        )
        base += 1
        written += 1
    elif first and opened is not None and _inexact_events(cur, table_id, None, int(opened)):
        _reset(cur, item, table_id, chunk)
    if not item.get("truncated"):
        cur.execute(
            "INSERT INTO changes (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, key_text, image) "
            "SELECT %(p)s, (%(base)s + row_number() OVER (ORDER BY b.ordinal) - 1)::integer, %(at)s, b.table_id, "
            "b.schema_id, 'S', b.flags, %(p)s, b.key_text, b.image FROM backfill_rows b "
            "WHERE b.position = %(chunk)s AND NOT EXISTS ("
            "  SELECT 1 FROM unnest(%(keys)s::text[]) AS k(key_text) WHERE k.key_text = b.key_text)",
            {"p": position, "base": base, "at": at, "chunk": chunk, "keys": list(item.get("keys") or [])},
        )
        kept = cur.rowcount
        written += kept
    if written:
        cur.execute(
            "INSERT INTO transactions (position, committed_at, xid, commit_lsn, status, flags, origin, change_count) "
            "VALUES (%s, %s, %s, %s, 'c', 0, %s, %s) ON CONFLICT (position, committed_at) DO UPDATE "
            "SET change_count = transactions.change_count + EXCLUDED.change_count",
            (position, at, int(item.get("xid") or 0), item.get("commit_lsn"), BACKFILL_ORIGIN, written),
        )
    cur.execute(
        "UPDATE backfill_chunks SET state = 'd', kept = %s, position = %s, finished_at = now() WHERE chunk_id = %s",
        (kept, position, chunk),
    )
    cur.execute("DELETE FROM backfill_rows WHERE position = %s", (chunk,))
    cur.execute(
        "UPDATE baselines SET rows = rows + %s, chunks_done = chunks_done + 1, position = %s, "
        "resume_after = coalesce(%s, resume_after), state = CASE WHEN %s THEN 'done' ELSE state END, "
        "complete_from = CASE WHEN %s THEN coalesce(complete_from, %s) ELSE complete_from END, "
        "finished_at = CASE WHEN %s THEN now() END, updated_at = now() WHERE table_id = %s AND kind = 'f'",
        (kept, position, range_last, last_chunk, last_chunk, position, last_chunk, table_id),
    )
    if last_chunk:
        _resolve(cur, table_id, position)
    log.debug("backfill_chunk_written", chunk=chunk, table_id=table_id, lsn=format_lsn(position), rows=kept)


_INEXACT = (
    "SELECT position FROM ddl_events WHERE table_id = %s AND (details ->> 'inexact')::boolean "
    "AND resolved_position IS NULL AND position > %s AND position <= %s ORDER BY position LIMIT 1"
)


def _inexact_events(cur: psycopg.Cursor[Any], table_id: int, after: int | None, upto: int) -> bool:
    """Whether the table has an inexact rewrite not resolved in ``(after, upto]``."""
    cur.execute(_INEXACT, (table_id, -1 if after is None else after, upto))
    return cur.fetchone() is not None


def _reset(cur: psycopg.Cursor[Any], item: ChunkDone, table_id: int, chunk: int) -> None:
    """A TRUNCATE of the table at the chunk's low watermark: a table recorded again starts afresh
    there (before the changes captured between the watermarks, which are newer than the read)."""
    opened, at = int(item["opened_at"]), item["opened_committed_at"]
    cur.execute("SELECT coalesce(max(ordinal) + 1, 0) FROM changes WHERE position = %s", (opened,))
    found = cur.fetchone()
    ordinal = int(found[0]) if found else 0
    cur.execute(
        "INSERT INTO changes (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn) "
        "SELECT %(p)s, %(o)s, %(at)s, %(t)s, coalesce("
        "  (SELECT schema_id FROM backfill_rows WHERE position = %(chunk)s LIMIT 1), "
        "  (SELECT schema_id FROM table_schemas WHERE table_id = %(t)s AND first_position <= %(p)s "
        "   ORDER BY first_position DESC, schema_id DESC LIMIT 1)), 'T', 0, %(p)s",
        {"p": opened, "o": ordinal, "at": at, "t": table_id, "chunk": chunk},
    )
    cur.execute(
        "INSERT INTO transactions (position, committed_at, xid, commit_lsn, status, flags, origin, change_count) "
        "VALUES (%s, %s, %s, NULL, 'c', 0, %s, 1) ON CONFLICT (position, committed_at) DO UPDATE "
        "SET change_count = transactions.change_count + 1",
        (opened, at, int(item.get("opened_xid") or 0), BACKFILL_ORIGIN),
    )
    log.info("backfill_table_reset", chunk=chunk, table_id=table_id, lsn=format_lsn(opened))


def _resolve(cur: psycopg.Cursor[Any], table_id: int, position: int) -> None:
    """The table's last chunk is written at ``position``: its inexact rewrites up to the first
    chunk of this recording (whose reset cleared what they left) are resolved there."""
    cur.execute(
        "UPDATE ddl_events SET resolved_position = %s WHERE table_id = %s AND (details ->> 'inexact')::boolean "
        "AND resolved_position IS NULL AND position <= (SELECT position FROM backfill_chunks "
        "WHERE table_id = %s AND state = 'd' AND range_after IS NULL ORDER BY chunk_id DESC LIMIT 1)",
        (position, table_id, table_id),
    )
    if cur.rowcount:
        log.info("ddl_inexact_resolved", table_id=table_id, lsn=format_lsn(position), events=cur.rowcount)
