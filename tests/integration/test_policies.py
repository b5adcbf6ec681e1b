"""Sensitive columns never reach the store in clear; a lost slot re-created records a gap."""

from __future__ import annotations

import json

import psycopg
import pytest
from click.testing import CliRunner

from cdc import client
from cdc.cli import main as cli
from cdc.errors import ConfigError, SlotLostError
from cdc.exit_codes import ExitCode
from cdc.policies import MASK, hash_key_id, hash_value
from cdc.query import Store
from cdc.setup import setup
from tests.capture_env import CaptureEnv, rebuild, source_rows, table_id

SECRET = "s3cr3t-digest-0xDEADBEEF"
HASH_KEY = "test-hash-key-0123456789abcdef"


def store_dump(env: CaptureEnv) -> str:
    """Every row of every table of the store schema, as text."""
    with env.store() as store:
        tables = [
            r[0]
            for r in store.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (env.schema,)
            ).fetchall()
        ]
        return "\n".join(
            str(store.execute(f'SELECT t::text FROM "{env.schema}"."{t}" t').fetchall()) for t in tables
        )


def test_excluded_hashed_and_masked_columns(capture: CaptureEnv) -> None:
    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__PASSWORD_DIGEST"] = "exclude"
    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__EMAIL"] = "hash"
    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__SSN"] = "mask"
    capture.extra_env["CDC_POLICIES__HASH_KEY"] = HASH_KEY
    with capture.source() as conn:
        conn.execute(
            "CREATE TABLE users (id int PRIMARY KEY, email text, ssn text, password_digest text, n int)"
        )
        conn.execute("INSERT INTO users VALUES (1, 'a@b.com', '123-45-6789', %s, 0)", (SECRET + "-baseline",))
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO users VALUES (2, 'c@d.com', '987-65-4321', %s, 0)", (SECRET,))
        conn.execute("UPDATE users SET password_digest = %s, n = 1", (SECRET + "-new",))
        conn.execute("DELETE FROM users WHERE id = 1")
    capture.wait_caught_up()
    dump = store_dump(capture)
    for clear in (SECRET, "a@b.com", "c@d.com", "123-45-6789", "987-65-4321"):
        assert clear not in dump
    with capture.store() as store:
        images = [
            (op, json.loads(image))
            for op, image in store.execute(
                "SELECT op, image FROM changes WHERE table_id = %s ORDER BY position, ordinal",
                (table_id(capture, "users"),),
            ).fetchall()
        ]
    insert = next(image for op, image in images if op == "I")
    assert insert["password_digest"] is None  # excluded: never stored
    assert insert["email"] == hash_value("c@d.com", HASH_KEY.encode()) and insert["ssn"] == MASK
    with Store(capture.store_dsn) as reader:
        updates = [m for m in reader.mutation_log(table="users").mutations if m.op == "UPDATE"]
    assert updates and all(m.changed == ("n",) for m in updates)  # an excluded column never changes
    # The stored schema records each column's policy (undo reads it to refuse placeholders).
    with capture.store() as store:
        recorded = store.execute(
            "SELECT DISTINCT c->>'name', c->>'policy' FROM table_schemas, jsonb_array_elements(columns) c "
            "WHERE table_id = %s AND c ? 'policy' ORDER BY 1",
            (table_id(capture, "users"),),
        ).fetchall()
    assert recorded == [("email", "hash"), ("password_digest", "exclude"), ("ssn", "mask")]
    assert capture.stop() == 0


