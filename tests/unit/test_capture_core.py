"""The capture core (cdc/capture): both implementations give the same bytes, events and errors
on every recorded stream, and the COPY lines docs/store.md specifies on hand-checked cases."""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cdc.capture import engine, model
from cdc.capture.model import FinishedTransaction, LogicalMessage, Policy
from cdc.errors import ProtocolError
from cdc.protocol import encode as wire
from cdc.store.keys import json_string, key_text
from tests.unit.capture_support import (
    FRAMES,
    IMPLEMENTATIONS,
    NOW_US,
    RECORDED,
    Registry,
    copy_frames,
    fake_hash,
    lines,
    module,
    recorded_frames,
    run,
    transactions,
)

T0 = 849_991_169_070_400  # 2026-12-07 20:39:29.070400+00
T0_TEXT = "2026-12-07 20:39:29.070400+00"
INT4, INT8, TEXT, BOOL, NUMERIC = 23, 20, 25, 16, 1700
# Fields of a COPY line.
POS, ORD, AT, TABLE, SCHEMA, OP, FLAGS, LSN, XID, KEY, IMAGE, BEFORE, OLD_KEY, PENDING = range(14)


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "now_us", lambda: NOW_US)


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> str:
    module(request.param)
    return str(request.param)


def both(frames: list[bytes], **options: Any) -> list[Any]:
    """Run both implementations; assert the same outcome; return it."""
    registry = options.pop("registry", None)
    make = registry if callable(registry) and not isinstance(registry, Registry) else None
    outcomes = []
    for name in IMPLEMENTATIONS:
        reg = (
            make()
            if make
            else (Registry(registry.primary_keys, registry.policies) if registry else Registry())
        )
        outcomes.append(run(name, frames, registry=reg, **options))
    assert outcomes[0] == outcomes[1]
    return outcomes[0]


# --------------------------------------------------------------------------- recorded streams


@pytest.mark.parametrize("path", RECORDED + FRAMES, ids=lambda p: p.stem)
@pytest.mark.parametrize("max_bytes", [1, 300, 1 << 20])
def test_recorded_streams_equal(path: Path, max_bytes: int) -> None:
    module("compiled")
    frames = copy_frames(path) if path in FRAMES else recorded_frames(path)
    keys = {"items_full": ("id",)}
    outcome = both(frames, registry=Registry(keys), max_bytes=max_bytes)
    if "binary" in path.name:
        assert outcome[-2][0] == "error" and "binary" in outcome[-2][1]
    else:
        assert all(item[0] != "error" for item in outcome if isinstance(item, tuple))


def test_recorded_dml_default(impl: str) -> None:
    out = run(impl, recorded_frames(Path(RECORDED[0]).with_name("pg18_dml_default.jsonl")))
    got = [(f[OP], f[FLAGS], f[XID], f[KEY], f[IMAGE], f[BEFORE], f[OLD_KEY], f[PENDING]) for f in lines(out)]
    assert got == [
        (
            "I",
            "0",
            r"\N",
            "[1]",
            '{"id":1,"name":"apple","qty":3,"price":"1.25","note":null}',
            r"\N",
            r"\N",
            r"\N",
        ),
        (
            "I",
            "0",
            r"\N",
            "[2]",
            '{"id":2,"name":"pear","qty":5,"price":"0.75","note":"ripe"}',
            r"\N",
            r"\N",
            r"\N",
        ),
        (
            "U",
            "0",
            r"\N",
            "[1]",
            '{"id":1,"name":"apple","qty":4,"price":"1.25","note":"sold"}',
            r"\N",
            r"\N",
            r"\N",
        ),
        ("D", "0", r"\N", "[2]", '{"id":2}', r"\N", r"\N", r"\N"),
        (
            "I",
            "0",
            r"\N",
            "[3]",
            '{"id":3,"name":"naïve café ☕","qty":1,"price":"9.99","note":"two\\\\nlines"}',
            r"\N",
            r"\N",
            r"\N",
        ),
    ]
    txns = transactions(out)
    assert [t.change_count for t in txns] == [2, 1, 1, 1]
    first = txns[0]
    assert first.status == "c" and first.flags == 0 and first.commit_lsn is not None
    assert first.position > first.commit_lsn
    assert first.committed_at_text == model.format_time(first.committed_at_us)
    line = lines(out)[0]
    assert line[POS] == str(first.position) and line[ORD] == "0" and line[AT] == first.committed_at_text
    assert first.counts == {(1, "I", False): 2}


