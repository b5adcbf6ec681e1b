"""CopyBoth frames of the streaming replication protocol and the time helpers."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from cdc.errors import ProtocolError, UsageError
from cdc.protocol import (
    PG_EPOCH_OFFSET_US,
    Begin,
    Commit,
    Decoder,
    Insert,
    PrimaryKeepalive,
    Relation,
    StandbyStatusUpdate,
    XLogData,
    datetime_to_pg_time,
    encode_standby_status,
    now_pg_time,
    parse_copy_data,
    pg_time_to_datetime,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "pgoutput"
FRAME_FILES = sorted(DATA_DIR.glob("pg*_frames.jsonl"))

U64_MAX = 2**64 - 1


def load_frames(path: Path) -> list[bytes]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [bytes.fromhex(json.loads(line)["hex"]) for line in lines[1:]]


# --------------------------------------------------------------------------- hand-built frames


def test_xlogdata() -> None:
    frame = b"w" + struct.pack("!QQq", 0x16_B374_D848, U64_MAX, -1) + b"B\x00payload"
    assert parse_copy_data(frame) == XLogData(0x16_B374_D848, U64_MAX, -1, b"B\x00payload")


def test_xlogdata_with_empty_payload_and_memoryview() -> None:
    frame = b"w" + struct.pack("!QQq", 1, 2, 3)
    parsed = parse_copy_data(memoryview(frame))
    assert parsed == XLogData(1, 2, 3, b"")
    assert isinstance(parsed, XLogData)
    assert type(parsed.payload) is bytes
    parsed = parse_copy_data(memoryview(b"xx" + frame + b"abc")[2:])
    assert parsed == XLogData(1, 2, 3, b"abc")
    assert isinstance(parsed, XLogData)
    assert type(parsed.payload) is bytes


def test_memoryview_of_other_item_formats_is_read_as_bytes() -> None:
    frame = b"k" + struct.pack("!QqB", 1, 2, 1)
    chars = memoryview(frame).cast("c")
    assert parse_copy_data(chars) == PrimaryKeepalive(1, 2, True)  # type: ignore[arg-type]
    assert parse_copy_data(bytearray(frame)) == PrimaryKeepalive(1, 2, True)  # type: ignore[arg-type]


@pytest.mark.parametrize("reply", [False, True])
def test_keepalive(reply: bool) -> None:
    frame = b"k" + struct.pack("!QqB", 0xDEADBEEF, 848_616_570_000_000, int(reply))
    assert parse_copy_data(frame) == PrimaryKeepalive(0xDEADBEEF, 848_616_570_000_000, reply)


@pytest.mark.parametrize(
    ("written", "flushed", "applied", "send_time", "reply"),
    [
        (0, 0, 0, 0, False),
        (1, 2, 3, 4, True),
        (U64_MAX, U64_MAX - 1, 0x16_B374_D848, -(2**63), False),
        (5, 5, 5, 2**63 - 1, True),
    ],
)
def test_standby_status_round_trip(
    written: int, flushed: int, applied: int, send_time: int, reply: bool
) -> None:
    frame = encode_standby_status(written, flushed, applied, send_time, reply)
    assert len(frame) == 34
    assert frame[:1] == b"r"
    assert frame == b"r" + struct.pack("!QQQqB", written, flushed, applied, send_time, int(reply))
    assert parse_copy_data(frame) == StandbyStatusUpdate(written, flushed, applied, send_time, reply)


def test_standby_status_default_does_not_request_reply() -> None:
    frame = encode_standby_status(1, 2, 3, 4)
    assert frame[-1] == 0


@pytest.mark.parametrize(
    "args",
    [(-1, 0, 0, 0), (0, 2**64, 0, 0), (0, 0, -5, 0), (0, 0, 0, 2**63), (0, 0, 0, -(2**63) - 1)],
)
def test_standby_status_rejects_out_of_range_values(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(UsageError):
        encode_standby_status(*args)


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"", "empty"),
        (b"x", "unknown CopyData frame type"),
        (b"\x00" * 30, "unknown CopyData frame type"),
        (b"w", "XLogData"),
        (b"w" + b"\x00" * 23, "XLogData"),
        (b"k" + b"\x00" * 16, "keepalive"),
        (b"k" + b"\x00" * 18, "keepalive"),
        (b"k" + struct.pack("!QqB", 1, 2, 2), "reply-requested"),
        (b"r" + b"\x00" * 32, "status"),
        (b"r" + b"\x00" * 34, "status"),
        (b"r" + struct.pack("!QQQqB", 1, 2, 3, 4, 0xFF), "reply-requested"),
    ],
)
def test_malformed_frames(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_copy_data(frame)


# --------------------------------------------------------------------------- captured frames


def test_frames_were_captured() -> None:
    assert {p.name for p in FRAME_FILES} >= {"pg15_frames.jsonl", "pg18_frames.jsonl"}


@pytest.mark.parametrize("path", FRAME_FILES, ids=lambda p: p.stem)
def test_captured_frames(path: Path) -> None:
    frames = [parse_copy_data(raw) for raw in load_frames(path)]
    xlog = [f for f in frames if isinstance(f, XLogData)]
    keepalives = [f for f in frames if isinstance(f, PrimaryKeepalive)]
    assert len(xlog) + len(keepalives) == len(frames)
    assert any(k.reply_requested for k in keepalives)
    assert not keepalives[0].reply_requested

    # send_time is the server clock, in order, in a plausible range.
    times = [f.send_time for f in frames]
    assert times == sorted(times)
    assert datetime(2024, 1, 1, tzinfo=UTC) < pg_time_to_datetime(times[0]) < datetime(2100, 1, 1, tzinfo=UTC)
    # The server never reports a WAL end behind what it already sent; the
    # Relation message is not tied to a WAL record and comes with LSNs 0.
    ends = [f.wal_end for f in frames if isinstance(f, XLogData | PrimaryKeepalive) and f.wal_end]
    assert ends == sorted(ends)

    decoder = Decoder(1)
    messages = [decoder.decode(f.payload) for f in xlog]
    assert [type(m) for m in messages] == [Begin, Relation, Insert, Commit]
    begin, rel, insert, commit = messages
    assert isinstance(begin, Begin)
    assert isinstance(rel, Relation)
    assert isinstance(insert, Insert)
    assert isinstance(commit, Commit)
    assert rel.name == "items"
    assert insert.relation_oid == rel.oid
    assert insert.new == ("50", "framed", "2", "4.20", None)
    assert begin.final_lsn == commit.commit_lsn
    assert (xlog[1].wal_start, xlog[1].wal_end) == (0, 0)
    assert xlog[0].wal_start > 0
    # XLogData of a change carries the LSN the client reports back after the commit.
    assert xlog[-1].wal_start == commit.end_lsn
    assert keepalives[-1].wal_end >= commit.end_lsn


# --------------------------------------------------------------------------- time helpers


def test_epoch_offset() -> None:
    expected = datetime(2000, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    assert expected // timedelta(microseconds=1) == PG_EPOCH_OFFSET_US


def test_pg_time_to_datetime() -> None:
    assert pg_time_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_time_to_datetime(-1) == datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    converted = pg_time_to_datetime(757_479_845_000_001)
    assert converted == datetime(2024, 1, 2, 3, 4, 5, 1, tzinfo=UTC)
    assert converted.tzinfo is UTC


@pytest.mark.parametrize("us", [2**63 - 1, -(2**63)])
def test_pg_time_to_datetime_out_of_range(us: int) -> None:
    with pytest.raises(ProtocolError):
        pg_time_to_datetime(us)


def test_datetime_to_pg_time() -> None:
    assert datetime_to_pg_time(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    assert datetime_to_pg_time(datetime(2024, 1, 2, 3, 4, 5, 1, tzinfo=UTC)) == 757_479_845_000_001
    plus_two = timezone(timedelta(hours=2))
    assert datetime_to_pg_time(datetime(2000, 1, 1, 2, tzinfo=plus_two)) == 0
    assert datetime_to_pg_time(datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)) == -1


@pytest.mark.parametrize("us", [0, 1, -1, 848_616_570_455_311, -(10**15), 10**16])
def test_time_round_trip(us: int) -> None:
    assert datetime_to_pg_time(pg_time_to_datetime(us)) == us


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(UsageError):
        datetime_to_pg_time(datetime(2024, 1, 1))


def test_now_pg_time() -> None:
    before = datetime_to_pg_time(datetime.now(UTC))
    now = now_pg_time()
    after = datetime_to_pg_time(datetime.now(UTC))
    assert before <= now <= after
