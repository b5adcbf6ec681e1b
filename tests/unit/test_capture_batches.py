"""Batches and acknowledgement from fake core events (no server)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from cdc.capture.ack import Acknowledgement
from cdc.capture.batches import CONTEXT_REJECTED, Batch, BatchBuilder, split_lines
from cdc.capture.model import MAYBE_INCOMPLETE, PG_EPOCH_OFFSET_US, FinishedTransaction, LogicalMessage
from cdc.capture.writer_process import _receive_batch, encode_batch
from cdc.context import (
    CONTEXT_PREFIX,
    ERROR_PREFIX,
    ContextKeys,
    ContextVerifier,
    RequestContext,
    context_key_id,
    sign_content,
)

T0 = int(datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp() * 1_000_000)
T0_TEXT = "2026-03-10 12:00:00.000000+00"
KEY = b"k" * 32
KEYS = ContextKeys(KEY, context_key_id(KEY))
XID = 700


class FakeTransaction:
    """What batches.py reads of a core FinishedTransaction."""

    def __init__(
        self,
        position: int,
        changes: int,
        *,
        messages: list[tuple[int, int, str, bytes]] | None = None,
        status: str = "c",
        pending: int = 0,
        chunk_lines: int = 4,
    ) -> None:
        self.xid = XID
        self.position = position
        self.commit_lsn = position - 8
        self.committed_at_us = T0 - PG_EPOCH_OFFSET_US  # the core's times are PostgreSQL epoch
        self.committed_at_text = T0_TEXT
        self.status = status
        self.flags = 0
        self.origin = None
        self.change_count = changes
        self.pending_count = pending
        self.first_lsn = position - 100
        self.last_lsn = position - 10
        self.messages = messages or []
        self.counts = {(1, "I", status == "r"): changes} if changes else {}
        self.chunk_lines = chunk_lines

    def chunks(self, max_bytes: int) -> Iterator[bytes]:
        lines = [
            f"{self.position}\t{i}\t{T0_TEXT}\t1\t1\tI\t0\t{self.first_lsn + i}\t\\N\t[{i}]\t{{}}\t\\N\t\\N\t\\N\n".encode()
            for i in range(self.change_count)
        ]
        for start in range(0, len(lines), self.chunk_lines):
            yield b"".join(lines[start : start + self.chunk_lines])


def ctx(
    request_id: str,
    actor: str | None = None,
    *,
    xid: int = XID,
    key: bytes = KEY,
    session_level: bool | None = None,
    **extra: Any,
) -> bytes:
    """A ``cdc.context`` message as cdc.emit_context() writes it: signed, bound to its transaction."""
    doc: dict[str, Any] = {"request_id": request_id, "actor": actor, "db_user": "app", "backend_pid": 42}
    doc.update(
        {"source": "setting", "application_name": None, "client_addr": None, "extra": extra, "xid": xid}
    )
    doc["session_level"] = session_level
    return sign_content(CONTEXT_PREFIX, json.dumps(doc).encode(), key)


def error_message(request_id: str, **fields: Any) -> bytes:
    """A ``cdc.error`` message as cdc.report_error() writes it."""
    doc: dict[str, Any] = {
        "request_id": request_id,
        "xid": 12,
        "error_type": "ValueError",
        "message": "boom",
        "location": None,
        "actor": None,
        "at": "2026-03-10T12:00:00Z",
        "db_user": "app",
        "client_addr": "10.0.0.7",
        "backend_pid": 42,
        "reporter_pid": None,
    }
    doc.update(fields)
    return sign_content(ERROR_PREFIX, json.dumps(doc).encode(), KEY)


class Rejections:
    """The verifier's on_reject: (prefix, lsn, reason), as the daemon logs and counts them."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def __call__(self, prefix: str, lsn: int, reason: str) -> None:
        self.seen.append((prefix, lsn, reason))


def builder(
    max_rows: int = 100,
    seqs: dict[str, int] | None = None,
    rejected: Rejections | None = None,
    on_session_level: Callable[[RequestContext, int], None] | None = None,
) -> BatchBuilder:
    stored = seqs or {}
    verifier = ContextVerifier(lambda: KEYS, on_reject=rejected)
    return BatchBuilder(
        max_rows=max_rows,
        actor_last_seq=lambda actor: stored.get(actor, 0),
        verifier=verifier,
        on_session_level=on_session_level,
    )


