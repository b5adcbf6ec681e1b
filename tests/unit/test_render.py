"""cdc.render: layout of history for people, exports for machines (no database)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from cdc.query import BlameEntry, Mutation, RequestError, RequestRecord, TransactionInfo
from cdc.query.model import attribution
from cdc.render import (
    MUTATION_CSV_FIELDS,
    align,
    blame_lines,
    csv_text,
    describe_mutation,
    format_time,
    format_value,
    history_lines,
    key_text,
    mutations_csv,
    mutations_json,
    request_lines,
    row_lines,
    short_request,
    short_table,
    shorten,
    unattributed_text,
    why_lines,
)
from cdc.store.format import TxnFlag

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def mutation(
    op: str,
    *,
    key: dict[str, Any] | None = None,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    changed: tuple[str, ...] = (),
    status: str = "committed",
    request_id: str | None = None,
    minutes: int = 0,
    table: str = "public.users",
    old_key: dict[str, Any] | None = None,
    position: int = 0x1_0000_0100,
) -> Mutation:
    return Mutation(
        position=position,
        ordinal=0,
        version=position if status == "committed" else None,
        lsn=position - 8,
        xid=700,
        committed_at=T0 + timedelta(minutes=minutes),
        table=table,
        op=op,
        key=key if key is not None or op == "TRUNCATE" else {"id": 42},
        old_key=old_key,
        before=before,
        after=after,
        changed=changed,
        status=status,
        request_id=request_id,
        context={"actor": "alice", "extra": {"k": "v"}} if request_id else None,
    )


SEED = [
    mutation(
        "INSERT",
        after={"id": 42, "email": "a@b.com", "name": None, "plan": "free"},
        request_id="1a2b3c4d-0000",
    ),
    mutation(
        "UPDATE",
        before={"id": 42, "email": "a@b.com", "name": None, "plan": "free"},
        after={"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": "free"},
        changed=("name",),
        request_id="a3c91ef0-0000",
        minutes=141,
    ),
    mutation(
        "UPDATE",
        before={"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": "free"},
        after={"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": "pro"},
        changed=("plan",),
        request_id="4f9a3b2c-0000",
        minutes=142,
    ),
    mutation(
        "UPDATE",
        before={"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": "pro"},
        after={"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": None},
        changed=("plan",),
        status="rolled_back",
        request_id="550e8400-e29b-41d4-a716-446655440000",
        minutes=142,
    ),
]


#: What Store.request_prefixes gives for the seed's ids (unique after 8 characters).
SEED_PREFIXES = {m.request_id: m.request_id[:8] for m in SEED if m.request_id}


def test_history_lines_match_the_seed_layout() -> None:
    assert history_lines("public.users", {"id": 42}, SEED, utc=True, prefixes=SEED_PREFIXES) == [
        "  public.users id=42  (4 mutations)",
        "",
        "  2026-03-10 12:00  INSERT  email=a@b.com, plan=free        req:1a2b3c4d",
        "  2026-03-10 14:21  UPDATE  name: null → Alice Smith        req:a3c91ef0",
        "  2026-03-10 14:22  UPDATE  plan: free → pro                req:4f9a3b2c",
        "  2026-03-10 14:22  UPDATE  plan: pro → null  (rolled back) req:550e8400",
    ]


def test_history_lines_without_rollbacks_keep_two_spaces() -> None:
    lines = history_lines("public.users", {"id": 42}, SEED[:2], utc=True, prefixes=SEED_PREFIXES)
    assert lines[2] == "  2026-03-10 12:00  INSERT  email=a@b.com, plan=free  req:1a2b3c4d"
    # without the prefixes the store found, ids are shown whole
    whole = history_lines("public.users", {"id": 42}, SEED, utc=True)
    assert whole[-1].endswith("req:550e8400-e29b-41d4-a716-446655440000")
    assert history_lines("public.users", {"id": 1}, [], utc=True) == ["  public.users id=1  (0 mutations)"]
    assert "(1 mutation)" in history_lines("public.users", {"id": 42}, SEED[:1], utc=True)[0]


def test_describe_each_op() -> None:
    delete = mutation("DELETE", before={"id": 42, "email": "a@b.com", "plan": None})
    assert describe_mutation(delete) == "email=a@b.com"
    assert describe_mutation(delete, with_op=True) == "DELETE email=a@b.com"
    assert describe_mutation(mutation("TRUNCATE", key=None)) == "all rows"
    snapshot = mutation("SNAPSHOT", after={"id": 1, "v": "x"}, key={"id": 1})
    assert describe_mutation(snapshot, with_op=True) == "SNAPSHOT v=x"
    # a row of key columns only (or a keyless table) shows every column
    keyless = mutation("INSERT", key={"a": 1, "b": "x"}, after={"a": 1, "b": "x"})
    assert describe_mutation(keyless) == "a=1, b=x"
    moved = mutation(
        "UPDATE",
        key={"id": 43},
        old_key={"id": 42},
        before={"id": 42, "v": "a"},
        after={"id": 43, "v": "a"},
        changed=("id",),
    )
    assert describe_mutation(moved) == "id: 42 → 43"
    noop = mutation("UPDATE", before={"id": 1}, after={"id": 1}, key={"id": 1})
    assert describe_mutation(noop) == "(no change)"
    wide = mutation("UPDATE", before={"id": 1, "t": "x" * 100}, after={"id": 1, "t": "y"}, changed=("t",))
    assert describe_mutation(wide) == f"t: {'x' * 39}… → y"


def test_request_lines_match_the_seed_layout() -> None:
    failed = SEED[3]
    order = mutation(
        "UPDATE",
        table="public.orders",
        key={"id": "81b2"},
        before={"id": "81b2", "status": "pending"},
        after={"id": "81b2", "status": None},
        changed=("status",),
        status="rolled_back",
    )
    assert request_lines([failed, order]) == [
        "  users    id=42   plan: pro → null  (rolled back)",
        "  orders   id=81b2 status: pending → null  (rolled back)",
    ]


def test_attempts_capture_could_not_show_whole_say_so() -> None:
    """MAYBE_INCOMPLETE (docs/store.md "Transaction flags"): each such attempt is marked, the
    lists end with the note, `cdc why` has it as NOTE, the exports as a field."""
    behind = replace(SEED[3], txn_flags=TxnFlag.STREAMED | TxnFlag.MAYBE_INCOMPLETE)
    assert behind.possibly_incomplete and not SEED[3].possibly_incomplete
    assert behind.incomplete_note == "capture was behind; some attempted changes may be missing"
    assert SEED[3].incomplete_note is None
    lines = history_lines("public.users", {"id": 42}, [*SEED[:3], behind], utc=True, prefixes=SEED_PREFIXES)
    assert lines[-3:] == [
        "  2026-03-10 14:22  UPDATE  plan: pro → null  (rolled back; attempt possibly incomplete) req:550e8400",
        "",
        "  note: capture was behind; some attempted changes may be missing (req:550e8400)",
    ]
    assert request_lines([behind])[-1] == (
        "  note: capture was behind; some attempted changes may be missing (req:550e8400-e29b-41d4-a716-446655440000)"
    )
    assert not any("note" in line for line in history_lines("public.users", {"id": 42}, SEED, utc=True))
    [exported] = json.loads(mutations_json([behind]))
    assert exported["possibly_incomplete"] is True
    [row] = csv.DictReader(io.StringIO(mutations_csv([behind])))
    assert row["possibly_incomplete"] == "true"
    record = RequestRecord(
        request_id="r1",
        actor=None,
        context=None,
        first_seen_at=T0,
        last_seen_at=T0,
        committed_count=0,
        rolled_back_count=1,
        error_type=None,
        error_message=None,
        error_location=None,
        error_at=None,
        transactions=[
            TransactionInfo(
                0x1_0000_0500, 901, None, None, "rolled_back", T0, None, 1, possibly_incomplete=True
            )
        ],
        mutations=[behind],
        mutation_count=1,
    )
    lines = why_lines(record, utc=True)
    assert "  NOTE         capture was behind; some attempted changes may be missing" in lines
    assert (
        "  TRANSACTION  xid 901  rolled back at 1/500  2026-03-10 12:00  1 change  (possibly incomplete)"
        in lines
    )
    assert (
        lines[-1]
        == "  DATA CHANGES users.id=42  plan: pro → null  (rolled back; attempt possibly incomplete)"
    )
    data = record.to_json()
    assert data["possibly_incomplete"] is True and data["incomplete_note"] == behind.incomplete_note
    assert data["mutations"][0]["possibly_incomplete"] is True


def test_blame_lines() -> None:
    entries = [
        BlameEntry("email", "a@b.com", "1a2b3c4d-x", T0, 1, "INSERT"),
        BlameEntry("name", "Alice", "a3c91ef0-x", T0 + timedelta(minutes=141), 2, "UPDATE"),
        BlameEntry(
            "plan",
            "pro",
            "4f9a3b2c-x",
            T0 + timedelta(minutes=142),
            3,
            "UPDATE",
            rolled_back_request_id="550e8400-x",
            rolled_back_at=T0,
            rolled_back=True,
        ),
        BlameEntry("legacy", None, None, None, None, None),
    ]
    prefixes = {i: i[:8] for i in ("1a2b3c4d-x", "a3c91ef0-x", "4f9a3b2c-x", "550e8400-x")}
    assert blame_lines(entries, utc=True, prefixes=prefixes) == [
        "  email    a@b.com   req:1a2b3c4d  2026-03-10 12:00",
        "  name     Alice     req:a3c91ef0  2026-03-10 14:21",
        "  plan     pro       req:4f9a3b2c  2026-03-10 14:22  ✗ rolled back req:550e8400",
        "  legacy   null      req:-         (before history)",
    ]


def test_why_lines() -> None:
    record = RequestRecord(
        request_id="550e8400-e29b-41d4-a716-446655440000",
        actor="alice@example.com",
        context={
            "application_name": "checkout",
            "db_user": "app",
            "client_addr": "10.0.0.5",
            "backend_pid": 4242,
        },
        first_seen_at=T0,
        last_seen_at=T0,
        committed_count=0,
        rolled_back_count=1,
        error_type="TimeoutError",
        error_message="Stripe API timeout after 10s",
        error_location="payments/create.ts:42",
        error_at=T0,
        transactions=[TransactionInfo(0x1_0000_0500, 901, None, None, "rolled_back", T0, None, 1)],
        mutations=[SEED[3]],
        mutation_count=1,
        errors=[
            RequestError(
                "TimeoutError",
                "Stripe API timeout after 10s",
                "payments/create.ts:42",
                T0,
                "app",
                4242,
                attribution("app", 4242, False, (("app", 4242),)),
            )
        ],
        sessions=(("app", 4242),),
    )
    assert why_lines(record, utc=True) == [
        "  REQUEST      550e8400-e29b-41d4-a716-446655440000",
        "  ACTOR        alice@example.com",
        "  OUTCOME      rolled back",
        "  ROOT CAUSE   TimeoutError: Stripe API timeout after 10s",
        "  REPORTED BY  db_user app, pid 4242",
        "  LOCATION     payments/create.ts:42",
        "  CONTEXT      app=checkout, db user=app, client=10.0.0.5, pid=4242",
        "  WHEN         2026-03-10 12:00",
        "  TRANSACTION  xid 901  rolled back at 1/500  2026-03-10 12:00  1 change",
        "  DATA CHANGES users.id=42  plan: pro → null  (rolled back)",
    ]
    assert record.error_attributed and record.to_json()["error"]["attribution"] == "own_session"
    # Reported by a session that never wrote this request's context: never shown as its cause.
    [error] = record.errors
    mallory = replace(error, db_user="mallory", backend_pid=666, attribution="other_session")
    forged = replace(
        record, error_type=None, error_message=None, error_location=None, error_at=None, errors=[mallory]
    )
    lines = why_lines(forged, utc=True)
    assert (
        "  ROOT CAUSE   unknown (no error of this request's sessions was reported for this request)" in lines
    )
    assert (
        "  ERROR        TimeoutError: Stripe API timeout after 10s  "
        "(reported by another session (db_user mallory, pid 666): not attributed)"
    ) in lines
    assert not any("REPORTED BY" in line for line in lines)
    assert forged.to_json()["error"]["attributed"] is False and not forged.error_attributed
    assert forged.to_json()["error"]["reported_by"]["db_user"] == "mallory"
    # The attribution rules (docs/security.md "Request attribution").
    sessions = (("app", 4242),)
    assert attribution("app", 4242, False, sessions) == "own_session"
    assert attribution("mallory", 666, False, sessions) == "other_session"
    assert attribution("app", 4243, False, sessions) == "other_session"  # same user, another session
    assert attribution(None, None, False, sessions) == "unverified"
    assert attribution("app", 1, False, ()) == "no_captured_session"
    # The client helper's report carries its session's proof: its own even with no captured context.
    assert attribution("app", 1, True, ()) == "own_session"
    proven = replace(error, backend_pid=1, attribution="own_session", proven=True)
    assert proven.attributed and proven.to_json()["reported_by"]["proven"] is True
    legacy = replace(error, db_user=None, backend_pid=None, attribution="unverified")
    assert unattributed_text(legacy) == "unverified (recorded before messages were signed): not attributed"
    many = RequestRecord(
        request_id="r1",
        actor=None,
        context=None,
        first_seen_at=None,
        last_seen_at=None,
        committed_count=1,
        rolled_back_count=1,
        error_type=None,
        error_message=None,
        error_location=None,
        error_at=None,
        mutations=SEED[:2],
        mutation_count=5,
    )
    lines = why_lines(many, utc=True, max_changes=2)
    assert "  OUTCOME      committed, 1 attempt rolled back" in lines
    assert lines[-1] == "               … and 3 more (cdc state history --request r1)"
    assert lines[-3].startswith("  DATA CHANGES users.id=42  INSERT email=a@b.com")


def test_why_lines_show_the_trace() -> None:
    trace, span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    record = RequestRecord(
        request_id="r1",
        actor=None,
        context={"db_user": "app", "backend_pid": 7, "trace_id": trace, "span_id": span},
        first_seen_at=None,
        last_seen_at=None,
        committed_count=1,
        rolled_back_count=0,
        error_type=None,
        error_message=None,
        error_location=None,
        error_at=None,
        traces=((trace, span), ("0af7651916cd43dd8448eb211c80319c", None)),
    )
    lines = why_lines(record, utc=True)
    assert "  CONTEXT      db user=app, pid=7" in lines  # the trace has lines of its own
    assert f"  TRACE        {trace}  span {span}" in lines
    assert "  TRACE        0af7651916cd43dd8448eb211c80319c  span -" in lines
    data = record.to_json()
    assert (data["trace_id"], data["span_id"]) == (trace, span)
    assert data["traces"][1] == {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": None}
    assert replace(record, traces=()).to_json()["trace_id"] is None
    assert not any("TRACE" in line for line in why_lines(replace(record, traces=()), utc=True))


def test_values_times_and_helpers() -> None:
    assert format_value(None) == "null"
    assert format_value(True) == "true"
    assert format_value(12) == "12"
    assert format_value("12.50") == "12.50"
    assert format_value({"a": [1, "x"]}) == '{"a":[1,"x"]}'
    assert format_value("two\nlines") == "two\\nlines"
    assert shorten("x" * 41) == "x" * 39 + "…"
    assert shorten("x" * 40) == "x" * 40
    assert key_text({"a": 1, "b": "x"}) == "a=1,b=x"
    assert key_text(None) == "(all rows)"
    assert short_table("public.users") == "users" and short_table("s.t") == "s.t"
    assert short_table('public."User"') == '"User"' and short_table('"a.b".c') == '"a.b".c'
    assert short_table("public.user") == '"user"'  # a keyword alone needs its quotes
    assert short_table("(table 7)") == "(table 7)"
    marker = {"$cdc": "oversize", "bytes": 70_000_000, "sha256": "ab" * 32}
    assert format_value(marker) == "(oversize value: 70000000 bytes, sha256 abababababab…)"
    assert short_request("550e8400-e29b") == "req:550e8400-e29b" and short_request(None) == "req:-"
    assert short_request("550e8400-e29b", {"550e8400-e29b": "550e8400"}) == "req:550e8400"
    assert format_time(T0, utc=True) == "2026-03-10 12:00"
    assert format_time(T0, utc=True, seconds=True) == "2026-03-10 12:00:00"
    assert format_time(None) == "-"
    assert row_lines({"id": 42, "email": "a@b.com"}) == ["  id     42", "  email  a@b.com"]
    assert align([["a", "bb", "c"], ["aaa", "b"]], gaps=(1, 1)) == ["  a   bb c", "  aaa b"]


def test_local_time_follows_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert format_time(T0) == "2026-03-10 17:30"
        assert json.loads(mutations_json(SEED[:1]))[0]["committed_at"] == "2026-03-10T17:30:00+05:30"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_json_export_round_trips() -> None:
    data = json.loads(mutations_json(SEED, utc=True))
    assert [set(d) for d in data] == [set(MUTATION_CSV_FIELDS)] * 4
    assert data[0] == {
        "version": 0x1_0000_0100,
        "version_lsn": "1/100",
        "lsn": 0x1_0000_00F8,
        "lsn_text": "1/F8",
        "xid": 700,
        "committed_at": "2026-03-10T12:00:00+00:00",
        "table": "public.users",
        "key": {"id": 42},
        "op": "INSERT",
        "before": None,
        "after": {"id": 42, "email": "a@b.com", "name": None, "plan": "free"},
        "changed": [],
        "request_id": "1a2b3c4d-0000",
        "context": {"actor": "alice", "extra": {"k": "v"}},
        "status": "committed",
        "possibly_incomplete": False,
    }
    assert data[3]["version"] is None and data[3]["status"] == "rolled_back"
    assert datetime.fromisoformat(data[1]["committed_at"]) == T0 + timedelta(minutes=141)


def test_csv_export_round_trips() -> None:
    text = mutations_csv(SEED, utc=True)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 and list(rows[0]) == list(MUTATION_CSV_FIELDS)
    expected = json.loads(mutations_json(SEED, utc=True))
    for row, want in zip(rows, expected, strict=True):
        for name in ("key", "before", "after", "changed", "context"):
            assert json.loads(row[name]) == want[name]
        assert row["version"] == ("" if want["version"] is None else str(want["version"]))
        assert int(row["lsn"]) == want["lsn"]
        assert row["committed_at"] == want["committed_at"]
        assert row["request_id"] == want["request_id"]
    awkward = csv_text(["a", "b"], [{"a": 'x,"y"\nz', "b": None}])
    assert list(csv.DictReader(io.StringIO(awkward))) == [{"a": 'x,"y"\nz', "b": ""}]


def test_times_in_other_zones() -> None:
    plus2 = datetime(2026, 3, 10, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(plus2, utc=True) == "2026-03-10 12:00"