def test_recorded_key_update_and_identity_full(impl: str) -> None:
    key_update = lines(run(impl, recorded_frames(RECORDED[0].with_name("pg18_key_update.jsonl"))))
    assert [(f[OP], f[KEY], f[OLD_KEY], f[BEFORE]) for f in key_update] == [("U", "[11]", "[10]", r"\N")]
    full = lines(
        run(
            impl,
            recorded_frames(RECORDED[0].with_name("pg18_identity_full.jsonl")),
            registry=Registry({"items_full": ("id",)}),
        )
    )
    assert [(f[OP], f[FLAGS], f[KEY], f[IMAGE], f[BEFORE], f[OLD_KEY]) for f in full] == [
        ("U", "2", "[1]", '{"id":1,"name":"fig","qty":8}', '{"id":1,"name":"fig","qty":2}', r"\N"),
        ("D", "2", "[2]", '{"id":2,"name":"lime","qty":null}', r"\N", r"\N"),
    ]


def test_recorded_unchanged_toast_without_old_tuple(impl: str) -> None:
    out = run(impl, recorded_frames(RECORDED[0].with_name("pg18_toast_unchanged.jsonl")))
    (line,) = lines(out)
    assert (line[OP], line[IMAGE], line[PENDING], line[FLAGS]) == (
        "U",
        '{"id":1,"title":"second"}',
        "{body}",
        "0",
    )
    assert transactions(out)[0].pending_count == 1


def test_recorded_truncate_of_several_tables(impl: str) -> None:
    out = run(impl, recorded_frames(RECORDED[0].with_name("pg18_truncate.jsonl")))
    second = [f for f in lines(out) if f[POS] == str(transactions(out)[1].position)]
    assert [(f[ORD], f[OP], f[KEY], f[IMAGE]) for f in second] == [
        ("0", "T", r"\N", r"\N"),
        ("1", "T", r"\N", r"\N"),
    ]
    assert second[0][TABLE] != second[1][TABLE]


def test_recorded_streamed_with_aborted_subtransaction(impl: str) -> None:
    out = run(impl, recorded_frames(RECORDED[0].with_name("pg18_stream_parallel.jsonl")))
    committed, aborted = transactions(out)
    assert committed.status == "c" and committed.flags == model.STREAMED
    assert committed.messages == [
        (6, committed.messages[0][1], "cdc.stream", b"inside a streamed transaction")
    ]
    rows = [f for f in lines(out) if f[POS] == str(committed.position)]
    assert [f[OP] for f in rows] == ["I", "I", "I", "U", "D", "I", "T", "I", "I", "I", "I"]
    doomed = rows[7:10]
    assert {f[FLAGS] for f in doomed} == {"1"} and doomed[0][XID] != r"\N"
    assert rows[10][FLAGS] == "0" and rows[10][XID] not in (r"\N", doomed[0][XID])
    assert committed.counts[(1, "I", True)] == 3
    # Protocol 4 'parallel': the abort carries its LSN and time.
    assert aborted.status == "r" and aborted.commit_lsn is None
    assert {f[FLAGS] for f in lines(out) if f[POS] == str(aborted.position)} == {"1"}
    assert aborted.committed_at_us != NOW_US
    # Without them (streaming 'on') the abort frame's position and the current time.
    out = run(impl, recorded_frames(RECORDED[0].with_name("pg18_stream.jsonl")))
    aborted = transactions(out)[1]
    assert aborted.position == aborted.last_lsn + 1 and aborted.committed_at_us == NOW_US


def test_recorded_two_phase(impl: str) -> None:
    out = run(impl, recorded_frames(RECORDED[0].with_name("pg18_two_phase.jsonl")))
    committed, rolled_back = transactions(out)
    assert (committed.status, rolled_back.status) == ("c", "r")
    assert [f[FLAGS] for f in lines(out)] == ["0", "1"]
    out = run(impl, recorded_frames(RECORDED[0].with_name("pg18_stream_prepare.jsonl")))
    (txn,) = transactions(out)
    assert txn.status == "c" and txn.flags == model.STREAMED and txn.change_count == 3


