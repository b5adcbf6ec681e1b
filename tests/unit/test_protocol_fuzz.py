"""Property tests: any bytes either decode or raise ProtocolError, never anything else.

Inputs are arbitrary bytes, bytes behind a valid message tag, and captured real
payloads and frames that were truncated, had bytes flipped, inserted or removed.
Also: random well-formed messages decode back to what was encoded.
"""

from __future__ import annotations

import functools
import json
import struct
import typing
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdc.errors import ProtocolError
from cdc.protocol import (
    UNCHANGED_TOAST,
    Decoder,
    Delete,
    Insert,
    PgOutputMessage,
    PrimaryKeepalive,
    StandbyStatusUpdate,
    Update,
    XLogData,
    decode_message,
    parse_copy_data,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "pgoutput"
MESSAGE_TYPES = typing.get_args(PgOutputMessage)
FRAME_TYPES = (XLogData, PrimaryKeepalive, StandbyStatusUpdate)
TAGS = b"BCORYIUDTMSEcAbPKrp"

FUZZ = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _captured(frames: bool) -> list[bytes]:
    seen: dict[bytes, None] = {}
    for path in sorted(DATA_DIR.glob("pg*_*.jsonl")):
        if path.name.endswith("_frames.jsonl") != frames:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        for line in lines:
            payload = bytes.fromhex(json.loads(line)["hex"])
            # The big streamed files repeat the same Insert shape hundreds of times.
            if len(seen) < 2000 and (frames or payload[:1] != b"I" or len(seen) % 7 == 0 or len(lines) < 100):
                seen[payload] = None
    return list(seen)


CAPTURED_PAYLOADS = _captured(frames=False)
CAPTURED_FRAMES = _captured(frames=True)


def decodes_or_protocol_error(
    decode: Callable[[bytes | memoryview], object], data: bytes | memoryview, types: tuple[type, ...]
) -> None:
    try:
        result = decode(data)
    except ProtocolError:
        return
    assert isinstance(result, types), type(result)


def check_all_decoders(data: bytes) -> None:
    for in_stream in (False, True):
        stateless = functools.partial(decode_message, in_stream=in_stream)
        decodes_or_protocol_error(stateless, data, MESSAGE_TYPES)
        decodes_or_protocol_error(stateless, memoryview(data), MESSAGE_TYPES)
    for version in (1, 2, 3, 4):
        decodes_or_protocol_error(Decoder(version).decode, data, MESSAGE_TYPES)
        if version >= 2:
            streaming = Decoder(version)
            streaming.decode(b"S" + struct.pack("!IB", 1, 1))
            decodes_or_protocol_error(streaming.decode, data, MESSAGE_TYPES)


@st.composite
def mutated(draw: st.DrawFn, corpus: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(corpus)))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "set"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip" and pos < len(data):
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "set" and pos < len(data):
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


tagged = st.tuples(st.sampled_from(TAGS), st.binary(max_size=120)).map(lambda t: bytes([t[0]]) + t[1])


# --------------------------------------------------------------------------- pgoutput


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    check_all_decoders(data)


@FUZZ
@given(tagged)
def test_arbitrary_bytes_behind_a_valid_tag(data: bytes) -> None:
    check_all_decoders(data)


@FUZZ
@given(mutated(CAPTURED_PAYLOADS))
def test_mutated_captured_payloads(data: bytes) -> None:
    check_all_decoders(data)


def test_every_truncation_of_every_distinct_captured_payload() -> None:
    shapes = {(p[:1], len(p)): p for p in CAPTURED_PAYLOADS}
    for payload in shapes.values():
        for cut in range(len(payload)):
            check_all_decoders(payload[:cut])


# --------------------------------------------------------------------------- round trips

values = st.one_of(
    st.none(),
    st.just(UNCHANGED_TOAST),
    st.text(max_size=20),
    st.binary(max_size=20),
)
tuples = st.lists(values, max_size=12).map(tuple)
xids = st.one_of(st.none(), st.integers(0, 2**32 - 1))
oids = st.integers(0, 2**32 - 1)


def encode_tuple(row: tuple[object, ...]) -> bytes:
    out = struct.pack("!H", len(row))
    for value in row:
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


def head(tag: bytes, xid: int | None, oid: int) -> bytes:
    return tag + (b"" if xid is None else struct.pack("!I", xid)) + struct.pack("!I", oid)


@FUZZ
@given(xids, oids, tuples)
def test_insert_round_trip(xid: int | None, oid: int, row: tuple[object, ...]) -> None:
    payload = head(b"I", xid, oid) + b"N" + encode_tuple(row)
    assert decode_message(payload, in_stream=xid is not None) == Insert(xid, oid, row)  # type: ignore[arg-type]


@FUZZ
@given(xids, oids, st.sampled_from([None, "K", "O"]), tuples, tuples)
def test_update_round_trip(
    xid: int | None, oid: int, old_kind: str | None, old: tuple[object, ...], new: tuple[object, ...]
) -> None:
    payload = head(b"U", xid, oid)
    if old_kind is not None:
        payload += old_kind.encode() + encode_tuple(old)
    payload += b"N" + encode_tuple(new)
    expected = Update(xid, oid, old if old_kind else None, old_kind, new)  # type: ignore[arg-type]
    assert decode_message(payload, in_stream=xid is not None) == expected


@FUZZ
@given(xids, oids, st.sampled_from(["K", "O"]), tuples)
def test_delete_round_trip(xid: int | None, oid: int, old_kind: str, old: tuple[object, ...]) -> None:
    payload = head(b"D", xid, oid) + old_kind.encode() + encode_tuple(old)
    assert decode_message(payload, in_stream=xid is not None) == Delete(xid, oid, old, old_kind)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- frames


@FUZZ
@given(st.binary(max_size=80))
def test_arbitrary_frames(data: bytes) -> None:
    decodes_or_protocol_error(parse_copy_data, data, FRAME_TYPES)
    decodes_or_protocol_error(parse_copy_data, memoryview(data), FRAME_TYPES)


@FUZZ
@given(st.tuples(st.sampled_from(b"wkr"), st.binary(max_size=60)).map(lambda t: bytes([t[0]]) + t[1]))
def test_arbitrary_bytes_behind_a_frame_tag(data: bytes) -> None:
    decodes_or_protocol_error(parse_copy_data, data, FRAME_TYPES)


@FUZZ
@given(mutated(CAPTURED_FRAMES))
def test_mutated_captured_frames(data: bytes) -> None:
    decodes_or_protocol_error(parse_copy_data, data, FRAME_TYPES)
    try:
        frame = parse_copy_data(data)
    except ProtocolError:
        return
    if isinstance(frame, XLogData):
        check_all_decoders(frame.payload)