def add(b: BatchBuilder, event: Any) -> list[Batch]:
    return list(b.add(event))


def fields(line: bytes) -> list[str]:
    return line.decode().rstrip("\n").split("\t")


def test_small_transactions_share_a_batch_with_their_rows_and_ack() -> None:
    b = builder()
    assert add(b, FakeTransaction(1000, 3)) == []
    assert add(b, FakeTransaction(2000, 2)) == []
    batch = b.take()
    assert batch is not None and b.current is None
    store = batch.store
    assert store.rows == 5 and store.ack_lsn == 2000 and store.fresh == [1000, 2000]
    assert [fields(t)[:8] for t in store.transactions] == [
        ["1000", T0_TEXT, "700", "992", "c", "0", "\\N", "3"],
        ["2000", T0_TEXT, "700", "1992", "c", "0", "\\N", "2"],
    ]
    assert store.min_us == store.max_us == T0 and store.max_position == 2000
    assert batch.counts == {(1, "I", False): 5} and batch.statuses == {"c": 2}


def test_context_spans_actor_sequences_and_rejected_messages() -> None:
    rejected = Rejections()
    b = builder(seqs={"alice": 10}, rejected=rejected)
    messages = [
        (0, 1, CONTEXT_PREFIX, ctx("r1", "alice")),
        (0, 2, CONTEXT_PREFIX, ctx("r1", "alice")),  # the same again: no new span
        (2, 3, CONTEXT_PREFIX, b"not json"),  # rejected: r1 stays in force
        (2, 6, CONTEXT_PREFIX, ctx("forged", "mallory", key=b"m" * 32)),  # another key: rejected
        (3, 4, CONTEXT_PREFIX, ctx("r2", "alice", tenant="t1")),
        (5, 5, CONTEXT_PREFIX, ctx("r3")),  # after the last change: describes nothing
    ]
    add(b, FakeTransaction(1000, 5, messages=messages))
    batch = b.take()
    assert batch is not None
    txn = fields(batch.store.transactions[0])
    assert txn[5] == str(CONTEXT_REJECTED)
    assert rejected.seen == [(CONTEXT_PREFIX, 3, "unsigned"), (CONTEXT_PREFIX, 6, "bad_mac")]
    assert txn[8:11] == ["r1", "alice", "11"]  # changes 0..2: sequences 11, 12, 13
    assert json.loads(txn[11]) == {
        "request_id": "r1",
        "actor": "alice",
        "db_user": "app",
        "backend_pid": 42,
        "source": "setting",
    }
    [change] = batch.store.context_changes
    row = fields(change)
    assert row[:6] == ["1000", T0_TEXT, "3", "r2", "alice", "14"]  # changes 3..4: 14, 15
    assert json.loads(row[6])["extra"] == {"tenant": "t1"}
    assert batch.store.actor_sequences == {"alice": 15}
    add(b, FakeTransaction(2000, 1, messages=[(0, 1, CONTEXT_PREFIX, ctx("r4", "alice"))]))
    nxt = b.take()
    assert nxt is not None and fields(nxt.store.transactions[0])[10] == "16"


def test_context_set_after_the_first_change_is_a_context_change() -> None:
    b = builder()
    add(b, FakeTransaction(1000, 3, messages=[(1, 1, CONTEXT_PREFIX, ctx("late"))]))
    batch = b.take()
    assert batch is not None
    assert fields(batch.store.transactions[0])[8:12] == ["\\N", "\\N", "\\N", "\\N"]
    assert fields(batch.store.context_changes[0])[2:4] == ["1", "late"]