def test_recorded_messages_and_frames(impl: str) -> None:
    out = run(impl, recorded_frames(RECORDED[0].with_name("pg18_messages.jsonl")))
    assert [m.content for m in out if isinstance(m, LogicalMessage)] == [
        b"outside a transaction",
        b"\x00\xff\x10",
    ]
    assert transactions(out)[0].messages[0][0] == 1  # after the INSERT: the next change's ordinal
    out = run(impl, copy_frames(FRAMES[-1]))
    state = out[-1]
    assert state[1] > 0 and state[2] > 0 and state[3] is True  # wal end, received, reply requested


# --------------------------------------------------------------------------- hand-built streams

OID, OID2 = 16_500, 16_501
COLUMNS = [(1, "id", INT4, -1), (0, "name", TEXT, -1), (0, "big", TEXT, -1), (0, "ok", BOOL, -1)]


class Stream:
    """A hand-built stream of frames with increasing LSNs."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.lsn = 0x10_0000

    def add(self, *payloads: bytes) -> Stream:
        for payload in payloads:
            self.frames.append(wire.xlog(self.lsn, payload))
            self.lsn += 16
        return self

    def txn(self, xid: int, *changes: bytes, when: int = T0) -> Stream:
        self.add(wire.begin(self.lsn + 1000, when, xid), *changes)
        return self.add(wire.commit(self.lsn, self.lsn + 8, when))


def relation(
    oid: int = OID,
    identity: str = "d",
    columns: list[tuple[int, str, int, int]] | None = None,
    xid: int | None = None,
    name: str = "t",
) -> bytes:
    return wire.relation(oid, "public", name, identity, columns or COLUMNS, xid=xid)


def test_insert_update_delete_default_identity(impl: str) -> None:
    s = Stream().txn(
        700,
        relation(),
        wire.insert(OID, ["1", "a", "x", "t"]),
        wire.update(OID, ["1", "b", wire.UNCHANGED, "f"]),
        wire.update(OID, ["2", "b", "y", None], old=["1", None, None, None], old_kind="K"),
        wire.delete(OID, ["2", None, None, None], old_kind="K"),
    )
    out = run(impl, s.frames)
    got = [(f[OP], f[FLAGS], f[KEY], f[IMAGE], f[BEFORE], f[OLD_KEY], f[PENDING]) for f in lines(out)]
    assert got == [
        ("I", "0", "[1]", '{"id":1,"name":"a","big":"x","ok":true}', r"\N", r"\N", r"\N"),
        ("U", "0", "[1]", '{"id":1,"name":"b","ok":false}', r"\N", r"\N", "{big}"),
        ("U", "0", "[2]", '{"id":2,"name":"b","big":"y","ok":null}', r"\N", "[1]", r"\N"),
        ("D", "0", "[2]", '{"id":2}', r"\N", r"\N", r"\N"),
    ]
    (txn,) = transactions(out)
    assert txn.pending_count == 1 and txn.change_count == 4 and txn.first_lsn < txn.last_lsn
    assert txn.counts == {(1, "I", False): 1, (1, "U", False): 2, (1, "D", False): 1}


def test_full_identity_fills_unchanged_toast_from_the_old_row(impl: str) -> None:
    s = Stream().txn(
        701,
        relation(identity="f"),
        wire.update(OID, ["1", "b", wire.UNCHANGED, "t"], old=["1", "a", "long", "t"], old_kind="O"),
        wire.update(OID, ["1", "c", wire.UNCHANGED, "t"], old=["1", "b", wire.UNCHANGED, "t"], old_kind="O"),
        wire.delete(OID, ["1", "c", "long", "t"], old_kind="O"),
    )
    out = run(impl, s.frames, registry=Registry({"t": ("id",)}))
    got = [(f[OP], f[FLAGS], f[KEY], f[IMAGE], f[BEFORE], f[OLD_KEY], f[PENDING]) for f in lines(out)]
    assert got == [
        (
            "U",
            "2",
            "[1]",
            '{"id":1,"name":"b","big":"long","ok":true}',
            '{"id":1,"name":"a","big":"long","ok":true}',
            r"\N",
            r"\N",
        ),
        ("U", "2", "[1]", '{"id":1,"name":"c","ok":true}', '{"id":1,"name":"b","ok":true}', r"\N", "{big}"),
        ("D", "2", "[1]", '{"id":1,"name":"c","big":"long","ok":true}', r"\N", r"\N", r"\N"),
    ]


def test_index_identity_key_and_unknown_key(impl: str) -> None:
    columns = [(0, "id", INT4, -1), (1, "code", TEXT, -1), (1, "n", INT8, -1)]
    s = Stream().txn(
        702,
        relation(identity="i", columns=columns),
        wire.insert(OID, ["1", "a\tb", "-5"]),
        wire.update(OID, ["1", wire.UNCHANGED, "7"]),
        wire.update(OID, ["1", wire.UNCHANGED, "8"], old=[None, "a\tb", "7"], old_kind="K"),
    )
    out = run(impl, s.frames)
    got = [(f[FLAGS], f[KEY], f[IMAGE], f[OLD_KEY], f[PENDING]) for f in lines(out)]
    assert got == [
        ("0", '["a\\\\tb", -5]', '{"id":1,"code":"a\\\\tb","n":-5}', r"\N", r"\N"),
        ("16", r"\N", '{"id":1,"n":7}', r"\N", "{code}"),
        ("0", '["a\\\\tb", 8]', '{"id":1,"code":"a\\\\tb","n":8}', '["a\\\\tb", 7]', r"\N"),
    ]


def test_keyless_table(impl: str) -> None:
    columns = [(1, "a", TEXT, -1), (1, "b", INT4, -1)]
    s = Stream().txn(
        703,
        relation(identity="f", columns=columns),
        wire.insert(OID, ["x", "1"]),
        wire.update(OID, ["x", "1"], old=["x", "1"], old_kind="O"),
        wire.update(OID, ["y", "1"], old=["x", "1"], old_kind="O"),
        wire.delete(OID, ["y", "1"], old_kind="O"),
    )
    got = [(f[OP], f[FLAGS], f[KEY], f[BEFORE], f[OLD_KEY]) for f in lines(run(impl, s.frames))]
    assert got == [
        ("I", "0", '["x", 1]', r"\N", r"\N"),
        ("U", "2", '["x", 1]', '{"a":"x","b":1}', r"\N"),
        ("U", "2", '["y", 1]', '{"a":"x","b":1}', '["x", 1]'),
        ("D", "2", '["y", 1]', r"\N", r"\N"),
    ]


def test_changes_of_an_ignored_relation_are_dropped(impl: str) -> None:
    """cdc's own tables on the source (the context-signing key) come in an all-tables publication:
    the registry describes them as ignored and no line of theirs is written, in both cores."""
    key_columns = [(1, "singleton", BOOL, -1), (0, "ipad", TEXT, -1)]
    s = Stream().txn(
        705,
        relation(),
        relation(OID2, columns=key_columns, name="context_key"),
        wire.insert(OID2, ["t", "\\x3636"]),
        wire.insert(OID, ["1", "a", "x", "t"]),
        wire.update(OID2, ["t", "\\x3737"], old=["t", None], old_kind="K"),
        wire.delete(OID2, ["t", None], old_kind="K"),
        wire.truncate([OID2, OID]),
    )
    out = both(s.frames, registry=lambda: Registry(ignored=frozenset({"context_key"})))
    got = [(f[ORD], f[TABLE], f[OP]) for f in lines(out)]
    # Described at their first change: context_key first (table 1), then t (table 2).
    assert got == [("0", "2", "I"), ("1", "2", "T")]
    (txn,) = transactions(out)
    assert txn.change_count == 2 and txn.counts == {(2, "I", False): 1, (2, "T", False): 1}
    assert b"3636" not in b"".join(item[1] for item in out if isinstance(item, tuple) and len(item) == 2)


def test_policies_and_oversize(impl: str) -> None:
    policies = {"name": Policy.EXCLUDE, "big": Policy.HASH, "ok": Policy.MASK}
    s = Stream().txn(
        704,
        relation(),
        wire.insert(OID, ["1", "secret", "payload", "t"]),
        wire.update(OID, ["1", wire.UNCHANGED, wire.UNCHANGED, None]),
    )
    out = run(impl, s.frames, registry=Registry(policies=policies), hash_value=fake_hash)
    got = [(f[FLAGS], f[IMAGE], f[PENDING]) for f in lines(out)]
    assert got == [
        ("0", '{"id":1,"name":null,"big":"h:7:7061796c","ok":"****"}', r"\N"),
        ("0", '{"id":1,"name":null,"ok":null}', "{big}"),
    ]
    with pytest.raises(ValueError, match="HASH policy"):
        run(impl, s.frames, registry=Registry(policies=policies))
    big = "é" * 10
    s = Stream().txn(705, relation(), wire.insert(OID, ["1", "short", big, "t"]))
    (line,) = lines(run(impl, s.frames, max_value_bytes=19))
    digest = __import__("hashlib").sha256(big.encode()).hexdigest()
    assert line[FLAGS] == "8"
    assert (
        line[IMAGE]
        == '{"id":1,"name":"short","big":{"$cdc":"oversize","bytes":20,"sha256":"' + digest + '"},"ok":true}'
    )
    columns = [(1, "k", TEXT, -1)]
    s = Stream().txn(706, relation(columns=columns), wire.insert(OID, [big]))
    (line,) = lines(run(impl, s.frames, max_value_bytes=19))
    assert line[KEY] == key_text([{"$cdc": "oversize", "bytes": 20, "sha256": digest}])
    assert line[FLAGS] == "8"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "plain",
        'quote " and \\ backslash',
        "tab\tnew\nline\rcr",
        "\x01\x1f\x7f",
        "naïve ☕ 𝄞",
        "\\N",
        "a\\tb",
    ],
)
def test_values_and_names_escaped_as_postgres_does(impl: str, value: str) -> None:
    columns = [(1, "k", TEXT, -1), (0, 'we"ird\\ \tname', TEXT, -1), (0, "NULL", TEXT, -1)]
    s = Stream().txn(707, relation(columns=columns), wire.update(OID, [value, value, wire.UNCHANGED]))
    (line,) = lines(run(impl, s.frames))
    unescaped = [field.replace("\\\\", "\\") for field in line]  # COPY escaping: doubled backslashes
    assert unescaped[KEY] == key_text([value])
    name = json_string(columns[1][1])
    assert unescaped[IMAGE] == f'{{"k":{json_string(value)},{name}:{json_string(value)}}}'
    assert line[PENDING] == '{"NULL"}'
    s = Stream().txn(707, relation(columns=columns), wire.update(OID, [value, value, wire.UNCHANGED]))
    s.frames[1] = wire.xlog(
        0x10_0010, relation(columns=[(1, "k", TEXT, -1), (0, "b c", TEXT, -1), (0, 'x"y\\z', TEXT, -1)])
    )
    s.frames[2] = wire.xlog(0x10_0020, wire.update(OID, [value, wire.UNCHANGED, wire.UNCHANGED]))
    (line,) = lines(run(impl, s.frames))
    assert line[PENDING] == '{"b c","x\\\\"y\\\\\\\\z"}'


def test_interleaved_streams_and_relation_overlays(impl: str) -> None:
    registry = Registry()
    v2 = [*COLUMNS, (0, "extra", TEXT, -1)]
    s = Stream()
    s.add(
        wire.begin(0, T0, 800),
        relation(),
        wire.insert(OID, ["1", "a", "b", "t"]),
        wire.commit(0, s.lsn + 100, T0),
    )
    s.add(
        wire.stream_start(901, True),
        relation(columns=v2, xid=901),
        wire.insert(OID, ["2", "a", "b", "t", "e"], xid=901),
        wire.stream_stop(),
    )
    # Another streamed transaction still sees the old shape...
    s.add(wire.stream_start(902, True), wire.insert(OID, ["3", "a", "b", "t"], xid=902), wire.stream_stop())
    s.add(
        wire.stream_start(901, False),
        wire.insert(OID, ["4", "a", "b", "t", "e"], xid=903),
        wire.stream_stop(),
    )
    s.add(wire.stream_abort(901, 903))
    s.add(wire.stream_commit(901, s.lsn, s.lsn + 8, T0))
    # ...until the first one commits.
    s.add(
        wire.stream_start(902, False),
        wire.insert(OID, ["5", "a", "b", "t", "e"], xid=902),
        wire.stream_stop(),
    )
    s.add(wire.stream_abort(902, 902, s.lsn + 4, T0 + 1))
    out = run(impl, s.frames, registry=registry)
    _, second, third = transactions(out)
    assert (second.xid, second.status, third.xid, third.status) == (901, "c", 902, "r")
    assert third.position == second.last_lsn + 16 * 4 + 4 + 1 and third.committed_at_us == T0 + 1
    got = [
        (f[POS] == str(t.position), f[FLAGS], f[XID], f[KEY], f[IMAGE].count(","))
        for t in (second, third)
        for f in lines(out)
        if f[POS] == str(t.position)
    ]
    assert got == [
        (True, "0", r"\N", "[2]", 4),
        (True, "1", "903", "[4]", 4),
        (True, "1", r"\N", "[3]", 3),
        (True, "1", r"\N", "[5]", 4),
    ]
    assert len(registry.calls) == 2


def test_rolled_back_transactions_decoded_in_progress_or_behind(impl: str) -> None:
    """MAYBE_INCOMPLETE: a rolled-back transaction whose last frame went out at or after its abort
    time (the walsender was behind: PostgreSQL stops decoding a transaction it finds aborted),
    whose abort time is unknown (protocol < 4), or whose first segment never arrived. XLogData's
    sendTime and the abort time are the server's clock."""
    frames: list[bytes] = []
    lsn = 0x20_0000

    def add(payload: bytes, sent: int) -> None:
        nonlocal lsn
        frames.append(wire.xlog(lsn, payload, send_time=sent))
        lsn += 16

    add(wire.begin(0, T0 - 100, 900), T0 - 99)
    add(relation(), T0 - 99)
    add(wire.insert(OID, ["0", "a", "b", "t"]), T0 - 99)
    add(wire.commit(0, lsn + 100, T0 - 100), T0 - 99)
    blocks = {
        910: [(T0 - 30, T0 - 20)],  # all sent before the abort: decoded in progress
        911: [(T0 + 5, T0 + 6)],  # first sent after it: the daemon was behind
        912: [(T0 - 30, T0 - 20), (T0 + 5, T0 + 6)],  # a later block after it
        913: [(T0 - 30, T0 - 20)],  # no abort time (protocol < 4): cannot tell
        914: [(T0 - 30, T0)],  # its last frame went out at the abort time itself
        915: [(T0 - 30, T0 - 20)],  # its first segment never arrived (below)
        916: [(T0 - 20, T0 - 10), (T0 - 40, T0 - 30)],  # the clock stepped back: the latest counts
    }
    for xid, sends in blocks.items():
        for n, (start, stop) in enumerate(sends):
            add(wire.stream_start(xid, n == 0 and xid != 915), start)
            add(wire.insert(OID, [str(xid * 10 + n), "a", "b", "t"], xid=xid), start)
            add(wire.stream_stop(), stop)
    for xid in blocks:
        add(wire.stream_abort(xid, xid) if xid == 913 else wire.stream_abort(xid, xid, lsn, T0), T0 + 50)
    out = both(frames)
    found = {t.xid: t for t in transactions(out)}
    assert found[900].flags == 0 and found[900].status == "c"
    maybe = model.STREAMED | model.MAYBE_INCOMPLETE
    assert {xid: found[xid].flags for xid in blocks} == {
        910: model.STREAMED,
        911: maybe,
        912: maybe,
        913: maybe,
        914: maybe,
        915: maybe,
        916: model.STREAMED,
    }
    assert all(found[xid].status == "r" for xid in blocks)


