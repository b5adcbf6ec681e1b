"""cdc.context: the wire format of the context and error messages, and the pattern translation."""

from __future__ import annotations

import contextlib
import hashlib
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
    ContextKeys,
    ContextVerifier,
    MessageRejectedError,
    ReportedError,
    RequestContext,
    compile_application_name_pattern,
    context_fingerprint,
    context_key_id,
    key_from_pad,
    key_pads,
    parse_context,
    parse_error,
    pattern_to_postgres,
    request_id_from_application_name,
    required_literal,
    sign_content,
    truncate_utf8,
    validate_setting_name,
    verify_content,
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
XID = 730
GOOD_ERROR: dict[str, Any] = {
    "request_id": "550e8400",
    "xid": 123456,
    "error_type": "PaymentTimeout",
    "message": "Stripe API timeout after 10s",
    "location": "payments/create.py:42",
    "actor": "billing",
    "at": "2026-03-10T14:22:00.123456+00:00",
    "db_user": "app",
    "backend_pid": 4242,
    "client_addr": "10.0.0.7",
    "reporter_pid": None,
}
KEY = bytes(range(32))
KEYS = ContextKeys(KEY, context_key_id(KEY))
OTHER_KEY = b"another key, 32 bytes long......"

# Recorded on PostgreSQL 15 (cdc.emit_context through the trigger, and cdc.report_error) with
# cdc.context_key holding KEY: the SQL signer and the Python verifier must agree byte for byte.
RECORDED_CONTEXT = (
    b'{"request_id":"550e8400","actor":"billing","application_name":"web-1","db_user":"postgres",'
    b'"client_addr":"127.0.0.1","backend_pid":30632,"source":"setting","extra":{"tenant" : "acme"},'
    b'"xid":730,"mac":"a188af4a0708131e3e62397dcdffd32563f34292b25f06b3659502aa6df67cfb"}'
)
RECORDED_ERROR = (
    b'{"request_id":"550e8400","error_type":"PaymentTimeout","message":"Stripe API timeout after 10s",'
    b'"location":"payments/create.py:42","actor":"billing","at":"2026-12-07T20:45:40.231306+00:00",'
    b'"db_user":"postgres","client_addr":"127.0.0.1","backend_pid":30632,"xid":730,"reporter_pid":null,'
    b'"mac":"f3bda3a0c91c16483b1ce1a618121ec32857336114a3f45d7f6fe83d37e4f7d4"}'
)


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def signed(prefix: str, obj: Any, key: bytes = KEY) -> bytes:
    body = obj if isinstance(obj, bytes) else encode(obj)
    return sign_content(prefix, body, key)


def ctx_content(obj: dict[str, Any], key: bytes = KEY) -> bytes:
    return signed(CONTEXT_PREFIX, {**obj, "xid": obj.get("xid", XID)}, key)


def test_prefixes() -> None:
    assert (CONTEXT_PREFIX, ERROR_PREFIX, HEARTBEAT_PREFIX) == ("cdc.context", "cdc.error", "cdc.heartbeat")


# ============================================================================ verification


def test_recorded_messages_verify() -> None:
    ctx = parse_context(RECORDED_CONTEXT, KEYS, xid=XID)
    assert (ctx.request_id, ctx.actor, ctx.db_user, ctx.backend_pid, ctx.source, dict(ctx.extra)) == (
        "550e8400",
        "billing",
        "postgres",
        30632,
        "setting",
        {"tenant": "acme"},
    )
    err = parse_error(RECORDED_ERROR, KEYS)
    assert (err.request_id, err.db_user, err.backend_pid, err.xid, err.reporter_pid) == (
        "550e8400",
        "postgres",
        30632,
        730,
        None,
    )
    assert err.at.tzinfo is UTC


def _reason(parse: Any) -> str:
    with pytest.raises(MessageRejectedError) as caught:
        parse()
    return caught.value.reason


def test_forged_and_tampered_messages_are_rejected() -> None:
    # The attack: a raw pg_logical_emit_message claiming another user: no MAC at all.
    forged = encode({**GOOD_CONTEXT, "db_user": "admin", "xid": XID})
    assert _reason(lambda: parse_context(forged, KEYS, xid=XID)) == "unsigned"
    # A MAC that is not ours (any key but the source's), or a signed body changed by one byte.
    assert _reason(lambda: parse_context(ctx_content(GOOD_CONTEXT, OTHER_KEY), KEYS, xid=XID)) == "bad_mac"
    tampered = RECORDED_CONTEXT.replace(b'"db_user":"postgres"', b'"db_user":"postgrex"')
    assert _reason(lambda: parse_context(tampered, KEYS, xid=XID)) == "bad_mac"
    tampered = RECORDED_ERROR.replace(b'"backend_pid":30632', b'"backend_pid":30633')
    assert _reason(lambda: parse_error(tampered, KEYS)) == "bad_mac"
    # A body signed as one kind is not valid as the other (the prefix is signed too).
    as_error = sign_content(ERROR_PREFIX, RECORDED_CONTEXT[:-74] + b"}", KEY)
    assert _reason(lambda: parse_context(as_error, KEYS, xid=XID)) == "bad_mac"
    # A signed context copied into another transaction (replayed from the WAL).
    assert _reason(lambda: parse_context(RECORDED_CONTEXT, KEYS, xid=XID + 1)) == "other_transaction"
    assert _reason(lambda: parse_context(RECORDED_CONTEXT, None, xid=XID)) == "no_key"
    assert _reason(lambda: parse_context(b'{"mac":"' + b"0" * 64 + b'"}', KEYS)) == "unsigned"
    bad_hex = RECORDED_CONTEXT[:-66] + b"Z" * 64 + b'"}'
    assert _reason(lambda: parse_context(bad_hex, KEYS, xid=XID)) == "unsigned"