def test_a_dictionary_does_not_reverse_a_hashed_value(capture: CaptureEnv) -> None:
    """The issue's attack: a bare SHA-256 of an e-mail address is reversed by hashing a list of
    likely addresses. The keyed digest matches none of them without the key."""
    import hashlib

    import orjson

    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__EMAIL"] = "hash"
    capture.extra_env["CDC_POLICIES__HASH_KEY"] = HASH_KEY
    with capture.source() as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO users VALUES (1, 'alice@example.com'), (2, 'bob@example.com')")
        conn.execute("INSERT INTO users VALUES (3, 'alice@example.com')")
    capture.wait_caught_up()
    with capture.store() as store:
        stored = {
            json.loads(key)[0]: json.loads(image)["email"]
            for key, image in store.execute(
                "SELECT key_text, image FROM changes WHERE table_id = %s", (table_id(capture, "users"),)
            ).fetchall()
        }
    dictionary = [f"{name}@example.com" for name in ("alice", "bob", "carol", "dave")]
    guesses = set()
    for word in dictionary:
        for encoded in (word.encode(), orjson.dumps(word)):
            digest = hashlib.sha256(encoded).hexdigest()
            guesses |= {digest, "sha256:" + digest}
        guesses.add(hash_value(word, b"another key of 16+ bytes"))
    for value in stored.values():
        assert value.startswith(f"hmac-sha256:{hash_key_id(HASH_KEY.encode())}:")
        assert value not in guesses and value.rsplit(":", 1)[1] not in guesses
    assert stored[1] == stored[3] != stored[2]  # equal values still match under one key
    assert capture.stop() == 0


def test_a_hash_policy_without_a_key_is_refused(capture: CaptureEnv) -> None:
    from cdc.errors import ConfigError

    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__EMAIL"] = "hash"
    with pytest.raises(ConfigError, match=r"policies\.hash_key"):
        capture.setup()


def test_clear_value_never_in_a_reported_error(capture: CaptureEnv) -> None:
    """The issue's leak: DETAIL ("Key (email)=(...)", "Failing row contains (...)") quoted the
    clear value of hashed, masked and excluded columns into the request's stored error."""
    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__EMAIL"] = "hash"
    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__SSN"] = "mask"
    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__SECRET"] = "exclude"
    capture.extra_env["CDC_POLICIES__HASH_KEY"] = HASH_KEY
    with capture.source() as conn:
        conn.execute(
            "CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, ssn text CHECK (ssn <> '000-00-0000'), "
            "secret text NOT NULL)"
        )
        conn.execute("INSERT INTO users VALUES (1, 'alice@example.com', '123-45-6789', 'x')")
    capture.setup()
    capture.start()
    clear = ("alice@example.com", "000-00-0000", "hunter2-excluded")
    with psycopg.connect(capture.source_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation), client.request(conn, "dup-email"):
            conn.execute("INSERT INTO users VALUES (2, 'alice@example.com', '1', 'x')")
        with pytest.raises(psycopg.errors.CheckViolation), client.request(conn, "bad-ssn"):
            conn.execute("INSERT INTO users VALUES (3, 'c@example.com', '000-00-0000', 'hunter2-excluded')")
        with pytest.raises(psycopg.errors.NotNullViolation), client.request(conn, "no-secret"):
            conn.execute("INSERT INTO users VALUES (4, 'hunter2-excluded', '000-00-0001', NULL)")
    capture.wait_caught_up()
    with Store(capture.store_dsn) as store:
        records = {rid: store.request(rid) for rid in ("dup-email", "bad-ssn", "no-secret")}
    assert records["dup-email"].error_type == "UniqueViolation"
    assert records["dup-email"].error_message is not None
    assert "SQLSTATE 23505" in records["dup-email"].error_message
    for record in records.values():
        assert record.error_message and not any(c in record.error_message for c in clear), (
            record.error_message
        )
    dump = store_dump(capture)
    for value in clear:
        assert value not in dump
    for rid in records:
        why = CliRunner().invoke(cli, ["why", rid, "--store", capture.store_dsn, "--format", "json"])
        assert why.exit_code == 0, why.output
        assert not any(c in why.output for c in clear), why.output
    assert capture.stop() == 0