def test_describe_once_per_relation_body(impl: str) -> None:
    registry = Registry()
    s = Stream()
    for xid in range(900, 910):
        s.add(
            wire.stream_start(xid, True),
            relation(xid=xid),
            wire.insert(OID, [str(xid), "a", "b", "t"], xid=xid),
            wire.stream_stop(),
        )
        s.add(wire.stream_commit(xid, s.lsn, s.lsn + 8, T0))
    out = run(impl, s.frames, registry=registry)
    assert len(transactions(out)) == 10 and len(registry.calls) == 1
    # Described at the position of the change that follows the Relation message.
    assert registry.calls[0].lsn == 0x10_0020 and registry.calls[0].namespace == "public"


def test_relations_are_described_at_the_position_of_their_first_change(impl: str) -> None:
    """pgoutput sends Relation messages with no position (wal_start 0): each is described with
    the LSN of the first change using it, in a transaction, in a streamed block (a rename) and
    in a TRUNCATE of two tables."""
    registry = Registry()
    s = Stream()

    def unplaced(payload: bytes) -> None:
        s.frames.append(wire.xlog(0, payload))

    s.add(wire.begin(s.lsn + 1000, T0, 720))
    unplaced(relation())
    s.add(wire.insert(OID, ["1", "a", "b", "t"]))  # 0x10_0010
    s.add(wire.commit(s.lsn, s.lsn + 8, T0))
    s.add(wire.stream_start(721, True))
    unplaced(relation(xid=721, name="renamed"))
    s.add(wire.update(OID, ["1", "x", "b", "t"], xid=721))  # 0x10_0040
    s.add(wire.stream_stop())
    s.add(wire.stream_commit(721, s.lsn, s.lsn + 8, T0))
    s.add(wire.begin(s.lsn + 1000, T0, 722))
    unplaced(relation(OID2, name="other"))
    unplaced(relation(name="renamed"))  # seen before: described already
    s.add(wire.truncate([OID2, OID]))  # 0x10_0080
    s.add(wire.commit(s.lsn, s.lsn + 8, T0))
    out = run(impl, s.frames, registry=registry)
    assert len(transactions(out)) == 3
    assert [(d.name, d.lsn) for d in registry.calls] == [
        ("t", 0x10_0010),
        ("renamed", 0x10_0040),
        ("other", 0x10_0080),
    ]