def test_previous_key_still_verifies_after_a_rotation() -> None:
    rotated = ContextKeys(OTHER_KEY, context_key_id(OTHER_KEY), previous=KEY, previous_key_id=KEYS.key_id)
    assert parse_context(RECORDED_CONTEXT, rotated, xid=XID).request_id == "550e8400"
    assert parse_context(ctx_content(GOOD_CONTEXT, OTHER_KEY), rotated, xid=XID).db_user == "app"
    assert "key" not in repr(rotated).replace("key_id", "")  # never the key itself


def test_key_pads_match_hmac() -> None:
    ipad, opad = key_pads(KEY)
    assert len(ipad) == len(opad) == 64 and key_from_pad(ipad).rstrip(b"\0") == KEY
    body = b'{"a":1}'
    inner = hashlib.sha256(ipad + b"cdc.context\0" + body).digest()
    mac = hashlib.sha256(opad + inner).hexdigest()
    assert sign_content(CONTEXT_PREFIX, body, KEY) == b'{"a":1,"mac":"' + mac.encode() + b'"}'
    assert (
        verify_content(CONTEXT_PREFIX, sign_content(CONTEXT_PREFIX, body, key_from_pad(ipad)), KEYS) == body
    )


def test_verifier_refuses_reports_once_per_lsn_and_reloads_a_rotated_key() -> None:
    rejected: list[tuple[str, int, str]] = []
    now = [100.0]
    current = [KEYS]
    loads = [0]

    def load() -> ContextKeys:
        loads[0] += 1
        return current[0]

    verifier = ContextVerifier(load, on_reject=lambda *a: rejected.append(a), clock=lambda: now[0])
    assert verifier.context(RECORDED_CONTEXT, 10, XID) is not None
    forged = encode({**GOOD_CONTEXT, "xid": XID})
    for _ in range(3):  # the same message read again (a reconnect) is reported once
        assert verifier.context(forged, 20, XID) is None
    assert verifier.error(encode(GOOD_ERROR), 30) is None
    assert rejected == [("cdc.context", 20, "unsigned"), ("cdc.error", 30, "unsigned")]
    # A key rotated while the daemon runs: the first message signed with it reloads the keys.
    current[0] = ContextKeys(OTHER_KEY, context_key_id(OTHER_KEY), previous=KEY, previous_key_id=KEYS.key_id)
    now[0] += 5
    before = loads[0]
    assert verifier.context(ctx_content(GOOD_CONTEXT, OTHER_KEY), 40, XID) is not None
    assert loads[0] == before + 1
    # Forged MACs: a short burst of reloads, then at most one a second.
    for lsn in range(50, 60):
        assert verifier.context(ctx_content(GOOD_CONTEXT, b"x" * 32), lsn, XID) is None
    assert loads[0] <= before + 1 + int(ContextVerifier.RELOAD_BURST)
    burst = loads[0]
    now[0] += 1.0
    for lsn in range(60, 70):
        assert verifier.context(ctx_content(GOOD_CONTEXT, b"x" * 32), lsn, XID) is None
    assert loads[0] == burst + 1
    assert [r[2] for r in rejected[2:]] == ["bad_mac"] * 20


# ============================================================================ parse_context


def test_parse_context_roundtrip() -> None:
    ctx = parse_context(ctx_content(GOOD_CONTEXT), KEYS, xid=XID)
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
    assert parse_context(sign_content(CONTEXT_PREFIX, ctx.to_content().encode(), KEY), KEYS) == ctx
    with pytest.raises(TypeError):
        ctx.extra["x"] = "y"  # type: ignore[index]  # frozen all the way down


