"""Fuzzing the capture core: the compiled and the pure-Python implementation give the same
bytes, events and errors on random valid streams (random schemas and values, streamed and
interleaved transactions, subtransaction aborts, two-phase) and on random byte mutations of
recorded frames; neither crashes the process."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.capture import model
from cdc.capture.model import Policy
from cdc.protocol import encode as wire
from tests.unit.capture_support import RECORDED, Registry, fake_hash, module, recorded_frames, run

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
TYPES = [23, 20, 16, 25, 1700, 1184]
TEXT = st.one_of(
    st.just("NULL"),
    st.text(
        alphabet=st.one_of(
            st.sampled_from(list('\\"\t\n\r\b\f\x00\x01\x1f\x7f{}, é☕𝄞')),
            st.characters(codec="utf-8", exclude_categories=("Cs",)),
        ),
        max_size=12,
    ),
)


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "now_us", lambda: 849_991_169_000_000)


def value(draw: st.DrawFn, type_oid: int, allow_unchanged: bool) -> object:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return None
    if choice == 1 and allow_unchanged:
        return wire.UNCHANGED
    if type_oid in (20, 23):
        return str(draw(st.integers(-(2**63), 2**63 - 1)))
    if type_oid == 16:
        return draw(st.sampled_from(["t", "f"]))
    if choice == 2:
        return draw(TEXT) * draw(st.integers(1, 40))  # long: over max_value_bytes
    return draw(TEXT)


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], dict[str, Policy], int]:
    tables = []
    policies: dict[str, Policy] = {}
    for t in range(draw(st.integers(1, 3))):
        names = draw(st.lists(TEXT, min_size=1, max_size=5, unique=True))
        columns = [(draw(st.sampled_from([0, 1])), n, draw(st.sampled_from(TYPES)), -1) for n in names]
        for _, name, _, _ in columns:
            if draw(st.integers(0, 5)) == 0:
                policies[name] = draw(st.sampled_from(list(Policy)))
        tables.append((16_400 + t, draw(st.sampled_from("dfi")), columns))
    frames: list[bytes] = []
    lsn = 1000

    def add(payload: bytes) -> None:
        nonlocal lsn
        frames.append(wire.xlog(lsn, payload))
        lsn += draw(st.integers(1, 50))

    def changes(xid: int | None, count: int) -> list[bytes]:
        out = []
        for _ in range(count):
            oid, identity, columns = draw(st.sampled_from(tables))
            if draw(st.integers(0, 6)) == 0:  # a Relation again (maybe a new shape)
                out.append(wire.relation(oid, "s", "t", identity, columns, xid=xid))
            kind = draw(st.sampled_from("IUUDTMm"))
            sub = xid if xid is None or draw(st.booleans()) else xid + draw(st.integers(1, 3))
            if kind == "I":
                out.append(wire.insert(oid, [value(draw, c[2], False) for c in columns], xid=sub))
            elif kind == "U":
                new = [value(draw, c[2], True) for c in columns]
                old_kind = draw(st.sampled_from(["K", "O", None]))
                old = [value(draw, c[2], old_kind == "O") for c in columns] if old_kind else None
                out.append(wire.update(oid, new, old, old_kind or "K", xid=sub))
            elif kind == "D":
                old_kind = draw(st.sampled_from(["K", "O"]))
                out.append(wire.delete(oid, [value(draw, c[2], True) for c in columns], old_kind, xid=sub))
            elif kind == "T":
                oids = draw(st.lists(st.sampled_from([t[0] for t in tables]), min_size=1, max_size=3))
                out.append(wire.truncate(oids, xid=sub))
            else:
                content = draw(st.binary(max_size=20))
                out.append(wire.message(draw(TEXT), content, kind == "M", draw(st.integers(0, 5)), xid=sub))
        return out

    def declare(xid: int | None) -> None:
        for oid, identity, columns in tables:
            add(wire.relation(oid, "s", "t", identity, columns, xid=xid))

    xid = 500
    open_streams: list[int] = []
    for _ in range(draw(st.integers(1, 6))):
        shape = draw(st.sampled_from(["plain", "stream", "stream", "prepared", "finish", "keepalive"]))
        if shape == "plain":
            xid += 10
            add(wire.begin(lsn + 500, draw(st.integers(0, 2**50)), xid))
            if draw(st.booleans()):
                add(wire.origin(lsn, draw(TEXT)))
            declare(None)
            for payload in changes(None, draw(st.integers(0, 4))):
                add(payload)
            add(wire.commit(lsn, lsn + 8, draw(st.integers(0, 2**50))))
        elif shape == "prepared":
            xid += 10
            gid = draw(TEXT)
            add(wire.begin_prepare(lsn, lsn + 8, 0, xid, gid))
            declare(None)
            for payload in changes(None, draw(st.integers(0, 3))):
                add(payload)
            add(wire.prepare(lsn, lsn + 8, 0, xid, gid))
            if draw(st.booleans()):
                add(wire.commit_prepared(lsn, lsn + 8, 5, xid, gid))
            else:
                add(wire.rollback_prepared(lsn, lsn + 8, 5, 6, xid, gid))
        elif shape == "stream":
            if open_streams and draw(st.booleans()):
                sxid = draw(st.sampled_from(open_streams))
            else:
                xid += 10
                sxid = xid
                open_streams.append(sxid)
            add(wire.stream_start(sxid, sxid == xid))
            declare(sxid)
            for payload in changes(sxid, draw(st.integers(0, 4))):
                add(payload)
            add(wire.stream_stop())
            if draw(st.integers(0, 3)) == 0:
                add(wire.stream_abort(sxid, sxid + draw(st.integers(1, 3))))
        elif shape == "finish" and open_streams:
            sxid = open_streams.pop(draw(st.integers(0, len(open_streams) - 1)))
            how = draw(st.integers(0, 2))
            if how == 0:
                add(wire.stream_commit(sxid, lsn, lsn + 8, draw(st.integers(0, 2**50))))
            elif how == 1:
                add(wire.stream_abort(sxid, sxid))
            else:
                add(wire.stream_abort(sxid, sxid, lsn, draw(st.integers(0, 2**50))))
        else:
            frames.append(wire.keepalive(lsn, draw(st.booleans())))
    for sxid in open_streams:
        add(wire.stream_commit(sxid, lsn, lsn + 8, 7))
    return frames, policies, draw(st.sampled_from([4, 30, 1 << 20]))


def compare(
    frames: list[bytes], policies: dict[str, Policy] | None = None, **options: object
) -> list[object]:
    module("compiled")
    outcomes = [
        run(name, frames, registry=Registry(policies=policies), hash_value=fake_hash, **options)  # type: ignore[arg-type]
        for name in ("python", "compiled")
    ]
    assert outcomes[0] == outcomes[1]
    return outcomes[0]


@SETTINGS
@given(streams(), st.sampled_from([1 << 30, 2000]), st.sampled_from([1, 500, 1 << 20]))
def test_random_valid_streams_equal(
    stream: tuple[list[bytes], dict[str, Policy], int], memory_limit: int, max_bytes: int
) -> None:
    frames, policies, max_value = stream
    compare(frames, policies, max_value_bytes=max_value, memory_limit_bytes=memory_limit, max_bytes=max_bytes)


MUTABLE = [p for p in RECORDED if "pg15_stream" not in p.name]


@settings(max_examples=1500, deadline=None, derandomize=True)
@given(st.integers(0, len(MUTABLE) - 1), st.integers(0, 2**32), st.integers(1, 4))
def test_mutated_recorded_frames_equal(which: int, seed: int, mutations: int) -> None:
    rng = random.Random(seed)
    frames = recorded_frames(MUTABLE[which])
    for _ in range(mutations):
        i = rng.randrange(len(frames))
        frame = bytearray(frames[i])
        if not frame:
            continue
        action = rng.randrange(4)
        pos = rng.randrange(len(frame))
        if action == 0:
            frame[pos] = rng.randrange(256)
        elif action == 1:
            del frame[pos:]
        elif action == 2:
            frame[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        else:
            frame[pos] ^= 1 << rng.randrange(8)
        frames[i] = bytes(frame)
    compare(frames, max_value_bytes=rng.choice([3, 64 << 20]))


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(st.binary(max_size=40), max_size=5))
def test_random_bytes_equal(payloads: list[bytes]) -> None:
    compare([wire.xlog(7, p) for p in payloads] + payloads)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(model.MIN_TIME_US - 10, model.MAX_TIME_US + 10))
def test_time_text_equal(us: int) -> None:
    compiled = module("compiled")
    try:
        expected = model.format_time(us)
    except ValueError:
        with pytest.raises(ValueError):
            compiled.format_time(us)
        return
    assert compiled.format_time(us) == expected