def test_skip_through_drops_stored_transactions_but_keeps_their_relations(impl: str) -> None:
    s = Stream().txn(710, relation(), wire.insert(OID, ["1", "a", "b", "t"]))
    s.txn(711, wire.insert(OID, ["2", "a", "b", "t"]))
    first_end = struct.unpack("!Q", s.frames[3][25 + 10 : 25 + 18])[0]
    out = run(impl, s.frames, skip_through=first_end)
    assert [t.xid for t in transactions(out)] == [711]


def test_keepalive_state_and_bad_frames(impl: str) -> None:
    module_core = module(impl).Core(Registry())
    module_core.feed(wire.keepalive(500, reply=False))
    assert (module_core.server_wal_end, module_core.reply_requested) == (500, False)
    module_core.feed(memoryview(wire.keepalive(400, reply=True)))
    assert (module_core.server_wal_end, module_core.reply_requested) == (500, True)
    module_core.reply_requested = False
    for frame, message in [
        (b"", "empty CopyData"),
        (b"x", "unknown CopyData frame type 0x78"),
        (b"w" + b"\0" * 10, "the header alone is 25"),
        (wire.xlog(1, b""), "empty pgoutput message"),
        (wire.xlog(1, b"Z"), "unknown pgoutput message type 0x5a"),
        (wire.xlog(1, wire.insert(OID, ["1"])), "Insert message outside a transaction"),
        (wire.xlog(1, wire.stream_stop()), "StreamStop message outside a streamed block"),
        (wire.xlog(1, wire.commit(1, 2, 3)), "Commit message without Begin"),
        (wire.xlog(1, wire.begin(1, 2, 3)[:-1]), "Begin message (20 bytes): ends too early at offset 20"),
    ]:
        with pytest.raises(ProtocolError, match=re.escape(message)):
            module_core.feed(frame)


