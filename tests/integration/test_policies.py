"""Sensitive columns never reach the store in clear; a lost slot re-created records a gap."""

from __future__ import annotations

import json

import psycopg
import pytest
from click.testing import CliRunner

from cdc.cli import main as cli
from cdc.errors import ConfigError, SlotLostError
from cdc.exit_codes import ExitCode
from cdc.policies import MASK, hash_value
from cdc.setup import setup
from tests.capture_env import CaptureEnv, rebuild, source_rows, table_id

SECRET = "s3cr3t-digest-0xDEADBEEF"


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
    assert insert["email"] == hash_value("c@d.com") and insert["ssn"] == MASK
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