def test_parse_context_trigger_output() -> None:
    # row_to_json() with the extra object as json_build_object() writes it: spaces, nulls
    content = signed(
        CONTEXT_PREFIX,
        b'{"request_id":null,"actor":null,"application_name":"psql","db_user":"postgres",'
        b'"client_addr":null,"backend_pid":77,"source":"none","extra":{"tenant" : null},"xid":730}',
    )
    ctx = parse_context(content, KEYS, xid=730)
    assert (ctx.request_id, ctx.source, ctx.extra, ctx.client_addr) == (None, "none", {}, None)
    assert not ctx.session_level and "session_level" not in ctx.as_json()
    # a request id carried over from an earlier transaction (sql/context.sql, "SET or SET LOCAL?")
    for flag, expected in ((b"true", True), (b"false", False), (b"null", False)):
        content = signed(
            CONTEXT_PREFIX,
            b'{"request_id":"r","actor":null,"application_name":"psql","db_user":"postgres","client_addr":null,'
            b'"backend_pid":77,"source":"setting","extra":{},"xid":731,"session_level":' + flag + b"}",
        )
        ctx = parse_context(content, KEYS, xid=731)
        assert ctx.session_level is expected
        assert ctx.as_json().get("session_level") is (True if expected else None)
        assert parse_context(sign_content(CONTEXT_PREFIX, ctx.to_content().encode(), KEY), KEYS) == ctx


def test_parse_context_is_lenient_where_it_can_be() -> None:
    minimal = {"db_user": "u", "backend_pid": 1, "source": "none", "future_field": [1, 2]}
    ctx = parse_context(ctx_content(minimal), KEYS)
    assert (ctx.request_id, ctx.actor, ctx.extra) == (None, None, {})
    many = {f"k{i:03}": str(i) for i in range(200)}
    odd = {"n": 3, "b": True, "f": 1.5, "nested": {"a": [1]}, "null": None}
    ctx = parse_context(ctx_content({**GOOD_CONTEXT, "extra": many}), KEYS)
    assert len(ctx.extra) == MAX_EXTRA_KEYS
    ctx = parse_context(ctx_content({**GOOD_CONTEXT, "extra": odd}), KEYS)
    assert dict(ctx.extra) == {"n": "3", "b": "true", "f": "1.5", "nested": '{"a":[1]}'}
    ctx = parse_context(
        ctx_content({**GOOD_CONTEXT, "request_id": "r" * 1000, "extra": {"t": "v" * 5000}}), KEYS
    )
    assert ctx.request_id is not None and len(ctx.request_id) == 256
    assert len(ctx.extra["t"]) == 1024


def _sign_if_object(prefix: str, content: bytes) -> bytes:
    """Sign what can carry a MAC, so the parser itself is tested; the rest fails unsigned."""
    if (
        content.startswith(b"{")
        and content.endswith(b"}")
        and content.strip(b"{} ")
        and len(content) < 1 << 20
    ):
        return sign_content(prefix, content, KEY)
    return content


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
        b'{"db_user": "u", "backend_pid": 1, "source": "setting", "session_level": "yes"}',
        b'{"db_user": "u", "backend_pid": 1, "source": "setting", "session_level": 1}',
        b'{"db_user": "u", "backend_pid": 1, "source": "none", "request_id": "\\ud800"}',
        b'{"db_user": "u", "backend_pid": NaN, "source": "none"}',
        b"[" * 100_000,
        b"{" + b" " * (2 << 20) + b"}",
    ],
)
def test_parse_context_malformed(content: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_context(_sign_if_object(CONTEXT_PREFIX, content), KEYS)


# ============================================================================ parse_error


def test_parse_error_roundtrip() -> None:
    err = parse_error(signed(ERROR_PREFIX, GOOD_ERROR), KEYS)
    assert err == ReportedError(
        request_id="550e8400",
        xid=123456,
        error_type="PaymentTimeout",
        message="Stripe API timeout after 10s",
        location="payments/create.py:42",
        actor="billing",
        at=datetime(2026, 3, 10, 14, 22, 0, 123456, tzinfo=UTC),
        db_user="app",
        backend_pid=4242,
        client_addr="10.0.0.7",
    )
    assert err.as_json() == GOOD_ERROR
    assert parse_error(signed(ERROR_PREFIX, err.to_content().encode()), KEYS) == err


def test_parse_error_details() -> None:
    big = (1 << 32) + 77  # an epoch-qualified xid
    err = parse_error(
        signed(
            ERROR_PREFIX, {**GOOD_ERROR, "xid": big, "at": "2026-03-10T16:22:00+02:00", "message": "é" * 5000}
        ),
        KEYS,
    )
    assert err.xid32 == 77
    assert err.at == datetime(2026, 3, 10, 14, 22, tzinfo=UTC)
    assert len(err.message.encode()) <= MAX_MESSAGE_BYTES and err.message.endswith("…")
    naive = parse_error(
        signed(ERROR_PREFIX, {**GOOD_ERROR, "at": "2026-03-10T14:22:00", "xid": None, "location": None}), KEYS
    )
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
        {"db_user": None},
        {"backend_pid": None},
    ],
)
def test_parse_error_malformed(change: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_error(signed(ERROR_PREFIX, {**GOOD_ERROR, **change}), KEYS)
    with pytest.raises(ProtocolError):
        parse_error(b"{", KEYS)


# ============================================================================ fuzzing: ProtocolError and nothing else

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _only_protocol_errors(content: bytes) -> None:
    for prefix, parse in ((CONTEXT_PREFIX, parse_context), (ERROR_PREFIX, parse_error)):
        for attempt in (content, _sign_if_object(prefix, content)):
            with contextlib.suppress(ProtocolError):
                parse(attempt, KEYS)


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
