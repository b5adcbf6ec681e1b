"""The source-side context trigger (sql/context.sql, cdc.source_context) on a real server.

The WAL is read back through a `test_decoding` slot, which prints logical messages as
"message: transactional: 1 prefix: cdc.context, sz: N content:{...}".
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from cdc.context import (
    CONTEXT_PREFIX,
    DEFAULT_APPLICATION_NAME_PATTERN,
    ContextKeys,
    context_fingerprint,
    parse_context,
    pattern_to_postgres,
    request_id_from_application_name,
)
from cdc.devdb import LocalPostgres
from cdc.errors import ConfigError, SetupError
from cdc.source_context import (
    context_installed,
    context_tables,
    install_context,
    read_context_keys,
    uninstall_context,
)

TABLES = """
CREATE TABLE t (id int PRIMARY KEY, v text);
CREATE TABLE u (id int PRIMARY KEY, v text);
INSERT INTO t VALUES (1, 'a'), (2, 'b');
INSERT INTO u VALUES (1, 'a');
"""


# ============================================================================ WAL reading


@dataclass(frozen=True)
class Item:
    kind: str  # BEGIN, COMMIT, message, change
    text: str
    transactional: bool = False
    prefix: str = ""
    content: str = ""
    keys: ContextKeys | None = None  # the source's signing keys, to verify the messages

    def context(self) -> dict[str, Any]:
        assert self.kind == "message" and self.prefix == CONTEXT_PREFIX, self
        parsed = parse_context(self.content.encode(), self.keys)  # every message must verify and parse
        raw = json.loads(self.content)
        assert parsed.as_json()["source"] == raw["source"]
        return parsed.as_json()


_MESSAGE = re.compile(r"message: transactional: (\d) prefix: ([^,]*), sz: \d+ content:(.*)", re.S)


def _item(line: str, keys: ContextKeys | None) -> Item:
    if line.startswith(("BEGIN", "COMMIT")):
        return Item(line.split(maxsplit=1)[0], line)
    match = _MESSAGE.match(line)
    if match:
        return Item("message", line, match.group(1) == "1", match.group(2), match.group(3), keys)
    return Item("change", line)


class Slot:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.name = f"ctx_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [self.name])

    def changes(self) -> list[Item]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            # The test servers run with synchronous_commit=off, and decoding stops at the flushed
            # WAL: a synchronous commit that wrote WAL flushes everything before it.
            conn.execute("SET synchronous_commit = on")
            conn.execute("SELECT pg_logical_emit_message(true, 'test.flush', '')")
            rows = conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", [self.name])
            keys = read_context_keys(conn)
            items = [_item(row[0], keys) for row in rows]
        return [i for i in items if i.prefix != "test.flush"]

    def transactions(self) -> list[list[Item]]:
        """The items of each committed transaction (BEGIN/COMMIT left out)."""
        result: list[list[Item]] = []
        current: list[Item] | None = None
        for item in self.changes():
            if item.kind == "BEGIN":
                current = []
            elif item.kind == "COMMIT":
                assert current is not None
                if current:  # the flush transaction of changes() is empty once its message is gone
                    result.append(current)
                current = None
            elif current is not None:
                current.append(item)
        return result

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", [self.name])


def contexts(items: list[Item]) -> list[dict[str, Any]]:
    return [i.context() for i in items if i.kind == "message" and i.prefix == CONTEXT_PREFIX]


def shape(items: list[Item]) -> list[str]:
    """'ctx:<request_id>' for each context message, 'change' for each row change."""
    out = []
    for i in items:
        if i.kind == "message" and i.prefix == CONTEXT_PREFIX:
            out.append(f"ctx:{i.context()['request_id']}")
        elif i.kind == "change":
            out.append("change")
    return out


# ============================================================================ fixtures


@pytest.fixture
def source(pg: LocalPostgres, fresh_dbname: str) -> Iterator[str]:
    dsn = pg.create_database(fresh_dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(TABLES)
    yield dsn
    with psycopg.connect(dsn, autocommit=True) as conn:
        for (name,) in conn.execute(
            "SELECT slot_name FROM pg_replication_slots WHERE database = current_database()"
        ):
            conn.execute("SELECT pg_drop_replication_slot(%s)", [name])
        conn.execute("DROP EVENT TRIGGER IF EXISTS cdc_context_attach")
    with psycopg.connect(pg.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(fresh_dbname)))


def install(dsn: str, tables: tuple[str, ...] = ("t", "u"), **options: Any) -> list[str]:
    options.setdefault("application_name_pattern", DEFAULT_APPLICATION_NAME_PATTERN)
    with psycopg.connect(dsn, autocommit=True) as conn:
        return install_context(conn, [("public", name) for name in tables], **options)


@pytest.fixture
def slot(source: str) -> Iterator[Slot]:
    install(source)
    s = Slot(source)
    yield s


# ============================================================================ the messages


def test_set_local_request_id_one_message_before_the_changes(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'r-1'")
        conn.execute("SET LOCAL cdc.actor = 'alice'")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.execute("UPDATE t SET v = 'y' WHERE id = 2")  # same context: nothing more
        conn.execute("INSERT INTO u VALUES (2, 'z')")  # another table, same context: nothing more
        conn.commit()
    (txn,) = slot.transactions()
    assert shape(txn) == ["ctx:r-1", "change", "change", "change"]
    (ctx,) = contexts(txn)
    assert txn[0].transactional
    assert ctx["source"] == "setting"
    assert ctx["actor"] == "alice"
    assert ctx["db_user"] == "postgres"
    assert ctx["application_name"] is None or isinstance(ctx["application_name"], str)
    assert ctx["backend_pid"] > 0
    assert ctx["extra"] == {}


def test_one_message_per_transaction(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:
        for n in range(3):
            conn.execute(f"SET LOCAL cdc.request_id = 'req-{n}'")
            conn.execute("UPDATE t SET v = %s WHERE id = 1", [str(n)])
            conn.execute("UPDATE t SET v = %s WHERE id = 2", [str(n)])
            conn.commit()
    assert [shape(txn) for txn in slot.transactions()] == [
        [f"ctx:req-{n}", "change", "change"] for n in range(3)
    ]


def test_request_id_changed_mid_transaction(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'first'")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.execute("SET LOCAL cdc.request_id = 'second'")
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
        conn.execute("UPDATE t SET v = 'z' WHERE id = 2")
        conn.commit()
    (txn,) = slot.transactions()
    assert shape(txn) == ["ctx:first", "change", "ctx:second", "change", "change"]


def test_extra_settings_land_in_extra(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'r-extra'")
        conn.execute("SET LOCAL cdc.tenant = 'acme'")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
    (ctx,) = contexts(slot.transactions()[0])
    assert ctx["extra"] == {"tenant": "acme"}


def test_configured_extra_names_and_prefix(source: str) -> None:
    install(source, settings_prefix="app", extra_settings=["tenant", "Region"])
    s = Slot(source)
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL app.request_id = 'r-app'")
        conn.execute("SET LOCAL app.actor = 'bob'")
        conn.execute("SET LOCAL app.region = 'eu'")
        conn.execute("SET LOCAL cdc.request_id = 'ignored'")  # another prefix
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
    (ctx,) = contexts(s.transactions()[0])
    assert (ctx["request_id"], ctx["actor"], ctx["extra"]) == ("r-app", "bob", {"region": "eu"})


def test_application_name_carries_the_request_id(source: str, slot: Slot) -> None:
    with psycopg.connect(source, application_name="req:abc123") as conn:
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
        conn.execute("SET LOCAL cdc.request_id = 'wins'")  # the setting has priority
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
        conn.commit()
    first, second = (contexts(txn)[0] for txn in slot.transactions())
    assert (first["request_id"], first["source"], first["application_name"]) == (
        "abc123",
        "application_name",
        "req:abc123",
    )
    assert (second["request_id"], second["source"]) == ("wins", "setting")


def test_application_name_changed_mid_transaction(source: str, slot: Slot) -> None:
    with psycopg.connect(source, application_name="req:one") as conn:
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.execute("SET LOCAL application_name = 'req:two'")
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
        conn.commit()
    (txn,) = slot.transactions()
    assert shape(txn) == ["ctx:one", "change", "ctx:two", "change"]


def test_no_context_gives_source_none(source: str, slot: Slot) -> None:
    with psycopg.connect(source, application_name="batch-job") as conn:
        for _ in range(3):  # the session cache: the same message every transaction
            conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
            conn.execute("UPDATE u SET v = 'x' WHERE id = 1")
            conn.commit()
        conn.execute("SET cdc.actor = 'cron'")  # changes the cached message
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
        conn.commit()
    txns = slot.transactions()
    assert [shape(txn) for txn in txns] == [["ctx:None", "change", "change"]] * 3 + [["ctx:None", "change"]]
    first = contexts(txns[0])[0]
    assert first["source"] == "none"
    assert first["request_id"] is None
    assert first["application_name"] == "batch-job"
    assert first["db_user"] == "postgres"
    assert contexts(txns[3])[0]["actor"] == "cron"


def test_none_message_needs_the_first_statement_before_an_xid(source: str, slot: Slot) -> None:
    # A row lock gives the transaction its xid before the first captured statement: the "none"
    # message is skipped then (documented); a request is never skipped.
    with psycopg.connect(source) as conn:
        conn.execute("UPDATE t SET v = 'w' WHERE id = 1")
        conn.commit()
        conn.execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
        conn.execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")
        conn.execute("SET LOCAL cdc.request_id = 'locked'")
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
        conn.commit()
    assert [shape(txn) for txn in slot.transactions()] == [
        ["ctx:None", "change"],
        ["change"],
        ["ctx:locked", "change"],
    ]


def test_session_level_setting_one_message_per_transaction(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("SET cdc.request_id = 'whole-session'")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
    assert [shape(txn) for txn in slot.transactions()] == [["ctx:whole-session", "change"]] * 2


def test_a_request_id_carried_over_from_an_earlier_transaction_is_flagged(source: str, slot: Slot) -> None:
    """ "session_level" (sql/context.sql, "SET or SET LOCAL?"): in force at the first statement of
    a transaction and the request id of the session's previous emission. What PostgreSQL lets us
    tell apart, and where it does not (both documented)."""
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION do_request(r text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM set_config('cdc.request_id', r, true); UPDATE t SET v = r WHERE id = 2; END $$"
        )
        conn.execute("SET cdc.request_id = 'whole-session'")  # session level, autocommit
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")  # the transaction it was set for
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")  # carried over
        conn.execute("UPDATE t SET v = 'z' WHERE id = 1")  # carried over
        with conn.transaction():  # carried over too, but after BEGIN: not seen
            conn.execute("UPDATE t SET v = 'w' WHERE id = 1")
        conn.execute("RESET cdc.request_id")
        conn.execute("SELECT do_request('fn-1')")  # set in the statement itself: new ids are new
        conn.execute("SELECT do_request('fn-2')")
        conn.execute("SELECT do_request('fn-2')")  # the same id again there: reads as carried over
    with psycopg.connect(source) as conn:  # SET LOCAL, the same id in transactions in a row
        for _ in range(2):
            conn.execute("SET LOCAL cdc.request_id = 'local'")
            conn.execute("UPDATE t SET v = 'l' WHERE id = 1")
            conn.commit()
    found = [
        (c["request_id"], c.get("session_level", False)) for txn in slot.transactions() for c in contexts(txn)
    ]
    assert found == [
        ("whole-session", False),
        ("whole-session", True),
        ("whole-session", True),
        ("whole-session", False),
        ("fn-1", False),
        ("fn-2", False),
        ("fn-2", True),
        ("local", False),
        ("local", False),
    ]


def test_emit_none_off_writes_nothing_without_a_request(source: str) -> None:
    install(source, emit_none=False)
    s = Slot(source)
    with psycopg.connect(source, application_name="batch-job") as conn:
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
        conn.commit()
        conn.execute("SET LOCAL cdc.request_id = 'tagged'")
        conn.execute("UPDATE t SET v = 'z' WHERE id = 1")
        conn.commit()
        conn.execute("SET application_name = 'req:from-app'")
        conn.execute("UPDATE t SET v = 'w' WHERE id = 1")
        conn.commit()
        conn.execute("UPDATE t SET v = 'v' WHERE id = 1")
        conn.commit()
    assert [shape(txn) for txn in s.transactions()] == [
        ["change"],
        ["change"],
        ["ctx:tagged", "change"],
        ["ctx:from-app", "change"],
        ["ctx:from-app", "change"],
    ]


def test_truncate_fires_the_trigger(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'wipe'")
        conn.execute("TRUNCATE u")
        conn.commit()
    (txn,) = slot.transactions()
    assert shape(txn) == ["ctx:wipe", "change"]
    assert "TRUNCATE" in txn[1].text


def test_savepoint_rollback_emits_again(source: str, slot: Slot) -> None:
    with psycopg.connect(source) as conn:
        conn.execute("SAVEPOINT a")
        conn.execute("SET LOCAL cdc.request_id = 'inner'")
        conn.execute("UPDATE t SET v = 'lost' WHERE id = 1")
        conn.execute("ROLLBACK TO SAVEPOINT a")  # the setting and the emission go with it
        conn.execute("SET LOCAL cdc.request_id = 'outer'")
        conn.execute("UPDATE t SET v = 'kept' WHERE id = 2")
        conn.commit()
    (txn,) = slot.transactions()
    assert shape(txn) == ["ctx:outer", "change"]


def test_odd_values_never_fail_the_statement(source: str, slot: Slot) -> None:
    odd = 'quote\' "dq" \\back\\ tab\t nl\n ünïcödé ☃ ' + "x" * 5000
    with psycopg.connect(source) as conn:
        conn.execute("SELECT set_config('cdc.request_id', %s, true)", [odd])
        conn.execute("SELECT set_config('cdc.actor', %s, true)", [odd])
        conn.execute("SELECT set_config('cdc.tenant', %s, true)", [odd])
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
    (ctx,) = contexts(slot.transactions()[0])
    assert ctx["request_id"] == odd[:256]  # the parser caps ids
    assert ctx["actor"] == odd[:256]
    assert ctx["extra"]["tenant"] == odd[:1024]


def test_any_search_path_and_a_plain_role(source: str, slot: Slot) -> None:
    role = f"app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT ALL ON t TO {}").format(sql.Identifier(role)))
    try:
        with psycopg.connect(source, user=role) as conn:
            conn.execute("SET search_path = ''")
            conn.execute("SET LOCAL cdc.request_id = 'plain'")
            conn.execute("UPDATE public.t SET v = 'x' WHERE id = 1")
            conn.commit()
        (ctx,) = contexts(slot.transactions()[0])
        assert (ctx["request_id"], ctx["db_user"]) == ("plain", role)
    finally:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_db_user_is_the_login_role_set_role_or_not(source: str, slot: Slot) -> None:
    """db_user is what the server vouches for: session_user, the role that logged in. SET ROLE
    changes the privileges a session uses, not who it is (docs/security.md)."""
    role = f"r_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT ALL ON t TO {}").format(sql.Identifier(role)))
    try:
        with psycopg.connect(source) as conn:
            conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
            conn.commit()
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
            conn.commit()
        users = [contexts(txn)[0]["db_user"] for txn in slot.transactions()]
        assert users == ["postgres", "postgres"]
    finally:
        with psycopg.connect(source, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_fingerprint_matches_python(source: str, slot: Slot) -> None:
    with psycopg.connect(source, application_name="some app") as conn:
        conn.execute("SET LOCAL cdc.request_id = 'fp-1'")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        row = conn.execute("SELECT current_setting('cdc._emitted'), cdc.context_fingerprint()").fetchone()
        conn.commit()
    assert row == (context_fingerprint("fp-1", "some app"),) * 2


# ============================================================================ installation


def test_table_created_later_gets_the_trigger(source: str, slot: Slot) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE later (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE parted (id int PRIMARY KEY) PARTITION BY RANGE (id)")
        conn.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (100)")
        conn.execute("CREATE UNLOGGED TABLE scratch (id int)")
        conn.execute("CREATE TEMP TABLE tmp (id int)")
        conn.execute("CREATE TABLE copied AS SELECT 1 AS id")
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'later'")
        conn.execute("INSERT INTO later VALUES (1)")
        conn.commit()
        conn.execute("SET LOCAL cdc.request_id = 'parted'")
        conn.execute("INSERT INTO parted VALUES (1)")
        conn.commit()
    # CREATE TABLE AS wrote its row before the event trigger attached anything: no context.
    assert [shape(txn) for txn in slot.transactions()] == [
        ["change"],
        ["ctx:later", "change"],
        ["ctx:parted", "change"],
    ]
    with psycopg.connect(source) as conn:
        names = {table for _schema, table in context_tables(conn)}
    assert names == {"t", "u", "later", "parted", "parted_1", "copied"}


def test_excluded_schema_is_left_alone(source: str) -> None:
    install(source, exclude_schemas=["history"])
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA history")
        conn.execute("CREATE TABLE history.h (id int)")
        conn.execute("CREATE TABLE public.p (id int)")
        assert {f"{s}.{t}" for s, t in context_tables(conn)} == {"public.t", "public.u", "public.p"}


def test_install_twice_is_idempotent(source: str) -> None:
    assert install(source) == []
    assert install(source) == []
    with psycopg.connect(source) as conn:
        count = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'cdc_context'").fetchone()
        assert count == (2,)
        assert context_installed(conn)
    s = Slot(source)
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'once'")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
    assert shape(s.transactions()[0]) == ["ctx:once", "change"]


def test_install_over_a_body_type_without_session_level(source: str) -> None:
    """An earlier version's cdc.context_body_t (no session_level) gets the member."""
    install(source)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("ALTER TYPE cdc.context_body_t DROP ATTRIBUTE session_level")
    assert install(source) == []
    s = Slot(source)
    with psycopg.connect(source) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'upgraded'")
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
    (txn,) = s.transactions()
    assert shape(txn) == ["ctx:upgraded", "change"]
    assert json.loads(txn[0].content)["session_level"] is None  # after BEGIN: cannot be told