def test_rolled_back_transactions_are_maybe_incomplete_unless_every_change_is_streamed() -> None:
    """The core's MAYBE_INCOMPLETE is kept; without immediate streaming every rolled-back
    transaction gets it (the changes buffered since its last segment die with the abort)."""
    for every_change_streamed, expected in ((True, ["0", "2", "0"]), (False, ["0", "2", "2"])):
        b = builder()
        b.every_change_streamed = every_change_streamed
        behind = FakeTransaction(2000, 1, status="r")
        behind.flags = MAYBE_INCOMPLETE
        for event in (FakeTransaction(1000, 1), behind, FakeTransaction(3000, 1, status="r")):
            add(b, event)
        batch = b.take()
        assert batch is not None
        assert [fields(t)[5] for t in batch.store.transactions] == expected


def test_a_session_level_request_id_is_reported_once_per_context_message() -> None:
    """A context whose request id was carried over from an earlier transaction (a session-level
    SET): reported through on_session_level when verified, and kept in the stored document."""
    seen: list[tuple[str | None, int]] = []
    b = builder(on_session_level=lambda ctx, lsn: seen.append((ctx.request_id, lsn)))
    carried = ctx("leaky", session_level=True)
    plain = ctx("tidy")
    add(b, FakeTransaction(1000, 1, messages=[(0, 900, CONTEXT_PREFIX, carried)]))
    add(b, FakeTransaction(2000, 1, messages=[(0, 1900, CONTEXT_PREFIX, plain)]))
    batch = b.take()
    assert batch is not None and seen == [("leaky", 900)]
    documents = [json.loads(fields(t)[11]) for t in batch.store.transactions]
    assert [d.get("session_level") for d in documents] == [True, None]


def test_a_transaction_without_change_or_context_only_acknowledges() -> None:
    b = builder()
    add(b, FakeTransaction(1000, 0))
    batch = b.take()
    assert batch is not None and batch.store.transactions == [] and batch.store.ack_lsn == 1000
    add(b, FakeTransaction(2000, 0, messages=[(0, 1, CONTEXT_PREFIX, ctx("reads-only"))]))
    batch = b.take()
    assert batch is not None and fields(batch.store.transactions[0])[7:9] == ["0", "reads-only"]


def test_a_large_transaction_is_split_and_acknowledged_with_its_last_chunk() -> None:
    b = builder(max_rows=10)
    add(b, FakeTransaction(500, 2))
    full = add(b, FakeTransaction(1000, 25, pending=1, chunk_lines=7))
    assert [f.rows for f in full] == [10, 10]
    first, second = full
    assert first.store.ack_lsn == 500 and second.store.ack_lsn is None
    assert first.store.fresh == [500, 1000] and second.store.fresh == []
    assert first.store.pending == [1000] and second.store.pending == [1000]
    assert [fields(t)[0] for t in first.store.transactions] == ["500"]
    assert second.store.transactions == []
    last = b.take()
    assert last is not None and last.rows == 7 and last.store.ack_lsn == 1000
    assert [fields(t)[0] for t in last.store.transactions] == ["1000"]
    ordinals = [
        int(fields(line)[1])
        for batch in (first, second, last)
        for part in batch.store.changes
        for line in part.splitlines(keepends=True)
        if fields(line)[0] == "1000"
    ]
    assert ordinals == list(range(25))


def test_error_messages_become_request_errors() -> None:
    rejected = Rejections()
    b = builder(rejected=rejected)
    assert add(b, LogicalMessage(4242, ERROR_PREFIX, error_message("r9"))) == []
    add(b, LogicalMessage(4243, ERROR_PREFIX, b"{"))  # does not verify: dropped
    unsigned = json.dumps(
        {"request_id": "r9", "error_type": "Forged", "message": "x", "at": "2026-03-10T12:00:00Z"}
    )
    add(b, LogicalMessage(4244, ERROR_PREFIX, unsigned.encode()))  # a raw pg_logical_emit_message: dropped
    add(b, LogicalMessage(4244, ERROR_PREFIX, unsigned.encode()))  # read again: reported once per LSN
    proven = error_message("r9", backend_pid=41, reporter_pid=43, message="over a second connection")
    add(b, LogicalMessage(4245, ERROR_PREFIX, proven))
    batch = b.take()
    assert batch is not None
    first, second = batch.store.request_errors
    assert first["lsn"] == 4242 and first["request_id"] == "r9" and first["error_type"] == "ValueError"
    assert (
        first["db_user"],
        first["backend_pid"],
        first["client_addr"],
        first["xid"],
        first["reporter_pid"],
    ) == (
        "app",
        42,
        "10.0.0.7",
        12,
        None,
    )
    assert (second["backend_pid"], second["reporter_pid"]) == (41, 43)
    assert rejected.seen == [(ERROR_PREFIX, 4243, "unsigned"), (ERROR_PREFIX, 4244, "unsigned")]


