"""cdc.context: the wire format of the context and error messages, and the pattern translation."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.context import (
    CONTEXT_PREFIX,
    DEFAULT_APPLICATION_NAME_PATTERN,
    ERROR_PREFIX,
    HEARTBEAT_PREFIX,
    MAX_EXTRA_KEYS,
    MAX_MESSAGE_BYTES,
    ReportedError,
    RequestContext,
    compile_application_name_pattern,
    context_fingerprint,
    parse_context,
    parse_error,
    pattern_to_postgres,
    request_id_from_application_name,
    required_literal,
    truncate_utf8,
    validate_setting_name,
)
from cdc.errors import ConfigError, ProtocolError

GOOD_CONTEXT: dict[str, Any] = {
    "request_id": "550e8400",
    "actor": "billing",
    "application_name": "web-1",
    "db_user": "app",
    "client_addr": "10.0.0.7",
    "backend_pid": 4242,
    "source": "client",
    "extra": {"tenant": "acme"},
}
GOOD_ERROR: dict[str, Any] = {
    "request_id": "550e8400",
    "xid": 123456,
    "error_type": "PaymentTimeout",
    "message": "Stripe API timeout after 10s",
    "location": "payments/create.py:42",
    "actor": "billing",
    "at": "2026-03-10T14:22:00.123456+00:00",
}


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_prefixes() -> None:
    assert (CONTEXT_PREFIX, ERROR_PREFIX, HEARTBEAT_PREFIX) == ("cdc.context", "cdc.error", "cdc.heartbeat")


# ============================================================================ parse_context


def test_parse_context_roundtrip() -> None:
    ctx = parse_context(encode(GOOD_CONTEXT))
    assert ctx == RequestContext(
        request_id="550e8400",
        actor="billing",
        application_name="web-1",
        db_user="app",
        client_addr="10.0.0.7",
        backend_pid=4242,
        source="client",
        extra={"tenant": "acme"},
    )
    assert ctx.as_json() == GOOD_CONTEXT
    assert parse_context(ctx.to_content().encode()) == ctx
    with pytest.raises(TypeError):
        ctx.extra["x"] = "y"  # type: ignore[index]  # frozen all the way down


def test_parse_context_trigger_output() -> None:
    # json_build_object() as the trigger writes it: spaces, nulls, extra with null values
    content = (
        b'{"request_id" : null, "actor" : null, "application_name" : "psql", "db_user" : "postgres", '
        b'"client_addr" : null, "backend_pid" : 77, "source" : "none", "extra" : {"tenant" : null}}'
    )
    ctx = parse_context(content)
    assert (ctx.request_id, ctx.source, ctx.extra, ctx.client_addr) == (None, "none", {}, None)


def test_parse_context_is_lenient_where_it_can_be() -> None:
    minimal = {"db_user": "u", "backend_pid": 1, "source": "none", "future_field": [1, 2]}
    ctx = parse_context(encode(minimal))
    assert (ctx.request_id, ctx.actor, ctx.extra) == (None, None, {})
    many = {f"k{i:03}": str(i) for i in range(200)}
    odd = {"n": 3, "b": True, "f": 1.5, "nested": {"a": [1]}, "null": None}
    ctx = parse_context(encode({**GOOD_CONTEXT, "extra": many}))
    assert len(ctx.extra) == MAX_EXTRA_KEYS
    ctx = parse_context(encode({**GOOD_CONTEXT, "extra": odd}))
    assert dict(ctx.extra) == {"n": "3", "b": "true", "f": "1.5", "nested": '{"a":[1]}'}
    ctx = parse_context(encode({**GOOD_CONTEXT, "request_id": "r" * 1000, "extra": {"t": "v" * 5000}}))
    assert ctx.request_id is not None and len(ctx.request_id) == 256
    assert len(ctx.extra["t"]) == 1024


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"string"',
        b"null",
        b"{}",
        b'{"db_user": "u", "backend_pid": 1, "source": "elsewhere"}',
        b'{"db_user": "u", "source": "none"}',
        b'{"db_user": "u", "backend_pid": "1", "source": "none"}',
        b'{"db_user": "u", "backend_pid": true, "source": "none"}',
        b'{"db_user": "u", "backend_pid": -1, "source": "none"}',
        b'{"db_user": null, "backend_pid": 1, "source": "none"}',
        b'{"backend_pid": 1, "source": "none"}',
        b'{"db_user": "u", "backend_pid": 1, "source": "none", "request_id": 5}',
        b'{"db_user": "u", "backend_pid": 1, "source": "none", "extra": []}',
        b'{"db_user": "u", "backend_pid": 1, "source": "none", "request_id": "\\ud800"}',
        b'{"db_user": "u", "backend_pid": NaN, "source": "none"}',
        b"[" * 100_000,
        b"{" + b" " * (2 << 20) + b"}",
    ],
)
def test_parse_context_malformed(content: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_context(content)


# ============================================================================ parse_error


def test_parse_error_roundtrip() -> None:
    err = parse_error(encode(GOOD_ERROR))
    assert err == ReportedError(
        request_id="550e8400",
        xid=123456,
        error_type="PaymentTimeout",
        message="Stripe API timeout after 10s",
        location="payments/create.py:42",
        actor="billing",
        at=datetime(2026, 3, 10, 14, 22, 0, 123456, tzinfo=UTC),
    )
    assert err.as_json() == GOOD_ERROR
    assert parse_error(err.to_content().encode()) == err


def test_parse_error_details() -> None:
    big = (1 << 32) + 77  # an epoch-qualified xid
    err = parse_error(
        encode({**GOOD_ERROR, "xid": big, "at": "2026-03-10T16:22:00+02:00", "message": "é" * 5000})
    )
    assert err.xid32 == 77
    assert err.at == datetime(2026, 3, 10, 14, 22, tzinfo=UTC)
    assert len(err.message.encode()) <= MAX_MESSAGE_BYTES and err.message.endswith("…")
    naive = parse_error(encode({**GOOD_ERROR, "at": "2026-03-10T14:22:00", "xid": None, "location": None}))
    assert naive.at.tzinfo is UTC and naive.xid is None and naive.xid32 is None


@pytest.mark.parametrize(
    "change",
    [
        {"at": "yesterday"},
        {"at": None},
        {"error_type": None},
        {"message": 42},
        {"xid": "12"},
        {"xid": 1 << 70},
        {"location": ["a.py", 1]},
    ],
)
def test_parse_error_malformed(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_error(encode({**GOOD_ERROR, **change}))
    with pytest.raises(ProtocolError):
        parse_error(b"{")


# ============================================================================ fuzzing: ProtocolError and nothing else

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _only_protocol_errors(content: bytes) -> None:
    for parse in (parse_context, parse_error):
        with contextlib.suppress(ProtocolError):
            parse(content)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_error(content: bytes) -> None:
    _only_protocol_errors(content)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            key: json_values | st.just(GOOD_CONTEXT.get(key, GOOD_ERROR.get(key)))
            for key in {*GOOD_CONTEXT, *GOOD_ERROR}
        },
    )
)
def test_arbitrary_objects_raise_only_protocol_error(obj: dict[str, Any]) -> None:
    _only_protocol_errors(json.dumps(obj).encode())


# ============================================================================ helpers


def test_truncate_utf8() -> None:
    assert truncate_utf8("short", 10) == "short"
    cut = truncate_utf8("€" * 10, 10)  # 3 bytes each
    assert cut == "€€…" and len(cut.encode()) <= 10


def test_fingerprint() -> None:
    assert context_fingerprint("r1", "web") == "r1\x1fweb"
    assert context_fingerprint(None, "") == context_fingerprint("", "") == "\x1f"


def test_validate_setting_name() -> None:
    assert validate_setting_name("Tenant") == "tenant"
    assert validate_setting_name("_x$1") == "_x$1"
    for bad in ("", "1a", "a-b", "a.b", "a b", "x" * 200):
        with pytest.raises(ValueError):
            validate_setting_name(bad)


def test_context_module_is_pure() -> None:
    code = "import sys, cdc.context; assert 'psycopg' not in sys.modules, 'psycopg imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ============================================================================ the application_name pattern


@pytest.mark.parametrize(
    ("pattern", "postgres"),
    [
        (DEFAULT_APPLICATION_NAME_PATTERN, "req:([A-Za-z0-9._:-]+)"),
        (r"(a|b)(?P<id>\d+)(c)", r"(?:a|b)(\d+)(?:c)"),
        (r"x(?P<other>y)(?P<id>z)", r"x(?:y)(z)"),
        (r"job=(\d+)", r"job=(\d+)"),
        (r"\bid\B", r"\yid\Y"),
        (r"[\b]", r"[\b]"),
        (r"a{,3}b{2}c{2,}d{1,4}", r"a{0,3}b{2}c{2,}d{1,4}"),
        (r"a{b}", r"a\{b\}"),
        (r"(?i)req:(?P<id>\w+)", r"(?i)req:(\w+)"),
        (r"(?:x)(?=y)(?!z)(?<=a)(?<!b)", r"(?:x)(?=y)(?!z)(?<=a)(?<!b)"),
        (r"a(?#comment)b", "ab"),
        (r"\x41\u00e9", r"\u0041\u00e9"),
        (r"[]a]", r"[]a]"),
        (r"[^]a]", r"[^]a]"),
        (r"a*?b+?", r"a*?b+?"),
        (r"\.\-\:", r"\.\-\:"),
        (r"\A(x)\Z", r"\A(x)\Z"),
    ],
)
def test_pattern_to_postgres(pattern: str, postgres: str) -> None:
    assert pattern_to_postgres(pattern) == postgres


@pytest.mark.parametrize(
    "pattern",
    [
        r"(?P<id>a)(?P=id)",
        r"(a)\1",
        r"(?(1)a|b)",
        r"(?>a)",
        r"a++",
        r"a(?i)b",
        r"(?s)a",
        r"(?i:a)",
        r"[[:alpha:]]",
        r"\N{DIGIT ONE}",
        r"(",
        r"\0",
    ],
)
def test_pattern_to_postgres_refuses(pattern: str) -> None:
    with pytest.raises(ConfigError):
        pattern_to_postgres(pattern)
    with pytest.raises(ConfigError):
        compile_application_name_pattern(pattern)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("req:abc123", "abc123"),
        ("svc req:a.b:c-d_e rest", "a.b:c-d_e"),
        ("req:", None),
        ("psql", None),
        ("", None),
        (None, None),
    ],
)
def test_request_id_from_application_name(name: str | None, expected: str | None) -> None:
    assert request_id_from_application_name(name, DEFAULT_APPLICATION_NAME_PATTERN) == expected
    assert request_id_from_application_name(name, re.compile(DEFAULT_APPLICATION_NAME_PATTERN)) == expected


def test_request_id_group_choice() -> None:
    assert request_id_from_application_name("a1b2", r"a(\d)b(?P<id>\d)") == "2"
    assert request_id_from_application_name("a1b2", r"a(\d)b(\d)") == "1"
    assert request_id_from_application_name("a1b2", r"b\d") == "b2"


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        (DEFAULT_APPLICATION_NAME_PATTERN, "req:"),
        (r"(a|b)req:(?P<id>x)", "req:"),
        (r"^(?:pre|word) req:(?P<id>[a-z]+)", " req:"),
        (r"x?job=(\d+)", "job="),
        (r"(?i)req:(?P<id>\w+)", None),
        (r"a|b", None),
        (r"(?P<id>\d+)", None),
    ],
)
def test_required_literal(pattern: str, literal: str | None) -> None:
    assert required_literal(pattern) == literal
    if literal is not None:  # sound: every match contains it
        for name in ("req:1", "xjob=2", "pre req:a", "areq:x", "none"):
            if re.search(pattern, name):
                assert literal in name