def test_reinstall_with_another_pattern_applies_to_open_sessions(source: str) -> None:
    install(source)
    s = Slot(source)
    with psycopg.connect(source, application_name="job=42") as conn:
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
        conn.commit()
        install(source, application_name_pattern=r"job=(?P<id>\d+)")
        conn.execute("UPDATE t SET v = 'y' WHERE id = 1")
        conn.commit()
    first, second = (contexts(txn)[0] for txn in s.transactions())
    assert (first["request_id"], first["source"]) == (None, "none")
    assert (second["request_id"], second["source"]) == ("42", "application_name")


def test_uninstall_removes_everything(source: str) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        before = _objects(conn)
    install(source)
    with psycopg.connect(source, autocommit=True) as conn:
        uninstall_context(conn)
        assert not context_installed(conn)
        assert _objects(conn) == before
        uninstall_context(conn)  # idempotent
        conn.execute("UPDATE t SET v = 'x' WHERE id = 1")  # no trigger left behind


def _objects(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    def q(query: str) -> list[Any]:
        return [r[0] for r in conn.execute(query).fetchall()]

    return {
        "schemas": q("SELECT nspname FROM pg_namespace ORDER BY 1"),
        "triggers": q("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1"),
        "event_triggers": q("SELECT evtname FROM pg_event_trigger ORDER BY 1"),
        "functions": q("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = pronamespace "
                       "WHERE nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"),
    }  # fmt: skip


def test_uninstall_keeps_a_shared_schema(source: str) -> None:
    install(source)
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE cdc.someone_elses (id int)")
        uninstall_context(conn)
        assert conn.execute("SELECT to_regclass('cdc.someone_elses') IS NOT NULL").fetchone() == (True,)


def test_not_superuser_warns_and_installs(source: str) -> None:
    role = f"owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
            sql.Identifier(conn.info.dbname), sql.Identifier(role)))  # fmt: skip
        conn.execute(sql.SQL("ALTER TABLE t OWNER TO {}").format(sql.Identifier(role)))
    try:
        with psycopg.connect(source, user=role, autocommit=True) as conn:
            warnings = install_context(
                conn, [("public", "t")], application_name_pattern=DEFAULT_APPLICATION_NAME_PATTERN
            )
            assert warnings == ["not superuser: tables created later need `cdc setup` again"]
            assert context_tables(conn) == [("public", "t")]
            assert conn.execute("SELECT count(*) FROM pg_event_trigger").fetchone() == (0,)
    finally:
        with psycopg.connect(source, autocommit=True) as conn:
            uninstall_context(conn)
            conn.execute("ALTER TABLE t OWNER TO postgres")
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_errors_are_reported_at_once(source: str) -> None:
    with pytest.raises(SetupError, match=r"public\.missing, public\.gone"):
        install(source, tables=("t", "missing", "gone"))
    with pytest.raises(ConfigError) as info:
        install(source, settings_prefix="bad prefix", extra_settings=["ok", "not ok", "request_id"])
    assert len(info.value.problems) == 3
    with psycopg.connect(source) as conn:
        assert not context_installed(conn)  # nothing half-installed


