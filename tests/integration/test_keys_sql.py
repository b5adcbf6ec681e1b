"""cdc.store.keys against PostgreSQL: the key text is jsonb_build_array(...)::text, strings are
escaped as escape_json does, and the key hash readers compute in SQL finds the written rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.store.keys import image_text, json_string, key_text

_TEXT = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=30)
_VALUE = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), _TEXT)
_CASTS = {bool: "boolean", int: "bigint", str: "text"}


@pytest.fixture(scope="module")
def conn(pg: Any) -> Iterator[psycopg.Connection[Any]]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.create_database(name), autocommit=True) as c:
        yield c
    pg.drop_database(name)


@settings(max_examples=300, deadline=None)
@given(st.lists(_VALUE, min_size=1, max_size=5))
def test_key_text_is_jsonb_build_array(conn: psycopg.Connection[Any], values: list[Any]) -> None:
    args = ", ".join("NULL" if v is None else f"%s::{_CASTS[type(v)]}" for v in values)
    row = conn.execute(
        f'SELECT jsonb_build_array({args})::text, hashtextextended(%s COLLATE "C", 0) = '
        f'hashtextextended(jsonb_build_array({args})::text COLLATE "C", 0)',
        [*(v for v in values if v is not None), key_text(values), *(v for v in values if v is not None)],
    ).fetchone()
    assert row is not None and row[0] == key_text(values) and row[1]


@settings(max_examples=300, deadline=None)
@given(_TEXT)
def test_json_string_is_escape_json(conn: psycopg.Connection[Any], text: str) -> None:
    assert conn.execute("SELECT to_json(%s::text)::text", [text]).fetchone() == (json_string(text),)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_TEXT.filter(bool), _VALUE, max_size=6))
def test_image_text_is_the_object(conn: psycopg.Connection[Any], image: dict[str, Any]) -> None:
    stored = conn.execute(
        "SELECT %s::jsonb = %s::jsonb", [image_text(image), psycopg.types.json.Jsonb(image)]
    )
    assert stored.fetchone() == (True,)