def test_a_signed_context_is_refused_in_another_transaction() -> None:
    """A signed body copied out of the WAL and emitted again in another transaction attributes
    nothing, even when the same bytes were verified (and cached) in their own transaction."""
    rejected = Rejections()
    b = builder(rejected=rejected)
    body = ctx("victim-1", "alice", xid=XID)
    add(b, FakeTransaction(1000, 1, messages=[(0, 1, CONTEXT_PREFIX, body)]))
    replayed = FakeTransaction(2000, 1, messages=[(0, 1999, CONTEXT_PREFIX, body)])
    replayed.xid = XID + 1
    add(b, replayed)
    batch = b.take()
    assert batch is not None
    own, replay = (fields(t) for t in batch.store.transactions)
    assert own[8] == "victim-1" and own[5] == "0"
    assert replay[8] == "\\N" and replay[5] == str(CONTEXT_REJECTED)
    assert rejected.seen == [(CONTEXT_PREFIX, 1999, "other_transaction")]


def test_no_key_refuses_every_message() -> None:
    rejected = Rejections()
    verifier = ContextVerifier(lambda: None, on_reject=rejected)
    b = BatchBuilder(max_rows=10, actor_last_seq=lambda actor: 0, verifier=verifier)
    add(b, FakeTransaction(1000, 1, messages=[(0, 1, CONTEXT_PREFIX, ctx("r1"))]))
    add(b, LogicalMessage(1001, ERROR_PREFIX, error_message("r1")))
    batch = b.take()
    assert batch is not None and batch.store.request_errors == []
    assert fields(batch.store.transactions[0])[8] == "\\N"
    assert [r[2] for r in rejected.seen] == ["no_key", "no_key"]


def test_split_lines() -> None:
    assert split_lines(b"a\nb\nc\n", 2) == (b"a\nb\n", b"c\n")


def test_batches_cross_the_pipe_as_header_and_blobs() -> None:
    b = builder()
    add(b, FakeTransaction(1000, 3, messages=[(0, 1, CONTEXT_PREFIX, ctx("r1", "bob"))]))
    batch = b.take()
    assert batch is not None
    messages = encode_batch(7, batch.store)

    class Pipe:
        def recv_bytes(self) -> bytes:
            return messages.pop(0)

    received = _receive_batch(Pipe())  # type: ignore[arg-type]
    assert received is not None
    batch_id, store = received
    assert batch_id == 7
    assert b"".join(store.changes) == b"".join(batch.store.changes)
    assert store.transactions == [b"".join(batch.store.transactions)]
    assert (store.ack_lsn, store.fresh, store.rows, store.actor_sequences) == (1000, [1000], 3, {"bob": 3})


def test_acknowledgement_moves_only_when_the_store_wrote() -> None:
    ack = Acknowledgement(100, idle_interval=10)
    ack.handed(200)
    assert ack.flush_lsn() == 100
    assert ack.written(200) and ack.flush_lsn() == 200
    assert not ack.written(150) and ack.flush_lsn() == 200
    # Idle: a keepalive's WAL end, once nothing went to the writer for the interval.
    now = ack.last_handed
    assert ack.idle_advance(500, quiet=True, building=None, now=now + 1) is None
    assert ack.idle_advance(500, quiet=True, building=None, now=now + 11) == 500
    assert ack.idle_advance(500, quiet=False, building=None, now=now + 11) is None
    assert ack.idle_advance(500, quiet=True, building=600, now=now + 11) is None
    assert ack.idle_advance(150, quiet=True, building=None, now=now + 11) is None


def test_fake_matches_the_core_interface() -> None:
    fake = vars(FakeTransaction(1, 1))
    for name in FinishedTransaction.__dataclass_fields__:
        assert name.startswith("_") or name in fake, name
