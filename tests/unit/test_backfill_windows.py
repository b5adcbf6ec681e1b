"""The daemon's backfill windows (cdc/capture/backfill.py) and progress reports (cdc/progress.py),
without a server."""

from __future__ import annotations

import io
from collections.abc import Iterator

import structlog
from structlog.testing import capture_logs

from cdc.capture.backfill import PREFIX, Windows, copy_unescape, parse_watermark, watermark_message
from cdc.capture.batches import BatchBuilder
from cdc.capture.model import FinishedTransaction
from cdc.context import ContextVerifier
from cdc.metrics import Metrics
from cdc.progress import Progress

SLOT = "cdc"


class Lines:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def chunks(self, max_bytes: int) -> Iterator[bytes]:
        yield self.data


def line(position: int, ordinal: int, table_id: int, op: str, key: str | None, old_key: str | None = None,
         flags: int = 0) -> bytes:  # fmt: skip
    def field(value: str | None) -> bytes:
        return b"\\N" if value is None else value.encode()

    return (
        b"\t".join(
            [
                b"%d" % position,
                b"%d" % ordinal,
                b"2026-01-01 00:00:00.000000+00",
                b"%d" % table_id,
                b"1",
                op.encode(),
                b"%d" % flags,
                b"%d" % position,
                b"\\N",
                field(key),
                b'{"id": 1}' if op != "T" else b"\\N",
                b"\\N",
                field(old_key),
                b"\\N",
            ]
        )
        + b"\n"
    )


def txn(position: int, lines: list[bytes], *, messages: list[tuple[str, bytes]] = (), status: str = "c",  # type: ignore[assignment]
        tables: tuple[int, ...] = ()) -> FinishedTransaction:  # fmt: skip
    counts = {(t, "U", False): 1 for t in tables}
    return FinishedTransaction(
        xid=700 + position,
        position=position,
        commit_lsn=position - 8,
        committed_at_us=800_000_000_000_000,
        committed_at_text="2025-05-07 00:00:00.000000+00",
        status=status,
        flags=0,
        origin=None,
        change_count=len(lines),
        pending_count=0,
        first_lsn=position - 100,
        last_lsn=position - 8,
        messages=[(0, position - 50, prefix, content) for prefix, content in messages],
        counts=counts,
        _source=Lines(b"".join(lines)),
    )


def mark(chunk: int, table_id: int, edge: str, *, keyed: bool = True, slot: str = SLOT) -> tuple[str, bytes]:
    return PREFIX, watermark_message(slot, chunk, table_id, edge, keyed=keyed).encode()


def feed(windows: Windows, builder: BatchBuilder, event: FinishedTransaction) -> None:
    event, highs = windows.before(event)
    for _ in builder.add(event):
        pass
    if highs:
        windows.after(builder, event, highs)


def builder() -> BatchBuilder:
    return BatchBuilder(max_rows=1000, actor_last_seq=lambda actor: 0, verifier=ContextVerifier(lambda: None))


def test_window_collects_the_keys_its_table_changed_and_hands_the_chunk_with_the_ack() -> None:
    windows, b = Windows(SLOT), builder()
    feed(windows, b, txn(100, [], messages=[mark(5, 7, "low")]))
    feed(windows, b, txn(200, [line(200, 0, 7, "U", "[1]"), line(200, 1, 8, "U", "[2]")], tables=(7, 8)))
    feed(windows, b, txn(300, [line(300, 0, 7, "U", "[3]", old_key="[4]")], tables=(7,)))
    feed(windows, b, txn(350, [line(350, 0, 7, "U", "[9]", flags=1)], tables=(7,)))  # rolled-back savepoint
    feed(windows, b, txn(400, [line(400, 0, 7, "I", "[5]")], status="r", tables=(7,)))  # rolled back
    feed(windows, b, txn(500, [], messages=[mark(5, 7, "high")]))
    store = b.batch().store
    assert store.ack_lsn == 500
    assert store.backfill == [
        {
            "chunk": 5,
            "table_id": 7,
            "position": 500,
            "committed_at": "2025-05-07 00:00:00.000000+00",
            "xid": 1200,
            "commit_lsn": 492,
            "keyless": False,
            "truncated": False,
            "keys": ["[1]", "[3]", "[4]"],
            # the low watermark's transaction: where a table recorded again is reset
            "opened_at": 100,
            "opened_committed_at": "2025-05-07 00:00:00.000000+00",
            "opened_xid": 800,
        }
    ]
    assert windows.open == {}
    assert store.changes  # the changes themselves still go to the store, untouched


