"""cdc.query.Store against a real store written by tests/store_builder.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc.devdb import LocalPostgres
from cdc.errors import AmbiguousRequestError, NotFoundError, StoreUnavailableError, UsageError
from cdc.query import Store, key_from_text
from tests.store_builder import (
    INT4,
    INT8,
    REQ_FAILED,
    REQ_PLAN,
    TEXT,
    StoreBuilder,
    at,
    build_seed_000,
)


@pytest.fixture(scope="module")
def database(pg: LocalPostgres) -> Iterator[Any]:
    """A factory of fresh databases, dropped at the end of the module."""
    names: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:8]}"
        names.append(name)
        return pg.create_database(name)

    yield make
    for name in names:
        pg.drop_database(name)


@pytest.fixture(scope="module")
def seed(database: Any) -> Iterator[StoreBuilder]:
    b = StoreBuilder(database())
    build_seed_000(b)
    b.finish(baseline=0x1_0000_0000)
    yield b
    b.close()


@pytest.fixture
def store(seed: StoreBuilder) -> Iterator[Store]:
    with Store(seed.dsn) as s:
        yield s


# ============================================================================ row history, blame, requests


def test_row_history_of_the_seed_row(store: Store) -> None:
    history = store.row_history("users", 42)
    assert [(m.op, m.status, m.request_id[:8] if m.request_id else None) for m in history] == [
        ("INSERT", "committed", "1a2b3c4d"),
        ("UPDATE", "committed", "a3c91ef0"),
        ("UPDATE", "committed", "4f9a3b2c"),
        ("UPDATE", "rolled_back", "550e8400"),
    ]
    first = history[0]
    assert first.table == "public.users"
    assert first.key == {"id": 42}
    assert first.before is None
    assert list(first.after or {}) == ["id", "email", "name", "plan"]  # table order, not jsonb order
    assert history[-1].version is None and history[-1].changed == ("plan",)
    assert [m.version for m in history[:3]] == sorted(m.version or 0 for m in history[:3])
    committed = store.row_history("users", 42, include_rolled_back=False)
    assert len(committed) == 3
    window = store.row_history(
        "public.users", "42", since=at("2026-03-10 14:00"), until=at("2026-03-10 14:22")
    )
    assert [m.request_id for m in window] == ["a3c91ef0-2222-4222-8222-222222222222"]
    assert store.row_history("users", 42, since=at("2030-01-01 00:00")) == []


def test_blame_reports_last_committed_write_and_later_rollback(store: Store) -> None:
    entries = {e.column: e for e in store.blame("users", 42)}
    assert list(entries) == ["email", "name", "plan"]
    assert entries["email"].value == "a@b.com" and entries["email"].op == "INSERT"
    assert entries["name"].value == "Alice Smith" and (entries["name"].request_id or "").startswith(
        "a3c91ef0"
    )
    plan = entries["plan"]
    assert plan.value == "pro" and plan.request_id == REQ_PLAN
    assert plan.rolled_back and plan.rolled_back_request_id == REQ_FAILED
    assert not entries["email"].rolled_back


def test_request_exact_prefix_and_record(store: Store) -> None:
    assert store.resolve_request(REQ_FAILED) == REQ_FAILED
    assert store.resolve_request("550e8400") == REQ_FAILED
    record = store.request("550e")
    assert record.request_id == REQ_FAILED
    assert record.outcome == "rolled_back"
    assert record.error_type == "TimeoutError" and record.error_location == "payments/create.ts:42"
    assert [(m.table, m.op) for m in record.mutations] == [
        ("public.users", "UPDATE"),
        ("public.orders", "UPDATE"),
    ]
    assert record.mutation_count == 2
    assert [t.status for t in record.transactions] == ["rolled_back"]
    assert record.actor == "alice@example.com"
    assert store.request(REQ_PLAN).outcome == "committed"


def test_request_prefix_ambiguous_and_unknown(seed: StoreBuilder, store: Store) -> None:
    seed.table("things", {"id": INT8, "v": TEXT})
    with seed.txn("2026-03-11 10:00", "abcd1234-aaaa") as t:
        t.insert("things", {"id": 1, "v": "a"})
    with seed.txn("2026-03-11 10:01", "abcd1299-bbbb") as t:
        t.insert("things", {"id": 2, "v": "b"})
    seed.finish(baseline=0x1_0000_0000)
    with pytest.raises(UsageError, match=r"ambiguous.*abcd1234-aaaa.*abcd1299-bbbb") as excinfo:
        store.resolve_request("abcd12")
    assert not isinstance(excinfo.value, NotFoundError)
    assert isinstance(excinfo.value, AmbiguousRequestError)
    assert excinfo.value.matches == ["abcd1234-aaaa", "abcd1299-bbbb"] and not excinfo.value.more
    assert store.resolve_request("abcd1234") == "abcd1234-aaaa"
    with pytest.raises(NotFoundError, match="no request 'ffff'"):
        store.request("ffff")
    with pytest.raises(UsageError):
        store.resolve_request("  ")
    # LIKE metacharacters are literal
    with pytest.raises(NotFoundError):
        store.resolve_request("abcd12%")


def test_request_prefixes_are_the_shortest_unique_ones(database: Any) -> None:
    """Readers shorten an id (where space is short) to its shortest prefix of at least 8
    characters that no other stored id starts with; resolve_request finds each one again."""
    b = StoreBuilder(database())
    b.table("things", {"id": INT8, "v": TEXT})
    ids = [
        "feed0000-1111-aaaa",  # shares 14 characters with the next one
        "feed0000-1111-bbbb",
        "cafe0001",  # an id that is a prefix of another one
        "cafe0001x",
        "dead",  # shorter than 8: always whole
        "0123456789abcdef",  # unique after 1 character: 8 still
    ]
    for n, rid in enumerate(ids):
        with b.txn(f"2026-03-11 10:{n:02d}", rid) as t:
            t.insert("things", {"id": n, "v": "x"})
    b.request_error("feed0000-1111-cccc-only-an-error", "E", "failed")  # error only: still counted
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        found = store.request_prefixes([*ids, None, "not-stored-at-all"])
        assert found == {
            "feed0000-1111-aaaa": "feed0000-1111-a",
            "feed0000-1111-bbbb": "feed0000-1111-b",
            "cafe0001": "cafe0001",
            "cafe0001x": "cafe0001x",
            "dead": "dead",
            "0123456789abcdef": "01234567",
            "not-stored-at-all": "not-stor",
        }
        for rid in ids:
            assert store.resolve_request(found[rid]) == rid
        assert store.request_prefixes([]) == {}
        with pytest.raises(AmbiguousRequestError) as excinfo:
            store.resolve_request("feed0000-1111")
        assert excinfo.value.matches == [
            "feed0000-1111-aaaa",
            "feed0000-1111-bbbb",
            "feed0000-1111-cccc-only-an-error",
        ]
    b.close()


def test_unknown_table_lists_known_and_close_matches(store: Store) -> None:
    with pytest.raises(NotFoundError) as excinfo:
        store.row_history("userz", 42)
    message = str(excinfo.value)
    assert "no history for table public.userz" in message
    assert "known tables:" in message and "public.orders" in message
    assert "did you mean public.users" in message


def test_unknown_row_and_bad_keys(store: Store) -> None:
    with pytest.raises(NotFoundError, match=r"no history for public\.users id=7"):
        store.row_history("users", 7)
    with pytest.raises(NotFoundError, match="no history"):
        store.blame("users", 7)
    assert store.row_at("users", 7, store.current_version() or 0) is None
    assert not store.has_history("users", 7)
    with pytest.raises(UsageError, match=r"invalid key value for public\.users\.id"):
        store.row_history("users", "abc")
    with pytest.raises(UsageError, match="key columns are"):
        store.row_history("users", {"nope": 1})
    assert store.stored_key("users", key_from_text("42")) == {"id": 42}
    assert store.stored_key("orders", key_from_text("81b2")) == {"id": "81b2"}
    assert store.stored_key("users", key_from_text('{"id": "42"}')) == {"id": 42}
    with pytest.raises(UsageError, match="not valid JSON"):
        key_from_text('{"id": ')


def test_mutation_log_filters_and_cursor(store: Store) -> None:
    everything = store.mutation_log(limit=1000).mutations
    assert everything == sorted(everything, key=lambda m: m.cursor, reverse=True)
    page1 = store.mutation_log(table="users", limit=2)
    assert len(page1.mutations) == 2 and page1.next_cursor is not None
    page2 = store.mutation_log(table="users", limit=2, before=page1.next_cursor)
    page3 = store.mutation_log(table="users", limit=2, before=page2.next_cursor)
    seen = page1.mutations + page2.mutations + page3.mutations
    assert [m.op for m in reversed(seen)] == ["INSERT", "UPDATE", "UPDATE", "UPDATE"]
    assert [m.status for m in store.mutation_log(status="rolled_back").mutations] == ["rolled_back"] * 2
    assert {m.table for m in store.mutation_log(request_id=REQ_FAILED).mutations} == {
        "public.users",
        "public.orders",
    }
    assert [m.op for m in store.mutation_log(table="users", key=42, op="insert").mutations] == ["INSERT"]
    assert {m.context["actor"] for m in store.mutation_log(actor="billing").mutations if m.context} == {
        "billing"
    }
    since = store.mutation_log(since=at("2026-03-10 14:21"), until=at("2026-03-10 14:22")).mutations
    assert [m.request_id[:8] for m in since if m.request_id] == ["a3c91ef0"]
    with pytest.raises(UsageError):
        store.mutation_log(op="MERGE")


def test_versions_and_timestamps(seed: StoreBuilder, store: Store) -> None:
    assert store.current_version() == seed.position
    assert store.earliest_version() == 0x1_0000_0000
    assert store.version_at_timestamp(at("2026-03-01 00:00")) is None
    first = seed.positions[0]
    assert store.version_at_timestamp(at("2026-03-09 09:00")) == first
    assert store.version_at_timestamp(at("2026-03-09 23:00")) == first
    # 14:22:30 is the rolled-back transaction: it has no version of its own
    assert store.version_at_timestamp(at("2026-03-10 14:22:45")) == seed.positions[3]
    assert store.check_version(seed.positions[0])
    assert not store.check_version(0x1000)
    with pytest.raises(UsageError, match="ahead of the history store"):
        store.check_version(seed.position + 10_000)
    span = store.versions()
    assert (span.earliest, span.current) == (0x1_0000_0000, seed.position)
    assert span.earliest_at is None and span.current_at is not None
    assert span.to_json()["earliest_lsn"] == "1/0"


def test_unreachable_store_message_has_no_password() -> None:
    store = Store("host=127.0.0.1 port=1 dbname=hist user=u password=s3cret connect_timeout=2")
    with pytest.raises(StoreUnavailableError) as excinfo:
        store.current_version()
    message = str(excinfo.value)
    assert "host=127.0.0.1" in message and "dbname=hist" in message
    assert "s3cret" not in message


def test_missing_schema_is_a_store_error(seed: StoreBuilder) -> None:
    with Store(seed.dsn, schema="nope") as store, pytest.raises(StoreUnavailableError, match="cdc setup"):
        store.current_version()


# ============================================================================ time travel


@pytest.fixture(scope="module")
def lifecycle(
    database: Any,
) -> Iterator[tuple[StoreBuilder, dict[str, int], dict[int, list[dict[str, Any]]]]]:
    """Row keys 1 and 2 of public.items through every kind of change; versions by label."""
    b = StoreBuilder(database())
    b.table("items", {"id": INT8, "v": TEXT})
    v: dict[str, int] = {}
    states: dict[int, list[dict[str, Any]]] = {}

    def mark(label: str) -> None:
        v[label] = b.position
        states[b.position] = sorted(b.state("items"), key=lambda r: r["id"])

    with b.txn("2026-01-01 10:00", "r-insert") as t:
        t.insert("items", {"id": 1, "v": "a"})
        t.insert("items", {"id": 3, "v": "three"})
    mark("insert")
    with b.txn("2026-01-01 10:01", "r-update") as t:
        t.update("items", 1, {"v": "b"})
    mark("update")
    with b.txn("2026-01-01 10:02", "r-abort", status="rolled_back") as t:
        t.update("items", 1, {"v": "x"})
        t.delete("items", 3)
    mark("aborted")
    with b.txn("2026-01-01 10:03", "r-savepoint") as t:
        t.update("items", 1, {"v": "y"}, rolled_back=True)
        t.update("items", 1, {"v": "c"})
    mark("savepoint")
    with b.txn("2026-01-01 10:04", "r-move") as t:
        t.update("items", 1, {"id": 2})
    mark("move")
    with b.txn("2026-01-01 10:05", "r-reuse") as t:
        t.insert("items", {"id": 1, "v": "new"})
    mark("reuse")
    with b.txn("2026-01-01 10:06", "r-delete") as t:
        t.delete("items", 2)
    mark("delete")
    with b.txn("2026-01-01 10:07", "r-truncate") as t:
        t.insert("items", {"id": 5, "v": "five"})
        t.truncate("items")
    mark("truncate")
    with b.txn("2026-01-01 10:08", "r-again") as t:
        t.insert("items", {"id": 1, "v": "again"})
    mark("again")
    b.finish(baseline=0x1_0000_0000)
    yield b, v, states
    b.close()


EXPECTED = {
    # label: (row 1, row 2)
    "insert": ({"id": 1, "v": "a"}, None),
    "update": ({"id": 1, "v": "b"}, None),
    "aborted": ({"id": 1, "v": "b"}, None),
    "savepoint": ({"id": 1, "v": "c"}, None),
    "move": (None, {"id": 2, "v": "c"}),
    "reuse": ({"id": 1, "v": "new"}, {"id": 2, "v": "c"}),
    "delete": ({"id": 1, "v": "new"}, None),
    "truncate": (None, None),
    "again": ({"id": 1, "v": "again"}, None),
}


def test_row_at_every_version(lifecycle: Any) -> None:
    b, versions, _ = lifecycle
    with Store(b.dsn) as store:
        for label, (one, two) in EXPECTED.items():
            version = versions[label]
            assert store.row_at("items", 1, version) == one, label
            assert store.row_at("items", 2, version) == two, label
            # a version between transactions reads the earlier one
            assert store.row_at("items", 1, version + 1) == one, label
        assert store.row_at("items", 1, versions["insert"] - 1) is None
        assert store.row_at("items", 3, versions["aborted"]) == {"id": 3, "v": "three"}
        assert store.row_at("items", 5, versions["truncate"]) is None


def test_table_at_every_version_matches_the_builder(lifecycle: Any) -> None:
    b, versions, states = lifecycle
    with Store(b.dsn) as store:
        for label, version in versions.items():
            expected = states[version]
            assert store.table_at("items", version, limit=100).rows == expected, label
            pages = list(store.iter_table_at("items", version, page_size=1))
            assert [r for page in pages for r in page] == expected, label
            assert all(len(p) == 1 for p in pages)


def test_row_history_follows_moves_and_truncates(lifecycle: Any) -> None:
    b, _, _ = lifecycle
    with Store(b.dsn) as store:
        one = store.row_history("items", 1)
        assert [(m.op, m.status) for m in one] == [
            ("INSERT", "committed"),
            ("UPDATE", "committed"),
            ("UPDATE", "rolled_back"),
            ("UPDATE", "rolled_back"),
            ("UPDATE", "committed"),
            ("UPDATE", "committed"),  # moved away to id=2 (old_key)
            ("INSERT", "committed"),
            ("TRUNCATE", "committed"),
            ("INSERT", "committed"),
        ]
        assert one[5].old_key == {"id": 1} and one[5].key == {"id": 2}
        two = store.row_history("items", 2)
        assert [m.op for m in two] == ["UPDATE", "DELETE"]  # the truncate came after it was gone
        entries = {e.column: e for e in store.blame("items", 1)}
        assert entries["v"].value == "again" and entries["v"].request_id == "r-again"


def test_blame_follows_a_moved_row(database: Any) -> None:
    b = StoreBuilder(database())
    b.table("accounts", {"id": INT8, "owner": TEXT, "tier": TEXT})
    with b.txn("2026-02-01 10:00", "r1") as t:
        t.insert("accounts", {"id": 1, "owner": "ann", "tier": "gold"})
    with b.txn("2026-02-01 11:00", "r2") as t:
        t.update("accounts", 1, {"id": 10, "tier": "silver"})
    with b.txn("2026-02-01 12:00", "r3", status="rolled_back") as t:
        t.update("accounts", 10, {"owner": "bob"})
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        entries = {e.column: e for e in store.blame("accounts", 10)}
        assert entries["owner"].request_id == "r1" and entries["owner"].rolled_back_request_id == "r3"
        assert entries["tier"].request_id == "r2" and not entries["tier"].rolled_back
        with pytest.raises(NotFoundError, match="does not exist now"):
            store.blame("accounts", 1)
    b.close()


def test_keyless_multiset_table(database: Any) -> None:
    b = StoreBuilder(database())
    b.table("events", {"kind": TEXT, "n": INT4}, key=())
    with b.txn("2026-02-01 10:00") as t:
        t.insert("events", {"kind": "a", "n": 1})
        t.insert("events", {"kind": "a", "n": 1})
        t.insert("events", {"kind": "a", "n": 1})
        t.insert("events", {"kind": "b", "n": 2})
        t.insert("events", {"kind": "c", "n": 3})
    v1 = b.position
    with b.txn("2026-02-01 10:01") as t:
        t.delete("events", {"kind": "a", "n": 1})
        t.update("events", {"kind": "b", "n": 2}, {"n": 20})
    v2 = b.position
    with b.txn("2026-02-01 10:02", status="rolled_back") as t:
        t.delete("events", {"kind": "c", "n": 3})
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        assert store.table("events").keyless
        rows1 = store.table_at("events", v1).rows
        assert sorted(map(repr, rows1)) == sorted(map(repr, b_rows_v1()))
        rows2 = [r for page in store.iter_table_at("events", v2, page_size=1) for r in page]
        assert sorted(map(repr, rows2)) == sorted(
            map(repr, [{"kind": "a", "n": 1}] * 2 + [{"kind": "b", "n": 20}, {"kind": "c", "n": 3}])
        )
        # pages never split identical rows: the two a-rows come together
        pages = list(store.iter_table_at("events", v2, page_size=1))
        assert any(p == [{"kind": "a", "n": 1}] * 2 for p in pages)
        assert store.row_at("events", {"kind": "a", "n": 1}, v2) == {"kind": "a", "n": 1}
        assert store.row_at("events", {"kind": "b", "n": 2}, v2) is None
        assert store.row_at("events", {"kind": "b", "n": 20}, v2) == {"kind": "b", "n": 20}
        with pytest.raises(UsageError, match="has no key"):
            store.row_at("events", 1, v2)
        history = store.row_history("events", {"kind": "a", "n": 1})
        assert [m.op for m in history] == ["INSERT", "INSERT", "INSERT", "DELETE"]
    b.close()


def b_rows_v1() -> list[dict[str, Any]]:
    return [{"kind": "a", "n": 1}] * 3 + [{"kind": "b", "n": 2}, {"kind": "c", "n": 3}]


def test_composite_keys_in_key_column_order(database: Any) -> None:
    b = StoreBuilder(database())
    # key (org, member): jsonb would order the object by "org" then "member"; we want org first
    b.table("memberships", {"org": TEXT, "member": INT8, "role": TEXT}, key=("org", "member"))
    with b.txn("2026-02-01 10:00", "r1") as t:
        for org, member in [("b", 1), ("a", 2), ("a", 10), ("c", 0), ("a", 1)]:
            t.insert("memberships", {"org": org, "member": member, "role": f"{org}{member}"})
    with b.txn("2026-02-01 10:01", "r2") as t:
        t.delete("memberships", {"org": "a", "member": 10})
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        rows = store.table_at("memberships", b.position).rows
        assert [(r["org"], r["member"]) for r in rows] == [("a", 1), ("a", 2), ("b", 1), ("c", 0)]
        page = store.table_at("memberships", b.position, limit=2)
        assert page.next_after == {"org": "a", "member": 2}
        rest = store.table_at("memberships", b.position, after_key=page.next_after, limit=10)
        assert [(r["org"], r["member"]) for r in rest.rows] == [("b", 1), ("c", 0)]
        assert rest.next_after is None
        assert store.row_at("memberships", {"member": 1, "org": "a"}, b.position) == {
            "org": "a",
            "member": 1,
            "role": "a1",
        }
        assert store.row_at("memberships", {"org": "a", "member": "2"}, b.position) is not None
        with pytest.raises(UsageError, match="composite key"):
            store.row_at("memberships", 1, b.position)
        blame = store.blame("memberships", {"org": "a", "member": 1})
        assert [e.column for e in blame] == ["role"]
    b.close()


# ============================================================================ plans


@pytest.fixture(scope="module")
def big(database: Any) -> Iterator[StoreBuilder]:
    """A store with enough history (60k mutations over 6k rows) for the planner to be honest."""
    b = StoreBuilder(database())
    build_seed_000(b)
    base = b.position + 0x10000
    users = b.resolve("users")
    b.conn.execute(
        sql.SQL(
            "INSERT INTO {c} (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, key_text, "
            "image) "
            "SELECT %(base)s + g * 256, 0, now() - interval '1 day' + g * interval '1 second', %(t)s, %(s)s, "
            "  CASE WHEN g < 6000 THEN 'I' ELSE 'U' END, 0, %(base)s + g * 256 - 10, "
            "  jsonb_build_array(1000 + g %% 6000)::text, "
            "  format(%(image)s, 1000 + g %% 6000, g) "
            "FROM generate_series(1, 60000) g"
        ).format(c=sql.Identifier(b.schema, "changes")),
        {
            "base": base,
            "t": users.table_id,
            "s": users.schema_id,
            "image": '{"id":%s,"email":null,"name":null,"plan":"p%s"}',
        },
    )
    b.conn.execute(
        sql.SQL(
            "INSERT INTO {tx} (position, committed_at, xid, commit_lsn, status, change_count, request_id, "
            "context) SELECT %(base)s + g * 256, now() - interval '1 day' + g * interval '1 second', 5000 + g, "
            "  %(base)s + g * 256 - 16, 'c', 1, 'bulk-' || (g / 10), "
            "  json_build_object('request_id', 'bulk-' || (g / 10))::text FROM generate_series(1, 60000) g"
        ).format(tx=sql.Identifier(b.schema, "transactions")),
        {"base": base},
    )
    b.position = base + 60000 * 256
    b.finish(baseline=0x1_0000_0000)
    for table in ("changes_default", "transactions_default", "context_changes_default", "changes_keep"):
        b.conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(b.schema, table)))
    yield b
    b.close()


def _plans(b: StoreBuilder, action: Any) -> list[str]:
    """Run ``action(store)`` and EXPLAIN every query it made."""
    recorded: list[tuple[Any, Any]] = []
    with Store(b.dsn) as store:
        original = store._rows

        def recording(query: Any, params: Any = None, **kwargs: Any) -> Any:
            recorded.append((query, params))
            return original(query, params, **kwargs)

        store._rows = recording  # type: ignore[method-assign]
        action(store)
    plans = []
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        for query, params in recorded:
            rows = conn.execute(sql.SQL("EXPLAIN ") + query, params).fetchall()
            plans.append("\n".join(r[0] for r in rows))
    return plans


@pytest.mark.parametrize(
    "action",
    [
        pytest.param(lambda s: s.row_at("users", 1042, s.current_version()), id="row_at"),
        pytest.param(lambda s: s.row_history("users", 1042), id="row_history"),
        pytest.param(lambda s: s.blame("users", 1042), id="blame"),
        pytest.param(lambda s: s.request("bulk-17"), id="request"),
        pytest.param(lambda s: s.version_at_timestamp(at("2026-03-10 13:00")), id="version_at_timestamp"),
    ],
)
def test_reads_use_indexes_not_seq_scans(big: StoreBuilder, action: Any) -> None:
    plans = _plans(big, action)
    assert plans
    for plan in plans:
        # (the empty tables beside them, *_keep and context_changes, may be scanned)
        assert "Seq Scan on changes_default" not in plan, plan
        assert "Seq Scan on transactions_default" not in plan, plan


def test_big_store_answers_stay_right(big: StoreBuilder) -> None:
    with Store(big.dsn) as store:
        row = store.row_at("users", 1042, store.current_version() or 0)
        assert row is not None and row["plan"] == "p54042"
        page = store.table_at("users", store.current_version() or 0, limit=3)
        assert [r["id"] for r in page.rows] == [42, 1000, 1001]
        assert store.version_at_timestamp(at("2026-03-10 14:21")) is not None
        assert len(store.row_history("users", 1042)) == 10