def test_errors_name_the_message_and_offset_never_values(impl: str) -> None:
    s = Stream().txn(712, relation(), wire.insert(OID, ["1", "secret", "b", "maybe"]))
    out = run(impl, s.frames)
    assert out[-2] == ("error", str(out[-2][1]))
    assert "Insert message" in out[-2][1] and "not a boolean" in out[-2][1] and "maybe" not in out[-2][1]
    s = Stream().txn(713, relation(), wire.insert(OID + 1, ["1", "a", "b", "t"]))
    assert "before its Relation message" in run(impl, s.frames)[-2][1]


def test_spilled_transaction_of_100k_rows(impl: str, tmp_path: Path) -> None:
    def frames() -> Iterator[bytes]:
        yield wire.xlog(1, wire.begin(0, T0, 720))
        yield wire.xlog(2, relation())
        insert = wire.insert(OID, ["0", "name", "a somewhat longer text value", "t"])
        for i in range(100_000):
            yield wire.xlog(3 + i, insert)
        yield wire.xlog(200_000, wire.commit(200_000, 200_008, T0))

    core = module(impl).Core(Registry(), memory_limit_bytes=1 << 20, spill_dir=str(tmp_path))
    peak = 0
    for frame in frames():
        core.feed(frame)
        peak = max(peak, core.memory_bytes)
    assert core.spilled_transactions == 1 and peak <= (1 << 20) + 1000
    (txn,) = core.pop_events()
    assert isinstance(txn, FinishedTransaction) and txn.change_count == 100_000
    count = 0
    for chunk in txn.chunks(1 << 20):
        assert len(chunk) <= 1 << 20
        for line in chunk.splitlines():
            fields = line.split(b"\t")
            assert fields[ORD] == str(count).encode() and fields[LSN] == str(3 + count).encode()
            count += 1
    assert count == 100_000
    with pytest.raises(RuntimeError):
        txn.chunks(1)