def test_high_without_low_discards_and_keyless_windows_need_a_quiet_table() -> None:
    windows, b = Windows(SLOT), builder()
    feed(windows, b, txn(100, [], messages=[mark(1, 7, "high")]))
    feed(windows, b, txn(150, [], messages=[mark(2, 9, "low", keyed=False)]))
    feed(windows, b, txn(160, [], messages=[mark(3, 10, "low", keyed=False)]))
    feed(windows, b, txn(200, [line(200, 0, 9, "I", '[1, "x"]')], tables=(9,)))
    feed(
        windows, b, txn(300, [], messages=[mark(2, 9, "high", keyed=False), mark(3, 10, "high", keyed=False)])
    )
    items = {i["chunk"]: i for i in b.batch().store.backfill}
    assert "low watermark was not seen" in str(items[1]["discard"])
    assert "changed while it was read" in str(items[2]["discard"])
    assert "discard" not in items[3] and items[3]["keyless"] is True and items[3]["keys"] == []


def test_truncate_empties_the_window_and_too_many_keys_give_it_up() -> None:
    windows, b = Windows(SLOT, max_keys=2), builder()
    feed(windows, b, txn(100, [], messages=[mark(1, 7, "low"), mark(2, 8, "low")]))
    feed(windows, b, txn(200, [line(200, 0, 7, "T", None)], tables=(7,)))
    feed(windows, b, txn(300, [line(300, i, 8, "U", f"[{i}]") for i in range(3)], tables=(8,)))
    feed(windows, b, txn(400, [], messages=[mark(1, 7, "high"), mark(2, 8, "high")]))
    items = {i["chunk"]: i for i in b.batch().store.backfill}
    assert items[1]["truncated"] is True
    assert "too many changes" in str(items[2]["discard"])


def test_other_slots_and_garbage_are_ignored() -> None:
    windows, b = Windows(SLOT), builder()
    with capture_logs() as logs:
        feed(windows, b, txn(100, [], messages=[mark(1, 7, "low", slot="other"), (PREFIX, b"not json")]))
    assert windows.open == {}
    assert [e["event"] for e in logs] == ["backfill_message_ignored"]
    assert parse_watermark(b'{"slot": "cdc", "edge": "middle", "chunk": 1, "table_id": 2}', SLOT) is None


def test_copy_unescape() -> None:
    assert copy_unescape(b'["a\\\\tb", "c\\td"]') == '["a\\tb", "c\td"]'
    assert copy_unescape(b"[1]") == "[1]"


def test_progress_log_lines_rate_and_eta() -> None:
    structlog.reset_defaults()  # an earlier test may have left a level filter above info
    now = [0.0]
    metrics = Metrics()
    progress = Progress("baseline", terminal=False, interval=5.0, clock=lambda: now[0], metrics=metrics)
    with capture_logs() as logs:
        progress.table("public.big", 1000)
        for _ in range(10):
            now[0] += 1.0
            progress.advance("public.big", 50)
        assert metrics.registry.get_sample_value("cdc_baseline_remaining_tables", {"kind": "baseline"}) == 1
        progress.done("public.big")
    events = [e["event"] for e in logs]
    assert events == [
        "baseline_table_started",
        "baseline_progress",
        "baseline_progress",
        "baseline_table_done",
    ]
    line = logs[1]
    assert line["rows"] == 250 and line["estimated_rows"] == 1000 and line["percent"] == 25.0
    assert line["rows_per_second"] == 50 and line["eta_seconds"] == 15
    assert logs[-1]["rows"] == 500
    assert (
        metrics.registry.get_sample_value("cdc_baseline_rows", {"kind": "baseline", "table": "public.big"})
        == 500
    )
    assert metrics.registry.get_sample_value("cdc_baseline_remaining_tables", {"kind": "baseline"}) == 0


def test_progress_bar_on_a_terminal() -> None:
    out = io.StringIO()
    out.isatty = lambda: True  # type: ignore[method-assign]
    with Progress("baseline", stream=out) as progress:
        progress.table("public.big", 100_000)
        progress.advance("public.big", 40_000)
        progress.done("public.big")
    text = out.getvalue()
    assert "public.big" in text and "40,000 of ~100,000 rows" in text and "rows/s" in text