def test_policy_on_a_key_column_is_refused_by_setup(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE k (a int, b text, PRIMARY KEY (b, a))")
        conn.execute("CREATE TABLE nokey (x int, y text)")
        conn.execute("ALTER TABLE nokey REPLICA IDENTITY FULL")
    policies = {
        "CDC_COLUMNS__PUBLIC.T__ID": "hash",
        "CDC_COLUMNS__PUBLIC.T__V": "mask",  # not a key column: fine
        "CDC_COLUMNS__PUBLIC.K__A": "exclude",
        "CDC_COLUMNS__PUBLIC.NOKEY__Y": "mask",  # no key: every column names the row
        "CDC_COLUMNS__PUBLIC.LATER__ID": "hash",  # not there yet: checked when it appears
    }
    capture.extra_env.update(policies)
    capture.extra_env["CDC_POLICIES__HASH_KEY"] = HASH_KEY
    with pytest.raises(ConfigError) as refused:
        setup(capture.config)
    assert refused.value.problems == [
        "columns.public.k.a: a is a key column of public.k: it names the row, so it cannot be excluded; "
        "remove the policy",
        "columns.public.nokey.y: y is a key column of public.nokey (the table has no key: all its columns "
        "name a row): it names the row, so it cannot be masked; remove the policy",
        "columns.public.t.id: id is a key column of public.t: it names the row, so it cannot be hashed; "
        "remove the policy",
    ]
    with capture.source() as conn:  # nothing was created
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (capture.slot,)
        ).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_publication WHERE pubname = %s", (capture.slot,)
        ).fetchone() == (0,)
    result = CliRunner().invoke(cli, ["setup"], env={**capture.config_env(), "CDC_CONFIG": None})
    assert result.exit_code == ExitCode.CONFIG
    assert (
        "columns.public.t.id: id is a key column of public.t" in result.stderr
        and "Traceback" not in result.output
    )


def test_policy_on_a_key_column_is_ignored_and_reported_by_capture(capture: CaptureEnv) -> None:
    """The second line of defence: a key policy that reaches capture (the key changed after
    `cdc setup`, or setup ran with another config) is not applied, and said so."""
    with capture.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t VALUES (1, 'one')")
    capture.setup()
    capture.extra_env["CDC_COLUMNS__PUBLIC.T__ID"] = "hash"
    capture.extra_env["CDC_COLUMNS__PUBLIC.T__V"] = "mask"
    capture.extra_env["CDC_POLICIES__HASH_KEY"] = HASH_KEY
    daemon = capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO t VALUES (2, 'two')")
    capture.wait_caught_up()
    with capture.store() as store:
        images = [
            json.loads(r[0]) for r in store.execute("SELECT image FROM changes ORDER BY position").fetchall()
        ]
        last_error = store.execute("SELECT last_error FROM capture_state").fetchone()
    assert images == [{"id": 1, "v": "one"}, {"id": 2, "v": MASK}]  # the key in clear, the rest masked
    assert daemon.last_error is not None and "columns.public.t.id" in daemon.last_error
    assert last_error is not None and "columns.public.t.id" in last_error[0]
    assert capture.stop() == 0


def test_recreate_lost_slot_records_a_gap_and_a_fresh_baseline(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE g (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO g VALUES (1, 'a'), (2, 'b')")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE g SET v = 'a2' WHERE id = 1")
    capture.wait_caught_up()
    capture.stop()
    with capture.source() as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (capture.slot,))
        conn.execute("DELETE FROM g WHERE id = 2")  # lost: nobody captures it
        conn.execute("INSERT INTO g VALUES (3, 'c')")
    with pytest.raises(SlotLostError, match="recreate-slot"):
        capture.setup()
    setup(capture.config, recreate_slot=True)
    assert rebuild(capture, "public.g") == source_rows(capture, "public.g")
    with capture.store() as store:
        gaps = store.execute("SELECT count(*) FROM gaps").fetchone()
    assert gaps == (1,)
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE g SET v = 'c2' WHERE id = 3")
    capture.wait_caught_up()
    assert rebuild(capture, "public.g") == source_rows(capture, "public.g")
    assert capture.stop() == 0


__all__ = ["psycopg"]