def test_spilled_output_equals_in_memory_output(tmp_path: Path) -> None:
    s = Stream()
    for xid in (1, 2, 3):
        s.add(wire.stream_start(xid, True), relation(xid=xid))
        for i in range(300):
            s.add(wire.insert(OID, [str(i), "n" * (i % 7), "b", "t"], xid=xid))
        s.add(wire.stream_stop())
    for xid in (1, 2, 3):
        s.add(wire.stream_commit(xid, s.lsn, s.lsn + 8, T0))
    spilled = both(s.frames, memory_limit_bytes=10_000, spill_dir=str(tmp_path))
    in_memory = both(s.frames)
    assert spilled[-1][6] == 3 and in_memory[-1][6] == 0
    assert spilled[:-1] == in_memory[:-1]


def test_snapshot_lines(impl: str) -> None:
    columns = [(1, "id", INT4, -1), (0, "name", TEXT, -1), (0, "ok", BOOL, -1)]
    registry = Registry(policies={"ok": Policy.MASK})
    core = module(impl).Core(registry)
    info = registry(
        model.RelationDesc(
            1, "public", "t", "d", tuple(model.ColumnDesc(n, o, m, bool(f)) for f, n, o, m in columns), 0
        )
    )
    rows = b"1\ta\\tb\\\\c\\nd\\101\\x41\tt\n2\t\\N\t\\N\n"
    data, count = core.snapshot_lines(info, rows, position=99, first_ordinal=5, committed_at_us=T0)
    assert count == 2
    assert data.decode().splitlines() == [
        f'99\t5\t{T0_TEXT}\t1\t101\tS\t0\t99\t\\N\t[1]\t{{"id":1,"name":"a\\\\tb\\\\\\\\c\\\\ndAA","ok":"****"}}\t\\N\t\\N\t\\N',
        f'99\t6\t{T0_TEXT}\t1\t101\tS\t0\t99\t\\N\t[2]\t{{"id":2,"name":null,"ok":null}}\t\\N\t\\N\t\\N',
    ]
    assert core.snapshot_lines(info, b"", position=1, first_ordinal=0, committed_at_us=T0) == (b"", 0)
    for bad, message in [
        (b"1\ta\tt", "not complete"),
        (b"1\ta\n", "2 fields for 3 columns"),
        (b"x\ta\tt\n", "not an integer"),
        (b"1\ta\\\tt\n", "lone backslash"),
    ]:
        with pytest.raises(ProtocolError, match=re.escape(message)):
            core.snapshot_lines(info, bad, position=1, first_ordinal=0, committed_at_us=T0)


