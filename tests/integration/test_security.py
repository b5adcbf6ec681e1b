"""The attacks of issue 13, tried as an adversary would, on PostgreSQL 15 and 18: each refused.

* privilege escalation through a caller's temporary objects (views, tables, functions, domains
  named like what a SECURITY DEFINER function reads), against every function `cdc setup` installs;
* a forged `cdc.context` (another db_user, client address, request) or `cdc.error` written with a
  raw pg_logical_emit_message, with a made-up MAC, or copied from another transaction;
* an error reported for another session's request, shown as that request's root cause.

(Placeholders written by undo: test_revert.py; clear values in error text and dictionary
reversal of hashes: test_policies.py; erasure across key changes: test_erase.py; DSN fragments:
tests/unit/test_config.py.)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner
from psycopg import sql
from starlette.testclient import TestClient

from cdc import client
from cdc.capture.batches import CONTEXT_REJECTED
from cdc.cli import main as cli
from cdc.query import Store
from cdc.web import create_app
from tests.capture_env import CaptureEnv

ATTACKER_CODE = """
CREATE FUNCTION pg_temp.evil() RETURNS boolean LANGUAGE plpgsql AS $f$
BEGIN
    RAISE NOTICE 'cdc-pwned as %', current_user;
    BEGIN
        EXECUTE pg_catalog.format('ALTER ROLE %I SUPERUSER', session_user);
    EXCEPTION WHEN OTHERS THEN
        NULL;
    END;
    RETURN true;
