"""pgoutput decoding: payloads captured from PostgreSQL 15 and 18, and hand-built messages.

The captured files come from tests/data/capture_pgoutput.py; no server is needed here.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from cdc.errors import ProtocolError, UsageError
from cdc.protocol import (
    UNCHANGED_TOAST,
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Decoder,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Update,
    datetime_to_pg_time,
    decode_message,
    pg_time_to_datetime,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "pgoutput"
CAPTURES = sorted(p for p in DATA_DIR.glob("pg*_*.jsonl") if not p.name.endswith("_frames.jsonl"))
VERSIONS = sorted({int(p.name[2:].split("_", 1)[0]) for p in CAPTURES})

CHANGE_TYPES = (Relation, Type, Insert, Update, Delete, Truncate, Message)
INT4, TEXT, NUMERIC = 23, 25, 1700


def load(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    meta = json.loads(lines[0])["meta"]
    return meta, [json.loads(line) for line in lines[1:]]


def decode_file(version: int, scenario: str) -> tuple[dict[str, Any], list[PgOutputMessage]]:
    path = DATA_DIR / f"pg{version}_{scenario}.jsonl"
    if not path.exists():
        pytest.skip(f"{path.name} not captured (needs a newer PostgreSQL)")
    meta, records = load(path)
    decoder = Decoder(meta["proto_version"])
    return meta, [decoder.decode(bytes.fromhex(record["hex"])) for record in records]


def only(messages: list[PgOutputMessage], kind: type[Any]) -> list[Any]:
    return [m for m in messages if type(m) is kind]


def relation(messages: list[PgOutputMessage], name: str) -> Relation:
    found: list[Relation] = [m for m in only(messages, Relation) if m.name == name]
    assert found, f"no Relation for {name}"
    return found[0]


def plausible_time(us: int) -> None:
    assert datetime(2024, 1, 1, tzinfo=UTC) < pg_time_to_datetime(us) < datetime(2100, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- every captured payload


def test_captures_exist() -> None:
    assert 15 in VERSIONS
    assert 18 in VERSIONS
    assert len(CAPTURES) >= 20


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.stem)
def test_every_captured_payload_decodes(path: Path) -> None:
    meta, records = load(path)
    assert meta["server_version_num"] // 10000 == int(path.name[2:].split("_", 1)[0])
    decoder = Decoder(meta["proto_version"])
    in_stream = False
    for record in records:
        payload = bytes.fromhex(record["hex"])
        message = decoder.decode(payload)
        # The stateless form agrees, and so does a memoryview of the same bytes.
        assert decode_message(payload, in_stream=in_stream) == message
        assert decode_message(memoryview(payload), in_stream=in_stream) == message
        if isinstance(message, CHANGE_TYPES):
            assert (message.xid is not None) == in_stream
            if in_stream and not isinstance(message, Message):
                assert message.xid is not None
        if isinstance(message, StreamStart):
            in_stream = True
            assert message.xid == record["xid"]
        elif isinstance(message, StreamStop):
            in_stream = False
        elif isinstance(message, Begin | BeginPrepare | StreamCommit | StreamPrepare | CommitPrepared):
            assert message.xid == record["xid"]
        assert decoder.in_stream == in_stream
    assert not decoder.in_stream


# --------------------------------------------------------------------------- scenario by scenario


ITEMS_COLUMNS = [
    ("id", INT4, -1, True),
    ("name", TEXT, -1, False),
    ("qty", INT4, -1, False),
    ("price", NUMERIC, ((10 << 16) | 2) + 4, False),  # numeric(10,2)
    ("note", TEXT, -1, False),
]


@pytest.mark.parametrize("version", VERSIONS)
def test_dml_default_identity(version: int) -> None:
    _, messages = decode_file(version, "dml_default")
    assert [type(m).__name__ for m in messages] == [
        "Begin",
        "Relation",
        "Insert",
        "Insert",
        "Commit",
        "Begin",
        "Update",
        "Commit",
        "Begin",
        "Delete",
        "Commit",
        "Begin",
        "Insert",
        "Commit",
    ]
    rel = relation(messages, "items")
    assert rel.xid is None
    assert rel.namespace == "public"
    assert rel.replica_identity == "d"
    assert [(c.name, c.type_oid, c.type_modifier, c.is_key) for c in rel.columns] == ITEMS_COLUMNS
    inserts = only(messages, Insert)
    assert all(i.relation_oid == rel.oid and i.xid is None for i in inserts)
    assert inserts[0].new == ("1", "apple", "3", "1.25", None)
    assert inserts[1].new == ("2", "pear", "5", "0.75", "ripe")
    assert inserts[2].new == ("3", "naïve café ☕", "1", "9.99", "two\nlines")
    (update,) = only(messages, Update)
    assert update.relation_oid == rel.oid
    assert update.old is None
    assert update.old_kind is None
    assert update.new == ("1", "apple", "4", "1.25", "sold")
    (delete,) = only(messages, Delete)
    assert delete.old_kind == "K"
    assert delete.old == ("2", None, None, None, None)
    begins, commits = only(messages, Begin), only(messages, Commit)
    assert len({b.xid for b in begins}) == 4
    for begin, commit in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn
        assert commit.end_lsn > commit.commit_lsn
        assert begin.commit_time == commit.commit_time
        assert commit.flags == 0
        plausible_time(commit.commit_time)
    assert [c.commit_lsn for c in commits] == sorted(c.commit_lsn for c in commits)


@pytest.mark.parametrize("version", VERSIONS)
def test_key_update_sends_key_only_old_tuple(version: int) -> None:
    _, messages = decode_file(version, "key_update")
    (update,) = only(messages, Update)
    assert update.relation_oid == relation(messages, "items").oid
    assert update.old_kind == "K"
    assert update.old == ("10", None, None, None, None)
    assert update.new == ("11", "kiwi", "7", "0.50", "green")


@pytest.mark.parametrize("version", VERSIONS)
def test_replica_identity_full_sends_whole_old_row(version: int) -> None:
    _, messages = decode_file(version, "identity_full")
    rel = relation(messages, "items_full")
    assert rel.replica_identity == "f"
    assert [(c.name, c.type_oid, c.is_key) for c in rel.columns] == [
        ("id", INT4, True),
        ("name", TEXT, True),
        ("qty", INT4, True),
    ]
    (update,) = only(messages, Update)
    assert update.old_kind == "O"
    assert update.old == ("1", "fig", "2")
    assert update.new == ("1", "fig", "8")
    (delete,) = only(messages, Delete)
    assert delete.old_kind == "O"
    assert delete.old == ("2", "lime", None)


@pytest.mark.parametrize("version", VERSIONS)
def test_truncate_options_and_relations(version: int) -> None:
    _, messages = decode_file(version, "truncate")
    plain, cascaded = only(messages, Truncate)
    assert plain.xid is None
    assert plain.options == 0
    assert not plain.cascade
    assert not plain.restart_identity
    assert plain.relation_oids == (relation(messages, "items_full").oid,)
    assert cascaded.options == 3
    assert cascaded.cascade
    assert cascaded.restart_identity
    assert cascaded.relation_oids == (relation(messages, "parent").oid, relation(messages, "child").oid)


@pytest.mark.parametrize("version", VERSIONS)
def test_unchanged_toast_value(version: int) -> None:
    _, messages = decode_file(version, "toast_unchanged")
    rel = relation(messages, "docs")
    assert [c.name for c in rel.columns] == ["id", "body", "title"]
    (update,) = only(messages, Update)
    assert update.old is None
    assert update.new == ("1", UNCHANGED_TOAST, "second")
    assert update.new[1] is UNCHANGED_TOAST


@pytest.mark.parametrize("version", VERSIONS)
def test_logical_messages(version: int) -> None:
    _, messages = decode_file(version, "messages")
    assert [type(m).__name__ for m in messages] == [
        "Begin",
        "Relation",
        "Insert",
        "Message",
        "Commit",
        "Message",
        "Message",
    ]
    inside, outside, binary = only(messages, Message)
    assert (inside.xid, inside.transactional, inside.prefix, inside.content) == (
        None,
        True,
        "cdc.test",
        b"inside a transaction",
    )
    assert (outside.transactional, outside.prefix, outside.content) == (
        False,
        "cdc.test",
        b"outside a transaction",
    )
    assert (binary.transactional, binary.prefix, binary.content) == (False, "cdc.bin", b"\x00\xff\x10")
    commit = only(messages, Commit)[0]
    assert inside.lsn <= commit.commit_lsn < outside.lsn < binary.lsn


@pytest.mark.parametrize("version", VERSIONS)
def test_origin(version: int) -> None:
    _, messages = decode_file(version, "origin")
    assert [type(m).__name__ for m in messages] == ["Begin", "Origin", "Relation", "Insert", "Commit"]
    (origin,) = only(messages, Origin)
    assert origin.name == "cdc_origin"
    assert origin.commit_lsn == 0xABCDEF
    # pg_replication_origin_xact_setup's timestamp becomes the commit time.
    begin = only(messages, Begin)[0]
    assert begin.commit_time == datetime_to_pg_time(datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert only(messages, Insert)[0].new == ("20", "from origin", "1", "1.00", None)


@pytest.mark.parametrize("version", VERSIONS)
def test_custom_types(version: int) -> None:
    _, messages = decode_file(version, "types")
    assert [type(m).__name__ for m in messages[:4]] == ["Begin", "Type", "Type", "Relation"]
    mood, pair = only(messages, Type)
    assert (mood.xid, mood.namespace, mood.name) == (None, "public", "mood")
    assert (pair.namespace, pair.name) == ("public", "pair")
    rel = relation(messages, "moods")
    assert [(c.name, c.type_oid) for c in rel.columns] == [
        ("id", INT4),
        ("feeling", mood.oid),
        ("point", pair.oid),
    ]
    assert mood.oid >= 16384
    first, second = only(messages, Insert)
    assert first.new == ("1", "happy", "(1,one)")
    assert second.new == ("2", None, None)


@pytest.mark.parametrize("version", VERSIONS)
def test_binary_values(version: int) -> None:
    _, messages = decode_file(version, "binary")
    (insert,) = only(messages, Insert)
    row_id, name, qty, price, note = insert.new
    assert row_id == struct.pack("!i", 30)
    assert name == b"bin"
    assert qty == struct.pack("!i", 42)
    # numeric send format: ndigits, weight, sign, dscale, base-10000 digits (3.50 -> 3, 5000)
    assert price == struct.pack("!hhHHhh", 2, 0, 0, 2, 3, 5000)
    assert note is None


# protocol 4 and streaming 'parallel' need PostgreSQL 16+
STREAM_CASES = [
    (version, scenario)
    for version in VERSIONS
    for scenario in ("stream", "stream_v4_on", "stream_parallel")
    if (DATA_DIR / f"pg{version}_{scenario}.jsonl").exists()
]


def test_protocol_4_parallel_streaming_was_captured() -> None:
    assert (18, "stream_parallel") in STREAM_CASES


@pytest.mark.parametrize(("version", "scenario"), STREAM_CASES)
def test_streamed_transactions(version: int, scenario: str) -> None:
    meta, messages = decode_file(version, scenario)
    starts = only(messages, StreamStart)
    top = starts[0].xid
    assert starts[0].first_segment
    assert len(only(messages, StreamStop)) == len(starts)
    committed_starts = [s for s in starts if s.xid == top]
    assert len(committed_starts) >= 2
    assert not any(s.first_segment for s in committed_starts[1:])

    first_abort, second_abort = only(messages, StreamAbort)
    (commit,) = only(messages, StreamCommit)
    assert commit.xid == top
    assert commit.end_lsn > commit.commit_lsn
    plausible_time(commit.commit_time)

    # Savepoint rolled back: subxid is the subtransaction whose inserts were streamed.
    assert first_abort.xid == top
    assert first_abort.subxid != top
    doomed = [
        m for m in only(messages, Insert) if isinstance(m.new[1], str) and m.new[1].startswith("doomed")
    ]
    assert doomed
    assert {m.xid for m in doomed} == {first_abort.subxid}
    # Whole transaction rolled back: subxid == xid, and it was streamed before.
    assert second_abort.xid == second_abort.subxid != top
    assert any(s.xid == second_abort.xid and s.first_segment for s in starts)
    assert messages.index(first_abort) < messages.index(commit) < messages.index(second_abort)

    if meta["options"]["streaming"] == "parallel":
        assert meta["proto_version"] == 4
        for abort in (first_abort, second_abort):
            assert abort.abort_lsn is not None
            assert abort.abort_time is not None
            plausible_time(abort.abort_time)
        assert first_abort.abort_lsn < commit.commit_lsn < second_abort.abort_lsn
    else:
        assert (first_abort.abort_lsn, first_abort.abort_time) == (None, None)
        assert (second_abort.abort_lsn, second_abort.abort_time) == (None, None)

    # Changes inside the streamed blocks carry the xid of their (sub)transaction.
    bulk = relation(messages, "bulk")
    assert bulk.xid == top
    rows = [m for m in only(messages, Insert) if m.xid == top and m.relation_oid == bulk.oid]
    assert rows[0].new == ("1", "row 1")
    assert len(rows) == (3 if version >= 16 else 800)
    (update,) = only(messages, Update)
    assert (update.xid, update.new) == (top, ("1", "updated"))
    (delete,) = only(messages, Delete)
    assert (delete.xid, delete.old_kind, delete.old) == (top, "K", ("2", None))
    mood, pair = only(messages, Type)
    assert (mood.xid, mood.name, pair.xid, pair.name) == (top, "mood", top, "pair")
    (msg,) = only(messages, Message)
    assert (msg.xid, msg.transactional, msg.prefix) == (top, True, "cdc.stream")
    assert msg.content == b"inside a streamed transaction"
    (truncate,) = only(messages, Truncate)
    assert truncate.xid == top
    assert truncate.relation_oids == (relation(messages, "scratch").oid,)
    last = [m for m in only(messages, Insert) if m.new == ("-1", "after rollback to savepoint")]
    assert len(last) == 1
    assert last[0].xid not in (None, top, first_abort.subxid)  # a new subtransaction


@pytest.mark.parametrize("version", VERSIONS)
def test_two_phase(version: int) -> None:
    meta, messages = decode_file(version, "two_phase")
    assert meta["proto_version"] == 3
    assert [type(m).__name__ for m in messages] == [
        "BeginPrepare",
        "Relation",
        "Insert",
        "Prepare",
        "CommitPrepared",
        "BeginPrepare",
        "Insert",
        "Prepare",
        "RollbackPrepared",
    ]
    begin1, begin2 = only(messages, BeginPrepare)
    prepare1, prepare2 = only(messages, Prepare)
    (committed,) = only(messages, CommitPrepared)
    (rolled_back,) = only(messages, RollbackPrepared)
    assert begin1.gid == prepare1.gid == committed.gid == "cdc-gid-commit"
    assert begin2.gid == prepare2.gid == rolled_back.gid == "cdc-gid-rollback"
    for begin, prepare in ((begin1, prepare1), (begin2, prepare2)):
        assert (begin.prepare_lsn, begin.end_lsn, begin.prepare_time, begin.xid) == (
            prepare.prepare_lsn,
            prepare.end_lsn,
            prepare.prepare_time,
            prepare.xid,
        )
        assert prepare.end_lsn > prepare.prepare_lsn
        plausible_time(prepare.prepare_time)
    assert committed.xid == begin1.xid
    assert committed.commit_lsn >= prepare1.end_lsn
    assert committed.end_lsn > committed.commit_lsn
    assert committed.commit_time >= prepare1.prepare_time
    assert rolled_back.xid == begin2.xid != begin1.xid
    assert rolled_back.prepare_end_lsn == prepare2.end_lsn
    assert rolled_back.rollback_end_lsn > rolled_back.prepare_end_lsn
    assert rolled_back.prepare_time == prepare2.prepare_time
    assert rolled_back.rollback_time >= rolled_back.prepare_time
    assert [i.new[:2] for i in only(messages, Insert)] == [("40", "prepared"), ("41", "rolled back")]


@pytest.mark.parametrize("version", VERSIONS)
def test_streamed_prepare(version: int) -> None:
    _, messages = decode_file(version, "stream_prepare")
    starts = only(messages, StreamStart)
    (prepare,) = only(messages, StreamPrepare)
    (committed,) = only(messages, CommitPrepared)
    assert prepare.xid == starts[0].xid == committed.xid
    assert prepare.gid == committed.gid == "cdc-gid-stream"
    assert prepare.end_lsn > prepare.prepare_lsn
    assert committed.commit_lsn >= prepare.end_lsn
    assert isinstance(messages[-2], StreamPrepare)
    assert isinstance(messages[-1], CommitPrepared)
    inserts = only(messages, Insert)
    assert all(i.xid == prepare.xid for i in inserts)
    assert inserts[-1].new == (str(len(inserts)), f"prepared {len(inserts)}")


# --------------------------------------------------------------------------- hand-built messages


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def tup(*values: object) -> bytes:
    out = struct.pack("!H", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED_TOAST:
            out += b"u"
        elif isinstance(value, bytes):
            out += b"b" + struct.pack("!I", len(value)) + value
        else:
            raw = str(value).encode()
            out += b"t" + struct.pack("!I", len(raw)) + raw
    return out


def xid_prefix(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack("!I", xid)


LSN_A, LSN_B, LSN_C = 0x0000_0001_0000_0010, 0xFFFF_FFFF_FFFF_FFF0, 0x16_B374_D848
TIME_A, TIME_B = 789_012_345_678_901, -5


def test_begin() -> None:
    payload = b"B" + struct.pack("!QqI", LSN_C, TIME_A, 0xFFFFFFFE)
    assert decode_message(payload, in_stream=False) == Begin(LSN_C, TIME_A, 0xFFFFFFFE)


def test_commit() -> None:
    payload = b"C" + struct.pack("!BQQq", 7, LSN_A, LSN_B, TIME_B)
    assert decode_message(payload, in_stream=False) == Commit(7, LSN_A, LSN_B, TIME_B)


def test_origin_message() -> None:
    payload = b"O" + struct.pack("!Q", LSN_C) + cstr("örigin")
    assert decode_message(payload, in_stream=False) == Origin(LSN_C, "örigin")


@pytest.mark.parametrize("xid", [None, 4242])
def test_relation(xid: int | None) -> None:
    payload = (
        b"R"
        + xid_prefix(xid)
        + struct.pack("!I", 0xFFFF0001)
        + cstr("")
        + cstr("tablé")
        + b"i"
        + struct.pack("!H", 3)
        + b"\x01"
        + cstr("id")
        + struct.pack("!Ii", 20, -1)
        + b"\x00"
        + cstr("label")
        + struct.pack("!Ii", 1043, 68)
        + b"\x03"
        + cstr("")
        + struct.pack("!Ii", 0xFFFFFFFF, -(2**31))
    )
    message = decode_message(payload, in_stream=xid is not None)
    assert message == Relation(
        xid,
        0xFFFF0001,
        "",
        "tablé",
        "i",
        (
            Column(1, "id", 20, -1),
            Column(0, "label", 1043, 68),
            Column(3, "", 0xFFFFFFFF, -(2**31)),
        ),
    )
    assert isinstance(message, Relation)
    assert [c.is_key for c in message.columns] == [True, False, True]


def test_relation_without_columns() -> None:
    payload = b"R" + struct.pack("!I", 5) + cstr("s") + cstr("t") + b"n" + struct.pack("!H", 0)
    assert decode_message(payload, in_stream=False) == Relation(None, 5, "s", "t", "n", ())


@pytest.mark.parametrize("xid", [None, 1])
def test_type(xid: int | None) -> None:
    payload = b"Y" + xid_prefix(xid) + struct.pack("!I", 16385) + cstr("public") + cstr("mood")
    assert decode_message(payload, in_stream=xid is not None) == Type(xid, 16385, "public", "mood")


@pytest.mark.parametrize("xid", [None, 0xFFFFFFFF])
def test_insert_every_column_kind(xid: int | None) -> None:
    values = ("text ☕", "", None, UNCHANGED_TOAST, b"\x00\xff", b"")
    payload = b"I" + xid_prefix(xid) + struct.pack("!I", 77) + b"N" + tup(*values)
    message = decode_message(payload, in_stream=xid is not None)
    assert message == Insert(xid, 77, values)
    assert isinstance(message, Insert)
    assert message.new[3] is UNCHANGED_TOAST
    assert type(message.new[4]) is bytes


def test_insert_zero_columns() -> None:
    payload = b"I" + struct.pack("!I", 1) + b"N" + tup()
    assert decode_message(payload, in_stream=False) == Insert(None, 1, ())


@pytest.mark.parametrize("xid", [None, 9])
@pytest.mark.parametrize("old_kind", [None, "K", "O"])
def test_update(xid: int | None, old_kind: str | None) -> None:
    old = ("1", None) if old_kind else None
    payload = b"U" + xid_prefix(xid) + struct.pack("!I", 12)
    if old_kind is not None and old is not None:
        payload += old_kind.encode() + tup(*old)
    payload += b"N" + tup("2", UNCHANGED_TOAST)
    assert decode_message(payload, in_stream=xid is not None) == Update(
        xid, 12, old, old_kind, ("2", UNCHANGED_TOAST)
    )


@pytest.mark.parametrize("xid", [None, 9])
@pytest.mark.parametrize("old_kind", ["K", "O"])
def test_delete(xid: int | None, old_kind: str) -> None:
    payload = b"D" + xid_prefix(xid) + struct.pack("!I", 13) + old_kind.encode() + tup("1", None, b"x")
    assert decode_message(payload, in_stream=xid is not None) == Delete(xid, 13, ("1", None, b"x"), old_kind)


@pytest.mark.parametrize("xid", [None, 10])
@pytest.mark.parametrize(
    ("options", "cascade", "restart"), [(0, False, False), (1, True, False), (2, False, True)]
)
def test_truncate(xid: int | None, options: int, cascade: bool, restart: bool) -> None:
    payload = b"T" + xid_prefix(xid) + struct.pack("!IB3I", 3, options, 100, 200, 0xFFFFFFFF)
    message = decode_message(payload, in_stream=xid is not None)
    assert message == Truncate(xid, options, (100, 200, 0xFFFFFFFF))
    assert isinstance(message, Truncate)
    assert (message.cascade, message.restart_identity) == (cascade, restart)


@pytest.mark.parametrize("xid", [None, 11])
@pytest.mark.parametrize("transactional", [False, True])
def test_message(xid: int | None, transactional: bool) -> None:
    content = b"\x00\x01\xfe binary"
    payload = (
        b"M"
        + xid_prefix(xid)
        + struct.pack("!BQ", int(transactional), LSN_B)
        + cstr("my.prefix")
        + struct.pack("!I", len(content))
        + content
    )
    assert decode_message(payload, in_stream=xid is not None) == Message(
        xid, transactional, LSN_B, "my.prefix", content
    )


def test_empty_message_content() -> None:
    payload = b"M" + struct.pack("!BQ", 0, 1) + cstr("") + struct.pack("!I", 0)
    assert decode_message(payload, in_stream=False) == Message(None, False, 1, "", b"")


def test_stream_start_stop_commit() -> None:
    assert decode_message(b"S" + struct.pack("!IB", 5, 1), in_stream=False) == StreamStart(5, True)
    assert decode_message(b"S" + struct.pack("!IB", 5, 0), in_stream=False) == StreamStart(5, False)
    assert decode_message(b"E", in_stream=True) == StreamStop()
    payload = b"c" + struct.pack("!IBQQq", 5, 2, LSN_A, LSN_C, TIME_A)
    assert decode_message(payload, in_stream=False) == StreamCommit(5, 2, LSN_A, LSN_C, TIME_A)


def test_stream_abort_short_and_long_form() -> None:
    short = b"A" + struct.pack("!II", 5, 6)
    long = short + struct.pack("!Qq", LSN_C, TIME_A)
    assert decode_message(short, in_stream=False) == StreamAbort(5, 6, None, None)
    assert decode_message(long, in_stream=False) == StreamAbort(5, 6, LSN_C, TIME_A)
    for version in (2, 3, 4):
        assert Decoder(version).decode(short) == StreamAbort(5, 6, None, None)
    assert Decoder(4).decode(long) == StreamAbort(5, 6, LSN_C, TIME_A)
    for version in (2, 3):
        with pytest.raises(ProtocolError, match="trailing"):
            Decoder(version).decode(long)
    for bad in (short[:-1], short + b"\x00", long[:-1], long + b"\x00"):
        with pytest.raises(ProtocolError):
            decode_message(bad, in_stream=False)


def test_two_phase_messages() -> None:
    gid = cstr("gid-ü")
    assert decode_message(
        b"b" + struct.pack("!QQqI", LSN_A, LSN_B, TIME_A, 3) + gid, in_stream=False
    ) == BeginPrepare(LSN_A, LSN_B, TIME_A, 3, "gid-ü")
    assert decode_message(
        b"P" + struct.pack("!BQQqI", 1, LSN_A, LSN_B, TIME_A, 3) + gid, in_stream=False
    ) == Prepare(1, LSN_A, LSN_B, TIME_A, 3, "gid-ü")
    assert decode_message(
        b"K" + struct.pack("!BQQqI", 2, LSN_A, LSN_B, TIME_B, 4) + gid, in_stream=False
    ) == CommitPrepared(2, LSN_A, LSN_B, TIME_B, 4, "gid-ü")
    assert decode_message(
        b"r" + struct.pack("!BQQqqI", 3, LSN_A, LSN_B, TIME_A, TIME_B, 5) + gid, in_stream=False
    ) == RollbackPrepared(3, LSN_A, LSN_B, TIME_A, TIME_B, 5, "gid-ü")
    assert decode_message(
        b"p" + struct.pack("!BQQqI", 4, LSN_A, LSN_B, TIME_A, 6) + gid, in_stream=False
    ) == StreamPrepare(4, LSN_A, LSN_B, TIME_A, 6, "gid-ü")


# --------------------------------------------------------------------------- the Decoder's state


def test_decoder_tracks_streamed_blocks() -> None:
    decoder = Decoder(2)
    insert = struct.pack("!I", 77) + b"N" + tup("x")
    assert decoder.decode(b"I" + insert) == Insert(None, 77, ("x",))
    assert decoder.decode(b"S" + struct.pack("!IB", 9, 1)) == StreamStart(9, True)
    assert decoder.in_stream
    assert decoder.decode(b"I" + struct.pack("!I", 9) + insert) == Insert(9, 77, ("x",))
    assert decoder.decode(b"E") == StreamStop()
    assert not decoder.in_stream
    assert decoder.decode(b"I" + insert) == Insert(None, 77, ("x",))


def test_decoder_rejects_unbalanced_stream_blocks() -> None:
    decoder = Decoder(4)
    with pytest.raises(ProtocolError, match="outside"):
        decoder.decode(b"E")
    assert not decoder.in_stream
    decoder.decode(b"S" + struct.pack("!IB", 9, 1))
    with pytest.raises(ProtocolError, match="inside"):
        decoder.decode(b"S" + struct.pack("!IB", 9, 0))
    assert decoder.in_stream
    decoder.decode(b"E")
    assert not decoder.in_stream


def test_decoder_accepts_memoryview_and_bytearray() -> None:
    payload = b"I" + struct.pack("!I", 77) + b"N" + tup("x", None)
    expected = Insert(None, 77, ("x", None))
    assert Decoder().decode(memoryview(payload)) == expected
    assert Decoder().decode(memoryview(b"junk" + payload)[4:]) == expected
    assert Decoder().decode(bytearray(payload)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("payload", "since"),
    [
        (b"S" + struct.pack("!IB", 1, 1), 2),
        (b"c" + struct.pack("!IBQQq", 1, 0, 1, 2, 3), 2),
        (b"A" + struct.pack("!II", 1, 1), 2),
        (b"b" + struct.pack("!QQqI", 1, 2, 3, 4) + b"g\x00", 3),
        (b"P" + struct.pack("!BQQqI", 0, 1, 2, 3, 4) + b"g\x00", 3),
        (b"K" + struct.pack("!BQQqI", 0, 1, 2, 3, 4) + b"g\x00", 3),
        (b"r" + struct.pack("!BQQqqI", 0, 1, 2, 3, 4, 5) + b"g\x00", 3),
        (b"p" + struct.pack("!BQQqI", 0, 1, 2, 3, 4) + b"g\x00", 3),
        (b"A" + struct.pack("!IIQq", 1, 1, 2, 3), 4),
    ],
)
def test_decoder_rejects_messages_newer_than_its_protocol(payload: bytes, since: int) -> None:
    for version in range(1, since):
        with pytest.raises(ProtocolError):
            Decoder(version).decode(payload)
    for version in range(since, 5):
        Decoder(version).decode(payload)


@pytest.mark.parametrize("version", [0, 5, -1, True, 2.0, "2"])
def test_decoder_rejects_unknown_protocol_versions(version: object) -> None:
    with pytest.raises(UsageError):
        Decoder(version)  # type: ignore[arg-type]


def test_decoder_default_protocol_is_1() -> None:
    assert Decoder().protocol_version == 1


# --------------------------------------------------------------------------- malformed input

VALID_INSERT = b"I" + struct.pack("!I", 77) + b"N" + tup("abc", None, UNCHANGED_TOAST, b"\x01")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "empty"),
        (b"Z", "unknown pgoutput message type"),
        (b"\xff", "unknown pgoutput message type"),
        (b"B" + b"\x00" * 19, "Begin"),
        (b"B" + b"\x00" * 21, "trailing"),
        (b"C", "Commit"),
        (b"O" + b"\x00" * 8 + b"name", "not NUL-terminated"),
        (b"O" + b"\x00" * 8 + b"\xff\x00", "UTF-8"),
        (b"R" + struct.pack("!I", 1) + cstr("s") + cstr("t") + b"x" + struct.pack("!H", 0), "identity"),
        (b"R" + struct.pack("!I", 1) + cstr("s") + cstr("t") + b"d" + struct.pack("!H", 1), "Relation"),
        (
            b"R" + struct.pack("!I", 1) + cstr("s") + cstr("t") + b"d" + struct.pack("!H", 1) + b"\x01id",
            "NUL",
        ),
        (VALID_INSERT[:-1], "Insert"),
        (VALID_INSERT + b"\x00", "trailing"),
        (b"I" + struct.pack("!I", 77) + b"X" + tup(), "expected 'N'"),
        (b"I" + struct.pack("!I", 77) + b"N" + struct.pack("!H", 1) + b"x", "kind"),
        (
            b"I" + struct.pack("!I", 77) + b"N" + struct.pack("!H", 1) + b"t" + struct.pack("!I", 9) + b"ab",
            "past",
        ),
        (
            b"I" + struct.pack("!I", 77) + b"N" + struct.pack("!H", 1) + b"b" + struct.pack("!I", 2**32 - 1),
            "past",
        ),
        (
            b"I"
            + struct.pack("!I", 77)
            + b"N"
            + struct.pack("!H", 1)
            + b"t"
            + struct.pack("!I", 1)
            + b"\xff",
            "UTF-8",
        ),
        (b"I" + struct.pack("!I", 77) + b"N" + struct.pack("!H", 3) + b"n", "ends too early"),
        (b"U" + struct.pack("!I", 1) + b"K" + tup("1"), "Update"),
        (b"U" + struct.pack("!I", 1) + b"X" + tup("1"), "expected 'K', 'O' or 'N'"),
        (b"D" + struct.pack("!I", 1) + b"N" + tup("1"), "expected 'K' or 'O'"),
        (b"T" + struct.pack("!IB", 2, 0) + struct.pack("!I", 1), "2 relation oids"),
        (b"T" + struct.pack("!IB", 2**32 - 1, 0), "relation oids"),
        (b"M" + struct.pack("!BQ", 2, 0) + cstr("p") + struct.pack("!I", 0), "flags"),
        (b"M" + struct.pack("!BQ", 1, 0) + cstr("p") + struct.pack("!I", 5) + b"abc", "content"),
        (b"S" + struct.pack("!IB", 1, 2), "first-segment"),
        (b"E\x00", "trailing"),
        (b"c" + b"\x00" * 28, "StreamCommit"),
        (b"P" + struct.pack("!BQQqI", 0, 1, 2, 3, 4) + b"gid", "NUL"),
        (b"r" + struct.pack("!BQQqqI", 0, 1, 2, 3, 4, 5) + cstr("g") + b"x", "trailing"),
    ],
)
def test_malformed_payloads_raise_protocol_error(payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_message(payload, in_stream=False)
    decoder = Decoder(4)
    with pytest.raises(ProtocolError):
        decoder.decode(payload)
    assert not decoder.in_stream


def test_error_messages_do_not_carry_row_values() -> None:
    secret = "s3cret-value"
    payload = b"I" + struct.pack("!I", 77) + b"N" + tup(secret)[:-1]
    with pytest.raises(ProtocolError) as info:
        decode_message(payload, in_stream=False)
    assert secret not in str(info.value)
    bad_utf8 = (
        b"I"
        + struct.pack("!I", 77)
        + b"N"
        + struct.pack("!H", 1)
        + b"t"
        + struct.pack("!I", 3)
        + b"\xe2\x98x"
    )
    with pytest.raises(ProtocolError) as info:
        decode_message(bad_utf8, in_stream=False)
    assert "\\xe2" not in str(info.value)


def test_in_stream_flag_changes_the_layout() -> None:
    # Read with the wrong stream state, the xid is taken for the relation oid and
    # the rest no longer lines up: that must be a ProtocolError, not garbage.
    streamed = b"I" + struct.pack("!I", 9) + struct.pack("!I", 77) + b"N" + tup("x")
    assert decode_message(streamed, in_stream=True) == Insert(9, 77, ("x",))
    with pytest.raises(ProtocolError):
        decode_message(streamed, in_stream=False)


# --------------------------------------------------------------------------- the sentinel


def test_unchanged_toast_is_a_singleton() -> None:
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    assert type(UNCHANGED_TOAST)() is UNCHANGED_TOAST
    assert copy.copy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert copy.deepcopy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST
    insert = Insert(None, 1, ("a", UNCHANGED_TOAST))
    assert pickle.loads(pickle.dumps(insert)).new[1] is UNCHANGED_TOAST


def test_messages_are_slotted_and_hashable() -> None:
    # Not frozen (its __init__ is 3.6x slower), but no per-instance dict, no stray attributes,
    # and usable as dict keys like before.
    message = Insert(None, 1, ("a",))
    assert not hasattr(message, "__dict__")
    with pytest.raises(AttributeError):
        message.no_such_field = 2  # type: ignore[attr-defined]
    assert {message: 1}[Insert(None, 1, ("a",))] == 1