def test_drain_reads_every_ready_frame(impl: str) -> None:
    class FakeConn:
        def __init__(self, frames: list[bytes], last: int) -> None:
            self.items = [(len(f), memoryview(f)) for f in frames] + [(last, b"")]

        def get_copy_data(self, async_: int) -> tuple[int, Any]:
            assert async_ == 1
            return self.items.pop(0)

    s = Stream().txn(730, relation(), wire.insert(OID, ["1", "a", "b", "t"]))
    core = module(impl).Core(Registry())
    assert core.drain(FakeConn(s.frames, 0)) == 4
    assert len(core.pop_events()) == 1 and core.relation(OID) is not None and core.relation(1) is None
    assert core.drain(FakeConn([], -1)) == -1
    with pytest.raises(ProtocolError):
        core.drain(FakeConn([], -2))


def test_engine_picks_an_implementation(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    assert engine.IMPLEMENTATION in ("compiled", "python")
    monkeypatch.setenv("CDC_PURE_PYTHON", "1")
    reloaded = importlib.reload(engine)
    try:
        assert reloaded.IMPLEMENTATION == "python"
        assert reloaded.Core.__module__ == "cdc.capture.core"
    finally:
        monkeypatch.delenv("CDC_PURE_PYTHON")
        importlib.reload(engine)