END
$f$;
"""

# What each installed definer function reads, shadowed in the attacker's temporary schema. A
# definer whose search_path leaves pg_temp implicit (searched FIRST for relations and types)
# would read these as its owner.
SHADOWS = [
    # await_capture
    "CREATE TEMP VIEW pg_replication_slots AS SELECT * FROM pg_catalog.pg_replication_slots WHERE pg_temp.evil()",
    "CREATE TEMP VIEW pg_stat_replication AS SELECT * FROM pg_catalog.pg_stat_replication WHERE pg_temp.evil()",
    # emit_context, report_error: the key table, and the catalogs
    "CREATE TEMP VIEW context_key AS SELECT true AS singleton, 'x'::pg_catalog.text AS key_id, "
    "'\\x00'::pg_catalog.bytea AS ipad, '\\x00'::pg_catalog.bytea AS opad, NULL::pg_catalog.text AS previous_key_id, "
    "NULL::pg_catalog.bytea AS previous_ipad, NULL::pg_catalog.bytea AS previous_opad WHERE pg_temp.evil()",
    "CREATE TEMP VIEW pg_proc AS SELECT * FROM pg_catalog.pg_proc WHERE pg_temp.evil()",
    "CREATE TEMP VIEW pg_class AS SELECT * FROM pg_catalog.pg_class WHERE pg_temp.evil()",
    "CREATE TEMP TABLE pg_settings (name text, setting text)",
    # types and domains used in casts and declarations
    "CREATE DOMAIN pg_temp.pg_lsn AS pg_catalog.text CHECK (pg_temp.evil())",
    "CREATE DOMAIN pg_temp.bytea AS pg_catalog.bytea CHECK (pg_temp.evil())",
    "CREATE DOMAIN pg_temp.text AS pg_catalog.text CHECK (pg_temp.evil())",
    "CREATE DOMAIN pg_temp.int8 AS pg_catalog.int8 CHECK (pg_temp.evil())",
    "CREATE TYPE pg_temp.context_body_t AS (request_id text)",
    # functions: never looked up in pg_temp, tried all the same
    "CREATE FUNCTION pg_temp.sha256(pg_catalog.bytea) RETURNS pg_catalog.bytea LANGUAGE sql "
    "AS 'SELECT pg_catalog.sha256($1) WHERE pg_temp.evil()'",
    "CREATE FUNCTION pg_temp.txid_current() RETURNS pg_catalog.int8 LANGUAGE sql "
    "AS 'SELECT 1::pg_catalog.int8 WHERE pg_temp.evil()'",
    "CREATE FUNCTION pg_temp.pg_backend_pid() RETURNS pg_catalog.int4 LANGUAGE sql "
    "AS 'SELECT 1 WHERE pg_temp.evil()'",
    "CREATE FUNCTION pg_temp.pg_logical_emit_message(boolean, pg_catalog.text, pg_catalog.bytea) "
    "RETURNS pg_catalog.pg_lsn LANGUAGE sql AS 'SELECT NULL::pg_catalog.pg_lsn WHERE pg_temp.evil()'",
    "CREATE FUNCTION pg_temp.capture_slot() RETURNS pg_catalog.name LANGUAGE sql "
    "AS 'SELECT NULL::pg_catalog.name WHERE pg_temp.evil()'",
    "CREATE FUNCTION pg_temp.pg_sleep(double precision) RETURNS void LANGUAGE sql "
    "AS 'SELECT WHERE pg_temp.evil()'",
]

# Every SECURITY DEFINER function setup installs, called as the attacker.
DEFINER_CALLS = {
    "cdc.await_capture(pg_lsn,integer)": "SELECT cdc.await_capture('0/0', 50)",
    "cdc.emit_context(text,text,json,text)": "SELECT cdc.emit_context('r-1', 'a', '{}', 'client')",
    "cdc.report_error(text,text,text,text,text,text)": "SELECT cdc.report_error('r-1', 'E', 'm', 'x.py:1')",
    "cdc.emit_simulate_marker()": "SELECT cdc.emit_simulate_marker()",
}
# SECURITY DEFINER functions nobody calls directly (EXECUTE revoked from PUBLIC): the schema-change
# and publication event triggers' functions and their helpers, run for any role's DDL.
TRIGGER_DEFINERS = {
    "cdc.ddl_token()",
    "cdc.ddl_emit(text)",
    "cdc.ddl_confirm()",
    "cdc.ddl_shape(oid)",
    "cdc.ddl_context()",
    "cdc.ddl_snapshot(oid,jsonb,text,boolean)",
    "cdc.ddl_record(oid,text)",
    "cdc.ddl_record_detached(oid,text)",
    "cdc.ddl_command_end()",
    "cdc.ddl_table_rewrite()",
    "cdc.ddl_sql_drop()",
    "cdc.ddl_seed_shapes()",
    "cdc.publication_sync()",
}
# Functions the application's roles must reach (the trigger's helpers, the client helper's and
# the dry run's entry points); every other cdc function is not executable by PUBLIC.
PUBLIC_FUNCTIONS = {
    "cdc.context_settings_prefix()",
    "cdc.request_id_from_application_name(text)",
    "cdc.context_emit_none()",
    "cdc.context_extra_json()",
    "cdc.context_fingerprint()",
    "cdc.context_actor()",
    "cdc.emit_setting_context()",
    "cdc.emit_application_name_context()",
    "cdc.context_quiet()",
    "cdc.emit_none_context()",
    "cdc.emit_context(text,text,json,text)",
    "cdc.report_error(text,text,text,text,text,text)",
    "cdc.context_trigger()",
    "cdc.context_excluded_schemas()",
    "cdc.await_capture(pg_lsn,integer)",
    "cdc.simulate_capture()",
    "cdc.simulate_capture_truncate()",
    "cdc.simulate_begin()",
    "cdc.emit_simulate_marker()",
    "cdc.simulate_excluded_schemas()",
    # read by the daemon's periodic check and `cdc status` as their own roles (sql/publication.sql)
    "cdc.publication_sync_config()",
    "cdc.has_replica_identity(oid)",
}


@pytest.fixture
def attacker(capture: CaptureEnv) -> Iterator[str]:
    """A role that can only log in to the source database (and write one application table)."""
    role = f"mallory_{uuid.uuid4().hex[:8]}"
    with capture.source() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    yield role
    with capture.source() as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def as_role(capture: CaptureEnv, role: str, **kwargs: Any) -> psycopg.Connection[Any]:
    dbname = psycopg.conninfo.conninfo_to_dict(capture.source_dsn)["dbname"]
    return psycopg.connect(capture.pg.dsn(dbname=str(dbname), user=role), **kwargs)


def is_superuser(capture: CaptureEnv, role: str) -> bool:
    with capture.source() as conn:
        row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return bool(row and row[0])


def set_up(capture: CaptureEnv) -> None:
    capture.extra_env["CDC_SIMULATE__ENABLED"] = "true"
    with capture.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
    capture.setup()


# ============================================================================ temp schema escalation


def test_temporary_objects_never_run_as_a_definer_functions_owner(capture: CaptureEnv, attacker: str) -> None:
    set_up(capture)
    with capture.source() as conn:
        conn.execute(sql.SQL("GRANT ALL ON t TO {}").format(sql.Identifier(attacker)))
        # An application role that may create tables: its DDL fires the event triggers.
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(attacker)))
        # Every SECURITY DEFINER function in schema cdc pins search_path with pg_temp last.
        definers = dict(
            conn.execute(
                "SELECT p.oid::regprocedure::text, p.proconfig FROM pg_proc p "
                "WHERE p.pronamespace = 'cdc'::regnamespace AND p.prosecdef"
            ).fetchall()
        )
        assert {re.sub(r",\s*", ",", f) for f in definers} == set(DEFINER_CALLS) | TRIGGER_DEFINERS, definers
        for name, config in definers.items():
            # (the DDL snapshot functions also pin the output settings their COPY text needs)
            assert config[0] == "search_path=pg_catalog, pg_temp", (name, config)
            assert not any(c.startswith("search_path") for c in config[1:]), (name, config)
        # EXECUTE: PUBLIC keeps it only where the application's roles must reach the function.
        public = {
            str(r[0])
            for r in conn.execute(
                "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'cdc'::regnamespace "
                "AND has_function_privilege('public', p.oid, 'EXECUTE')"
            ).fetchall()
        }
        assert {re.sub(r",\s*", ",", f) for f in public} == PUBLIC_FUNCTIONS, public ^ PUBLIC_FUNCTIONS
        # The control: the shape of the old await_capture (search_path = pg_catalog, pg_temp left
        # implicit), owned by the same role. The attack works on it: the test reproduces it.
        conn.execute(
            "CREATE FUNCTION public.vulnerable_slots() RETURNS bigint LANGUAGE sql SECURITY DEFINER "
            "SET search_path = pg_catalog AS 'SELECT count(*) FROM pg_replication_slots'"
        )

    def attack(call: str) -> list[str]:
        notices: list[str] = []
        with as_role(capture, attacker, autocommit=True) as conn:
            conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
            conn.execute(ATTACKER_CODE)
            for statement in SHADOWS:
                conn.execute(statement)
            with conn.transaction():
                conn.execute(call)
        return [n for n in notices if n.startswith("cdc-pwned")]

    try:
        # (once per row the view reads: one per replication slot on the server)
        assert set(attack("SELECT public.vulnerable_slots()")) == {"cdc-pwned as postgres"}
        assert is_superuser(capture, attacker)  # escalated: the attack is real
    finally:
        with capture.source() as conn:
            conn.execute(sql.SQL("ALTER ROLE {} NOSUPERUSER").format(sql.Identifier(attacker)))
            conn.execute("DROP FUNCTION public.vulnerable_slots()")

    capture.start()  # await_capture then finds a walsender to read
    for name, call in DEFINER_CALLS.items():
        assert attack(call) == [], name
        assert not is_superuser(capture, attacker), name
    # The SECURITY INVOKER paths that end in a definer: the context trigger (setting,
    # application_name and "none" messages) and a dry run with its commit guard.
    for call in (
        "UPDATE t SET v = 'b'",
        "SELECT set_config('cdc.request_id', 'r-2', true); UPDATE t SET v = 'c'",
        "SELECT set_config('application_name', 'req:r-3', true); UPDATE t SET v = 'd'",
        # DDL: the event triggers' definer functions (schema changes, publication upkeep); the
        # attacker's own statements name types qualified (its shadows would catch them itself)
        "CREATE TABLE public.mine (id pg_catalog.int4 PRIMARY KEY, x pg_catalog.int4); "
        "INSERT INTO public.mine VALUES (1, 2)",
        "ALTER TABLE public.mine ADD COLUMN y pg_catalog.text DEFAULT 'z'",
        "ALTER TABLE public.mine ALTER COLUMN x TYPE pg_catalog.int8",
        "ALTER TABLE public.mine RENAME TO mine2",
        "DROP TABLE public.mine2",
    ):
        assert attack(call) == [], call
    with as_role(capture, attacker) as conn:
        conn.execute(ATTACKER_CODE)
        for statement in SHADOWS:
            conn.execute(statement)
        conn.execute("SELECT cdc.simulate_begin()")
        conn.execute("UPDATE t SET v = 'simulated'")
        with pytest.raises(psycopg.errors.InvalidTransactionTermination):
            conn.commit()  # the commit guard fires for a plain role too
    assert not is_superuser(capture, attacker)
    # The signing key and the raw message function are out of the attacker's reach.
    with as_role(capture, attacker, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM cdc.context_key")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT cdc.session_proof('r', 'u', 1, 1, '\\x00', '\\x00')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_logical_emit_message(true, 'cdc.context', '{}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE TABLE cdc.planted (x int)")
    assert capture.stop() == 0


# ============================================================================ forged messages


def _messages(dsn: str, slot: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'test.flush', '')")
        rows = conn.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", [slot]).fetchall()
    out = []
    for (line,) in rows:
        m = re.match(r"message: transactional: \d prefix: ([^,]*), sz: \d+ content:(.*)", line, re.S)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def test_forged_context_and_error_messages_are_refused(capture: CaptureEnv, attacker: str) -> None:
    set_up(capture)
    capture.start()
    slot = f"spy_{uuid.uuid4().hex[:8]}"
    with capture.source() as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", [slot])
    with capture.source() as conn, client.request(conn, "legit-1", actor="alice"):
        conn.execute("UPDATE t SET v = 'legit' WHERE id = 1")
    signed = next(c for p, c in _messages(capture.source_dsn, slot) if p == "cdc.context")
    assert json.loads(signed)["request_id"] == "legit-1" and '"mac":' in signed
    forged_body = {
        "request_id": "forged-ctx",
        "actor": "ceo",
        "application_name": "admin-console",
        "db_user": "admin",
        "client_addr": "10.9.9.9",
        "backend_pid": 1,
        "source": "client",
        "extra": {},
    }
    made_up_mac = json.dumps({**forged_body, "request_id": "forged-mac"})[:-1] + ',"mac":"' + "ab" * 32 + '"}'
    forged_error = json.dumps(
        {
            "request_id": "legit-1",
            "xid": None,
            "error_type": "FraudDetected",
            "message": "made-up root cause",
            "location": "evil.py:1",
            "actor": "alice",
            "at": "2026-01-01T00:00:00+00:00",
            "db_user": "alice",
            "backend_pid": 1,
        }
    )
    with structlog.testing.capture_logs() as logs:
        # A raw pg_logical_emit_message: setup (as a superuser here) revoked it from PUBLIC, so
        # only a superuser's session can still write one. The MAC refuses it all the same.
        with capture.source() as conn:
            for content in (json.dumps(forged_body), made_up_mac, signed):  # unsigned, bad MAC, replayed
                with conn.transaction():
                    conn.execute("SELECT pg_logical_emit_message(true, 'cdc.context', %s::text)", [content])
                    conn.execute("INSERT INTO t VALUES ((SELECT max(id) + 1 FROM t), 'forged')")
            conn.execute("SELECT pg_logical_emit_message(false, 'cdc.error', %s::text)", [forged_error])
        capture.wait_caught_up()
    with Store(capture.store_dsn, schema=capture.schema) as reader:
        forged_rows = [
            m
            for m in reversed(reader.mutation_log(table="t").mutations)
            if (m.after or {}).get("v") == "forged"
        ]
    with capture.store() as store:
        flags = store.execute(
            "SELECT t.flags FROM transactions t WHERE t.position = ANY(%s) ORDER BY t.position",
            [[m.position for m in forged_rows]],
        ).fetchall()
        stored = ""
        for table in ("transactions", "context_changes", "changes", "request_errors"):
            stored += str(
                store.execute(
                    sql.SQL("SELECT array_agg(r::text) FROM {} r").format(sql.Identifier(table))
                ).fetchone()
            )
    assert len(forged_rows) == 3
    for m in forged_rows:  # stored, without the forged context
        assert m.request_id is None
        assert m.context is None or (m.context["db_user"] == "postgres" and m.context["source"] == "none")
    assert [f & CONTEXT_REJECTED for (f,) in flags] == [CONTEXT_REJECTED] * 3  # docs/store.md
    for claim in (
        "forged-ctx",
        "forged-mac",
        "admin-console",
        "10.9.9.9",
        "FraudDetected",
        "made-up root cause",
    ):
        assert claim not in stored, claim
    with Store(capture.store_dsn) as store:
        record = store.request("legit-1")
    assert record.error_type is None and record.committed_count == 1  # the replay counted nothing
    rejected = [e for e in logs if e["event"] == "context_message_rejected"]
    assert sorted({(e["prefix"], e["reason"]) for e in rejected}) == [
        ("cdc.context", "bad_mac"),
        ("cdc.context", "other_transaction"),
        ("cdc.context", "unsigned"),
        ("cdc.error", "unsigned"),
    ]
    assert all(set(e) == {"event", "log_level", "prefix", "lsn", "reason"} for e in rejected)  # no body
    metrics = capture.daemon.metrics if capture.daemon else None
    assert metrics is not None
    assert metrics.context_rejected.labels(prefix="cdc.context")._value.get() == 3
    assert metrics.context_rejected.labels(prefix="cdc.error")._value.get() == 1
    # A plain role cannot write a raw message at all (setup ran as a superuser).
    with as_role(capture, attacker, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_logical_emit_message(true, 'cdc.context', '{}')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_logical_emit_message(false, 'cdc.error', '\\x7b7d'::bytea)")
    status = CliRunner().invoke(
        cli, ["status"], env={"CDC_SOURCE_DSN": capture.source_dsn, "CDC_STORE_DSN": capture.store_dsn,
                             "CDC_STORE__SCHEMA": capture.schema, "CDC_SOURCE__SLOT": capture.slot}
    )  # fmt: skip
    assert "pg_logical_emit_message revoked from PUBLIC" in status.output, status.output
    with capture.source() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
    assert capture.stop() == 0


# ============================================================================ attribution


def test_an_error_cannot_be_attached_to_another_sessions_request(capture: CaptureEnv, attacker: str) -> None:
    set_up(capture)
    with capture.source() as conn:
        conn.execute(sql.SQL("GRANT ALL ON t TO {}").format(sql.Identifier(attacker)))
    capture.start()
    with capture.source() as conn:
        victim_pid = conn.info.backend_pid
        with client.request(conn, "victim-1", actor="alice"):
            conn.execute("UPDATE t SET v = 'paid' WHERE id = 1")
        # Its own failed request: the error is reported by the request's session (proven).
        with pytest.raises(ZeroDivisionError), client.request(conn, "own-1", actor="alice"):
            conn.execute("UPDATE t SET v = 'attempt' WHERE id = 1")
            raise ZeroDivisionError("the request's own failure")
    # The caller owns the transaction and SQL fails: the error goes over a second connection,
    # which proves it is the first session's with the token.
    with capture.source() as conn:
        conn.autocommit = False
        owner_pid = conn.info.backend_pid
        with pytest.raises(psycopg.errors.DivisionByZero), client.request(conn, "own-2"):
            conn.execute("UPDATE t SET v = 'attempt 2' WHERE id = 1")
            conn.execute("SELECT 1 / 0")
        conn.rollback()
    with as_role(capture, attacker, autocommit=True) as conn:
        mallory_pid = conn.info.backend_pid
        for request_id in ("victim-1", "own-1"):
            conn.execute(
                "SELECT cdc.report_error(%s, 'FraudDetected', 'made-up root cause', 'evil.py:1')",
                [request_id],
            )
        # A made-up session token claiming the victim's session is ignored.
        conn.execute(
            "SELECT cdc.report_error('own-2', 'FraudDetected', 'made-up root cause', 'evil.py:1', NULL, %s)",
            [f"{owner_pid}.1.{'0' * 64}"],
        )
    capture.wait_caught_up()

    with Store(capture.store_dsn) as store:
        victim, own, own2 = (store.request(r) for r in ("victim-1", "own-1", "own-2"))
    # Kept as reported (who reported it, as the source stamped it), never as the root cause.
    assert victim.error_type is None and victim.error is not None
    assert (victim.error.error_type, victim.error_db_user, victim.error_backend_pid) == (
        "FraudDetected",
        attacker,
        mallory_pid,
    )
    assert victim.error_attribution == "other_session" and not victim.error_attributed
    assert ("postgres", victim_pid) in victim.sessions
    # The request's own errors stay (the attacker's cannot replace them) and are attributed.
    assert (own.error_type, own.error_message, own.error_attribution) == (
        "ZeroDivisionError",
        "the request's own failure",
        "own_session",
    )
    assert own.error_backend_pid == victim_pid and own.error_proven
    assert (own2.error_type, own2.error_attribution, own2.error_backend_pid) == (
        "DivisionByZero",
        "own_session",
        owner_pid,
    )

    why = CliRunner().invoke(cli, ["why", "victim-1", "--store", capture.store_dsn])
    assert why.exit_code == 0, why.output
    assert (
        f"reported by another session (db_user {attacker}, pid {mallory_pid}): not attributed" in why.output
    )
    assert not re.search(r"ROOT CAUSE\s+FraudDetected", why.output), why.output
    own_why = CliRunner().invoke(cli, ["why", "own-1", "--store", capture.store_dsn])
    assert re.search(r"ROOT CAUSE\s+ZeroDivisionError: the request's own failure", own_why.output), (
        own_why.output
    )
    with TestClient(create_app(capture.store_dsn, schema=capture.schema, open_access=True)) as web:
        api = web.get("/api/v1/requests/victim-1").json()
        assert api["error"]["attributed"] is False and api["error"]["reported_by"]["db_user"] == attacker
        assert web.get("/api/v1/requests/own-1").json()["error"]["attributed"] is True
        page = web.get("/requests/victim-1").text
        assert "not attributed" in page and 'Root cause</dt><dd class="cause">FraudDetected' not in page
    from cdc import History

    with History(capture.store_dsn, schema=capture.schema) as h:
        assert not h.request("victim-1").error_attributed
    assert capture.stop() == 0


def test_key_rotation_while_capturing_and_teardown(capture: CaptureEnv) -> None:
    """`cdc setup --rotate-context-key` while the daemon runs: messages signed with either key
    verify (the daemon picks the new key up at its first message); teardown gives
    pg_logical_emit_message back to PUBLIC, as it was before setup."""
    from cdc.setup import teardown
    from cdc.source_context import signing_status

    set_up(capture)
    capture.start()
    with capture.source() as conn:
        before = signing_status(conn)
        with client.request(conn, "before-rotation"):
            conn.execute("UPDATE t SET v = 'one' WHERE id = 1")
    result = CliRunner().invoke(
        cli,
        ["setup", "--rotate-context-key"],
        env={"CDC_SOURCE_DSN": capture.source_dsn, "CDC_STORE_DSN": capture.store_dsn,
             "CDC_STORE__SCHEMA": capture.schema, "CDC_SOURCE__SLOT": capture.slot,
             "CDC_SOURCE__PUBLICATION": capture.slot, "CDC_SIMULATE__ENABLED": "true"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with capture.source() as conn:
        after = signing_status(conn)
        assert after.key_id != before.key_id and after.previous_key_id == before.key_id
        assert f"previous {before.key_id} still accepted" in result.output
        with client.request(conn, "after-rotation"):
            conn.execute("UPDATE t SET v = 'two' WHERE id = 1")
        conn.execute("SET cdc.request_id = 'setting-after-rotation'")
        conn.execute("UPDATE t SET v = 'three' WHERE id = 1")
    capture.wait_caught_up()
    with Store(capture.store_dsn, schema=capture.schema) as reader:
        tagged = [m.request_id for m in reversed(reader.mutation_log(table="t", op="UPDATE").mutations)]
    assert tagged == ["before-rotation", "after-rotation", "setting-after-rotation"]
    # The rotation wrote the key table: never published, never captured.
    with capture.source() as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_publication_tables WHERE schemaname = 'cdc'"
        ).fetchone() == (0,)
        pads = conn.execute(
            "SELECT encode(ipad, 'hex'), encode(opad, 'hex'), encode(previous_ipad, 'hex') FROM cdc.context_key"
        ).fetchone()
    assert pads is not None
    with capture.store() as store:
        assert store.execute("SELECT count(*) FROM table_names WHERE schema_name = 'cdc'").fetchone() == (0,)
        dump = "".join(
            str(
                store.execute(
                    sql.SQL("SELECT array_agg(r::text) FROM {} r").format(sql.Identifier(t))
                ).fetchone()
            )
            for t in ("changes", "transactions", "context_changes", "table_schemas", "table_names")
        )
    assert not any(pad in dump for pad in pads)
    assert capture.daemon is not None
    assert capture.daemon.metrics.context_rejected.labels(prefix="cdc.context")._value.get() == 0
    assert capture.stop() == 0
    with capture.source() as conn:
        assert signing_status(conn).emit_revoked
    teardown(capture.config)
    with capture.source() as conn:
        public = conn.execute(
            "SELECT bool_and(has_function_privilege('public', oid, 'EXECUTE')) FROM pg_proc "
            "WHERE proname = 'pg_logical_emit_message'"
        ).fetchone()
        assert public == (True,)
        assert conn.execute("SELECT to_regnamespace('cdc')").fetchone() == (None,)
