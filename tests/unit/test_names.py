"""cdc.names: table names read and printed as PostgreSQL does; cdc.store.keys: canonical key text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.errors import UsageError
from cdc.names import KEYWORDS, display_table, format_table, parse_identifiers, parse_table, quote_ident
from cdc.store.keys import image_text, json_string, key_text


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("users", ("public", "users")),
        ("Users", ("public", "users")),
        ("USERS", ("public", "users")),
        ('"User"', ("public", "User")),
        ('"USERS"', ("public", "USERS")),
        ("app.users", ("app", "users")),
        ("App.Users", ("app", "users")),
        ('"a.b".c', ("a.b", "c")),
        ('a."b.c"', ("a", "b.c")),
        ('"Weird Name"', ("public", "Weird Name")),
        ('"say ""hi"""', ("public", 'say "hi"')),
        ('""""', ("public", '"')),
        ("t$1", ("public", "t$1")),
        ("_x", ("public", "_x")),
        ("ÉCOLE", ("public", "École")),  # only ASCII letters fold, as in a UTF-8 database
        ("café.Menü", ("café", "menü")),
        ('"日本"."表"', ("日本", "表")),
        ("  users  ", ("public", "users")),
        ("app . users", ("app", "users")),
        ('U&"d\\0061t\\+000061"', ("public", "data")),
        ("U&\"a!0062c\" UESCAPE '!'", ("public", "abc")),
        ('"user"', ("public", "user")),
        ("user", ("public", "user")),
        ("x" * 63, ("public", "x" * 63)),
    ],
)
def test_parse_table(given_name: str, expected: tuple[str, str]) -> None:
    assert parse_table(given_name) == expected
    assert parse_table(format_table(*expected)) == expected
    assert parse_table(display_table(*expected)) == expected


@pytest.mark.parametrize(
    "bad",
    ["", " ", "a.b.c", "1abc", "a b", 'a."', '""', "a.", ".a", "a-b", "x" * 64, '"a"b', 'a"b"', "a..b",
     '"' + "é" * 32 + '"', 'U&"\\00"', 'U&"\\0000"', "a;b", "(a)"],
)  # fmt: skip
def test_parse_table_errors(bad: str) -> None:
    with pytest.raises(UsageError, match="invalid table name"):
        parse_table(bad)


def test_too_long_names_say_how_postgresql_truncates_them() -> None:
    with pytest.raises(UsageError, match=r"longer than 63: PostgreSQL truncates it to x{63}\b"):
        parse_table("x" * 70)


@pytest.mark.parametrize(
    ("schema", "name", "full", "short"),
    [
        ("public", "users", "public.users", "users"),
        ("public", "User", 'public."User"', '"User"'),
        ("a.b", "c", '"a.b".c', '"a.b".c'),
        ("a", "b.c", 'a."b.c"', 'a."b.c"'),
        ("public", "Weird Name", 'public."Weird Name"', '"Weird Name"'),
        ("public", 'a"b', 'public."a""b"', '"a""b"'),
        ("public", "user", "public.user", '"user"'),  # a keyword needs quotes only when bare
        ("select", "t", '"select".t', '"select".t'),
        ("public", "t$1", 'public."t$1"', '"t$1"'),
        ("public", "École", 'public."École"', '"École"'),
        ("public", "int", "public.int", "int"),  # a column-name keyword is a valid table name
    ],
)
def test_format_table(schema: str, name: str, full: str, short: str) -> None:
    assert format_table(schema, name) == full
    assert display_table(schema, name) == short


_identifier = st.text(
    st.characters(exclude_characters="\x00", codec="utf-8"), min_size=1, max_size=20
).filter(lambda s: len(s.encode()) <= 63)


@given(_identifier, _identifier)
def test_format_then_parse_round_trips(schema: str, name: str) -> None:
    assert parse_table(format_table(schema, name)) == (schema, name)
    assert parse_table(display_table(schema, name)) == (schema, name)
    assert parse_identifiers(quote_ident(name)) == [name]


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_$]{0,20}", fullmatch=True))
def test_unquoted_names_fold_to_lower_case(name: str) -> None:
    assert parse_table(name) == ("public", name.lower())
    if name.lower() not in KEYWORDS and "$" not in name:
        assert display_table("public", name.lower()) == name.lower()


@given(st.text(max_size=30))
def test_parse_never_fails_otherwise(text: str) -> None:
    try:
        schema, name = parse_table(text)
    except UsageError:
        return
    assert schema and name and "\x00" not in schema + name


# ============================================================================ keys


def test_key_text_is_the_jsonb_text() -> None:
    assert key_text([42]) == "[42]"
    assert key_text(["a", 1]) == '["a", 1]'
    assert key_text([1, None, "x\ty"]) == '[1, null, "x\\ty"]'
    assert key_text([True, False]) == "[true, false]"
    assert key_text(['\x01\x1f\x7f é "\\ /']) == '["\\u0001\\u001f\x7f é \\"\\\\ /"]'
    assert key_text([{"sha256": "ab", "$cdc": "oversize", "bytes": 9}]) == (
        '[{"$cdc": "oversize", "bytes": 9, "sha256": "ab"}]'
    )


def test_image_text_is_compact_in_column_order() -> None:
    assert image_text({"id": 42, "b": "x", "a": None, "ok": True}) == '{"id":42,"b":"x","a":null,"ok":true}'


@given(st.text(st.characters(exclude_characters="\x00", codec="utf-8")))
def test_json_string_parses_back(text: str) -> None:
    assert json.loads(json_string(text)) == text
    assert json_string(text) == json.dumps(text, ensure_ascii=False)
