"""key_text three ways (docs/store.md "The key"): the server's jsonb_build_array(...)::text,
cdc.store.keys.key_text, and the capture cores building it from tuple bytes, on fuzzed values."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc.capture.model import Kind, Policy, RelationDesc, RelationInfo
from cdc.devdb import LocalPostgres
from cdc.protocol import encode as wire
from cdc.store.keys import json_string, key_text
from tests.unit.capture_support import IMPLEMENTATIONS, module

CHARS = [
    '"',
    "\\",
    "\t",
    "\n",
    "\r",
    "\b",
    "\f",
    "\x01",
    "\x1f",
    "\x7f",
    "é",
    "☕",
    "𝄞",
    "\u2028",
    "a",
    " ",
    "/",
]


@pytest.fixture(scope="module")
def conn(pg: LocalPostgres) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg.dsn(), autocommit=True) as connection:
        yield connection


def random_key(rng: random.Random) -> list[Any]:
    values: list[Any] = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0:
            values.append(None)
        elif kind == 1:
            values.append(rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randint(-(10**9), 10**9)]))
        elif kind == 2:
            values.append(rng.choice([True, False]))
        elif kind == 3:
            values.append("".join(rng.choice(CHARS) for _ in range(rng.randint(0, 12))))
        else:
            values.append({"$cdc": "oversize", "bytes": rng.randint(0, 10**9), "sha256": "ab" * 32})
    return values


def sql_text(conn: psycopg.Connection[Any], values: list[Any]) -> str:
    parts, params = [], []
    for value in values:
        if value is None:
            parts.append("NULL")
        elif isinstance(value, bool):
            parts.append("%s::boolean")
            params.append(value)
        elif isinstance(value, int):
            parts.append("%s::bigint")
            params.append(value)
        elif isinstance(value, dict):
            parts.append("%s::jsonb")
            params.append(json.dumps(value))
        else:
            parts.append("%s::text")
            params.append(value)
    row = conn.execute(f"SELECT jsonb_build_array({', '.join(parts)})::text", params).fetchone()
    assert row is not None
    return str(row[0])


def test_key_text_equals_jsonb_build_array(conn: psycopg.Connection[Any]) -> None:
    rng = random.Random(20261207)
    for _ in range(300):
        values = random_key(rng)
        assert key_text(values) == sql_text(conn, values), values


def test_json_string_equals_the_server(conn: psycopg.Connection[Any]) -> None:
    rng = random.Random(7)
    for _ in range(100):
        text = "".join(rng.choice(CHARS) for _ in range(rng.randint(0, 20)))
        row = conn.execute("SELECT to_json(%s::text)::text", (text,)).fetchone()
        assert row is not None and json_string(text) == row[0]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_capture_key_text_equals_the_server(conn: psycopg.Connection[Any], impl: str) -> None:
    rng = random.Random(11)
    columns = [(1, "i", 20, -1), (1, "b", 16, -1), (1, "t", 25, -1)]

    def describe(desc: RelationDesc) -> RelationInfo:
        return RelationInfo(
            1,
            1,
            ("i", "b", "t"),
            (Kind.INTEGER, Kind.BOOLEAN, Kind.TEXT),
            (Policy.NONE,) * 3,
            (0, 1, 2),
            False,
        )

    frames = [wire.xlog(1, wire.begin(0, 0, 5)), wire.xlog(2, wire.relation(1, "public", "k", "d", columns))]
    expected = []
    for n in range(200):
        i = rng.choice([None, rng.randint(-(2**63), 2**63 - 1)])
        b = rng.choice([None, True, False])
        t = rng.choice([None, "".join(rng.choice(CHARS) for _ in range(rng.randint(0, 12)))])
        raw = [None if i is None else str(i), None if b is None else ("t" if b else "f"), t]
        frames.append(wire.xlog(3 + n, wire.insert(1, raw)))
        expected.append(sql_text(conn, [i, b, t]))
    frames.append(wire.xlog(1000, wire.commit(1000, 1008, 0)))
    core = module(impl).Core(describe)
    for frame in frames:
        core.feed(frame)
    (txn,) = core.pop_events()
    got = [
        line.split(b"\t")[9].replace(b"\\\\", b"\\").decode()
        for line in b"".join(txn.chunks(1 << 20)).splitlines()
    ]  # type: ignore[union-attr]
    assert got == expected