def test_pattern_postgresql_refuses_is_a_config_error(source: str) -> None:
    with pytest.raises(ConfigError, match="PostgreSQL refuses it"):
        install(source, application_name_pattern=r"req:(?P<id>a{1,1000})")
    with psycopg.connect(source) as conn:
        assert not context_installed(conn)


def test_views_and_unlogged_tables_are_skipped_with_a_warning(source: str) -> None:
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE VIEW vw AS SELECT * FROM t")
        conn.execute("CREATE UNLOGGED TABLE scratch (id int)")
    warnings = install(source, tables=("t", "vw", "scratch"))
    assert warnings == [
        "public.vw is not a table: no context trigger",
        "public.scratch is unlogged: not captured, no trigger",
    ]


# ============================================================================ the application_name pattern

# application_name only ever holds printable ASCII (the server replaces anything else with '?'),
# so non-ASCII names, where \w and the like differ between the engines, are left out.
NAMES = [
    "req:abc123", "req:", "xreq:a.b_c:d-e/f", "psql", "", "req:A-Z req:second", "REQ:upper",
    "job=42;req:7", "req:" + "9" * 60, "req :x", "pre req:tail!", "a{b}req:c", "word req:x y", "req:a\\b",
]  # fmt: skip
PATTERNS = [
    DEFAULT_APPLICATION_NAME_PATTERN,
    r"(?i)req:(?P<id>\w+)",
    r"job=(\d+)",
    r"^(?:pre|word) req:(?P<id>[a-z]+)",
    r"\breq:(?P<id>[^ ]+)",
    r"(a|b)\{b\}req:(?P<id>.)",
    r"req:(?P<id>[0-9]{2,5})",
    r"req:(?P<id>[a-z]{,3})",
    r"(?P<id>^[a-z]+$)",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_pattern_translation_matches_python(pg: LocalPostgres, pattern: str) -> None:
    translated = pattern_to_postgres(pattern)
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for name in NAMES:
            row = conn.execute(
                "SELECT nullif(substring(%s::text, %s::text), '')", [name, translated]
            ).fetchone()
            assert row is not None
            assert row[0] == request_id_from_application_name(name, pattern), (pattern, translated, name)
