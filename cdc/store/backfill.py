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


def apply_chunks(cur: psycopg.Cursor[Any], items: list[ChunkDone]) -> None:
    """Write (or discard) each chunk in the current store transaction (search_path: the store)."""
    for item in items:
        _apply(cur, item)


def _apply(cur: psycopg.Cursor[Any], item: ChunkDone) -> None:
    chunk = int(item["chunk"])
    cur.execute(
        "SELECT table_id, last_chunk, range_last FROM backfill_chunks WHERE chunk_id = %s AND state = 's' "
        "FOR UPDATE",
        (chunk,),
    )
    row = cur.fetchone()
    if row is None or int(row[0]) != int(item["table_id"]):
        return  # not staged (done already, or a message nobody staged): nothing to do
    table_id, last_chunk, range_last = int(row[0]), bool(row[1]), row[2]
    position = int(item["position"])
    reason = item.get("discard")
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
    kept = 0
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
    log.debug("backfill_chunk_written", chunk=chunk, table_id=table_id, lsn=format_lsn(position), rows=kept)
