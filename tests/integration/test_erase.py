"""`cdc erase`: a row's images leave every table of the store; the erasure is recorded without
them; a live row, an unchecked source and an unknown row are refused."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from click.testing import CliRunner, Result
from psycopg import sql

from cdc.cli_retention import erase
from cdc.config import RetentionConfig
from cdc.history import History
from cdc.store.retention import Pruner, bucket_start, ensure_partitions
from tests.capture_env import CaptureEnv, source_rows

DAY = timedelta(days=1)
EMAIL = "zq-erase-me-7731@example.org"
NAME = "Zephyrine Quuxworth"
NOTE = "zq-note-secret-5519"
SECRETS = (EMAIL, NAME, "Zephyrine", NOTE)


def run_erase(capture: CaptureEnv, *args: str, source: str | None = None) -> Result:
    runner = CliRunner()
    return runner.invoke(
        erase,
        [
            *args,
            "--store",
            capture.store_dsn,
            "--schema",
            capture.schema,
            "--source",
            source or capture.source_dsn,
        ],
        env={"CDC_CONFIG": "", "CDC_SOURCE_DSN": "", "CDC_STORE_DSN": ""},
        catch_exceptions=False,
    )


def dump_schema(capture: CaptureEnv) -> dict[str, str]:
    """Every table of the store schema (partitions, kept rows, requests, erasures...) as text."""
    out: dict[str, str] = {}
    with capture.store() as conn:
        names = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
            (capture.schema,),
        ).fetchall()
        for (name,) in names:
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(capture.schema, name))
            ).fetchall()
            out[name] = "\n".join(r[0] for r in rows)
    return out


def move_history_to_the_past(capture: CaptureEnv, days: int = 4) -> None:
    """Spread what was captured over the last ``days`` days (in commit order)."""
    now = datetime.now(UTC)
    past = bucket_start(now, DAY) - days * DAY
    with capture.store() as store:
        with store.transaction():
            ensure_partitions(store, capture.schema, past, now)
        with store.transaction():
            for table in ("mutations", "transactions"):
                store.execute(
                    sql.SQL(
                        "WITH r AS (SELECT position, (row_number() OVER (ORDER BY position) - 1)::float8 "
                        "  / greatest(count(*) OVER () - 1, 1) AS f FROM transactions) "
                        "UPDATE {} t SET committed_at = %s + r.f * %s FROM r WHERE r.position = t.position"
                    ).format(sql.Identifier(table)),
                    (past, (days - 1) * DAY),
                )


def test_erase_removes_every_image_and_records_it(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text, name text, plan text)")
        conn.execute("CREATE TABLE notes (x int, y text)")
        conn.execute("ALTER TABLE notes REPLICA IDENTITY FULL")
        conn.execute(
            "INSERT INTO users VALUES (42, %s, NULL, 'free'), (7, 'seven@example.org', 'Seven', 'free')",
            (EMAIL,),
        )
        conn.execute(
            "INSERT INTO notes VALUES (1, %s), (1, %s), (1, %s), (2, 'public note')", (NOTE, NOTE, NOTE)
        )
    capture.setup()  # the rows above: SNAPSHOT images
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE users SET name = %s WHERE id = 42", (NAME,))
        conn.execute("UPDATE users SET plan = 'pro' WHERE id = 7")
    capture.wait_caught_up()
    capture.stop()
    # A prune turns the old images into keyframes: those must go too.
    move_history_to_the_past(capture)
    with Pruner(capture.store_dsn, capture.schema, RetentionConfig(default=DAY)) as pruner:
        report = pruner.prune()
    assert report.keyframes >= 5  # users 42 and 7, three identical notes rows
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE users SET plan = 'team' WHERE id = 42")
    capture.wait_caught_up()
    assert any(EMAIL in text for text in dump_schema(capture).values())

    # Still on the source: refused, and nothing changes.
    before = dump_schema(capture)
    refused = run_erase(capture, "users", "--id", "42", "--yes")
    assert refused.exit_code == 2, refused.output
    assert "still exists on the source" in refused.output and "--force" in refused.output
    # The source cannot be reached: refused too.
    unreachable = run_erase(
        capture, "users", "--id", "42", "--yes", source="host=127.0.0.1 port=1 dbname=x connect_timeout=2"
    )
    assert unreachable.exit_code == 2 and "--force" in unreachable.output
    # No such row in the history: refused.
    unknown = run_erase(capture, "users", "--id", "999999", "--yes")
    assert unknown.exit_code == 2 and "no history" in unknown.output
    assert dump_schema(capture) == before

    with capture.source() as conn:
        conn.execute("DELETE FROM users WHERE id = 42")
        conn.execute("DELETE FROM notes WHERE y = %s", (NOTE,))
    capture.wait_caught_up()
    # Asking for confirmation: "no" changes nothing.
    declined = CliRunner().invoke(
        erase,
        ["users", "--id", "42", "--store", capture.store_dsn, "--source", capture.source_dsn],
        input="n\n",
        env={"CDC_CONFIG": ""},
    )
    assert declined.exit_code == 1 and "will be removed" in declined.output
    done = run_erase(capture, "users", "--id", "42", "--yes", "--actor", "dpo@example.org")
    assert done.exit_code == 0, done.output
    assert "erased" in done.output and "WAL" in done.output
    keyless = run_erase(
        capture, "notes", "--id", json.dumps({"x": 1, "y": NOTE}), "--yes", "--format", "json"
    )
    assert keyless.exit_code == 0, keyless.output
    notes_report = json.loads(keyless.output)
    assert notes_report["keyframes_removed"] == 3

    # No image of either row anywhere in the store.
    for table, text in dump_schema(capture).items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} still in {table}"
    with capture.store() as conn:
        records = conn.execute(
            "SELECT actor, table_name, key_sha256, key_columns, mutations_removed, keyframes_removed, "
            "source_check, forced FROM erasures ORDER BY erasure_id"
        ).fetchall()
    digest = hashlib.sha256(b'{"id":42}').hexdigest()
    assert records[0][:4] == ("dpo@example.org", "public.users", digest, ["id"])
    # its keyframe (the pruned SNAPSHOT and UPDATE), the UPDATE to team, the DELETE
    assert records[0][4] == 3 and records[0][5] == 1 and records[0][6:] == ("absent", False)
    assert records[1][1] == "public.notes" and records[1][3] == ["x", "y"] and records[1][5] == 3

    # The history is consistent without them; capture goes on.
    with capture.source() as conn:
        conn.execute("UPDATE users SET plan = 'gold' WHERE id = 7")
    capture.wait_caught_up()
    with History(capture.store_dsn, schema=capture.schema) as h:
        view = h.at(version=h.current_version())
        for table in ("public.users", "public.notes"):
            rows = view.table(table).collect()
            assert rows is not None
            assert Counter(json.dumps(r, sort_keys=True) for r in rows) == source_rows(capture, table)
        assert next(m.op for m in h.row_history("users", 7)) == "SNAPSHOT"
    again = run_erase(capture, "users", "--id", "42", "--yes")
    assert again.exit_code == 2 and "no history" in again.output
    assert capture.stop() == 0


def test_erase_with_force_and_a_time_window(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO users VALUES (5, %s)", (EMAIL,))
        conn.execute("UPDATE users SET email = 'new-owner@example.org' WHERE id = 5")
    capture.wait_caught_up()
    # Nothing in a window in the future.
    empty = run_erase(
        capture, "users", "--id", "5", "--yes", "--force", "--between", "2100-01-01", "2100-01-02"
    )
    assert empty.exit_code == 2 and "in that time window" in empty.output
    # Live on the source, erased anyway with --force; only the window's images go.
    with capture.store() as conn:
        first, last = conn.execute(
            "SELECT min(committed_at), max(committed_at) FROM mutations WHERE table_name = 'public.users'"
        ).fetchone()  # type: ignore[misc]
    forced = run_erase(
        capture, "users", "--id", "5", "--yes", "--force", "--format", "json",
        "--between", (first - timedelta(seconds=1)).isoformat(), (last + timedelta(seconds=1)).isoformat(),
    )  # fmt: skip
    assert forced.exit_code == 0, forced.output
    report: dict[str, Any] = json.loads(forced.output)
    assert report["mutations_removed"] == 2 and report["source_check"] == "live" and report["forced"]
    assert all(EMAIL not in text for text in dump_schema(capture).values())
    assert capture.stop() == 0


def test_erase_removes_keyframes_staged_for_the_next_prune(pg: Any) -> None:
    """Keyframes computed ahead of a prune (pending, above the floor) are images too: erasing
    the row removes them, whatever the window, and voids the staging (the prune recomputes)."""
    import uuid

    from cdc.store.retention import erase_row
    from tests.store_builder import INT8, TEXT, StoreBuilder

    name = f"t_{uuid.uuid4().hex[:8]}"
    dsn = pg.create_database(name)
    b = StoreBuilder(dsn)
    try:
        start = datetime(2026, 3, 1, tzinfo=UTC)
        b.table("users", {"id": INT8, "email": TEXT})
        with b.txn(start + timedelta(hours=1)) as t:
            t.insert("users", {"id": 42, "email": EMAIL})
            t.insert("users", {"id": 7, "email": "seven@example.org"})
        with b.txn(start + DAY + timedelta(hours=1)) as t:
            t.update("users", 7, {"email": "seven@example.net"})
        b.finish(baseline=b.positions[0])
        now = start + 2 * DAY + timedelta(hours=2)
        config = RetentionConfig(default=DAY, partition_interval=DAY)
        with Pruner(dsn, "cdc_history", config) as pruner:
            pruner.prepare(now)
            staged = pruner.stage(now)
            assert staged is not None and staged["keyframes"] == 2
            # A window that holds none of the row's changes nor the keyframe's time (the horizon):
            # the pending keyframe goes all the same.
            with psycopg.connect(dsn, autocommit=True) as conn:
                report = erase_row(
                    conn, "cdc_history", "public.users", {"id": 42}, ["id"], actor="test",
                    source_check="not_checked", forced=True,
                    since=start + 5 * DAY, until=start + 6 * DAY,
                )  # fmt: skip
                assert report.keyframes_removed == 1 and report.mutations_removed == 1
                left = conn.execute(
                    "SELECT count(*) FILTER (WHERE keyframe), (SELECT staged FROM cdc_history.retention_state) "
                    "FROM cdc_history.mutations_keep"
                ).fetchone()
                assert left == (1, None)
            # The row's own images go with a plain erasure; the prune then computes its keyframes.
            with psycopg.connect(dsn, autocommit=True) as conn:
                erase_row(
                    conn, "cdc_history", "public.users", {"id": 42}, ["id"], actor="test",
                    source_check="not_checked", forced=True,
                )  # fmt: skip
            pruned = pruner.prune(now, stage=False)  # (prune() would stage again first)
        assert not pruned.staged and pruned.keyframes == 1
        with psycopg.connect(dsn, autocommit=True) as conn:
            texts = conn.execute("SELECT t::text FROM cdc_history.mutations_all t").fetchall()
        assert all(EMAIL not in r[0] for r in texts)
        with History(dsn, schema="cdc_history") as h:
            view = h.at(version=h.current_version())
            assert view.table("users").collect() == [{"id": 7, "email": "seven@example.net"}]
    finally:
        b.close()
        pg.drop_database(name)


def test_erase_follows_the_row_through_its_key_changes(capture: CaptureEnv) -> None:
    """The issue's leftover: images of the row under its earlier keys (its SNAPSHOT, a keyframe,
    the UPDATEs before the key changed) stayed after erasing it by its final key."""
    from cdc.store.retention import canonical_key_sha256, linked_keys

    other = "zq-other-row-that-reused-key-1@example.org"
    with capture.source() as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
        conn.execute("INSERT INTO users VALUES (1, %s, NULL)", (EMAIL,))
    capture.setup()  # SNAPSHOT under key 1
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE users SET name = %s WHERE id = 1", (NAME,))
    capture.wait_caught_up()
    capture.stop()
    move_history_to_the_past(capture)  # then a prune: a keyframe under key 1
    with Pruner(capture.store_dsn, capture.schema, RetentionConfig(default=DAY)) as pruner:
        assert pruner.prune().keyframes >= 1
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE users SET id = 2, name = %s WHERE id = 1", (NAME + " 2",))
        conn.execute("INSERT INTO users VALUES (1, %s, 'another row')", (other,))  # key 1 reused
        conn.execute("UPDATE users SET id = 3 WHERE id = 2")
        conn.execute("UPDATE users SET email = %s WHERE id = 3", (NOTE,))
        conn.execute("DELETE FROM users WHERE id = 3")
    capture.wait_caught_up()
    with capture.store() as conn:
        keys = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT key->>'id' FROM mutations_all WHERE table_name = 'public.users' "
                "AND (after->>'email' = %s OR before->>'email' = %s)",
                (EMAIL, EMAIL),
            ).fetchall()
        }
        assert keys == {"1", "2", "3"}  # the row's images under its three keys
        assert conn.execute("SELECT count(*) FROM mutations_keep WHERE keyframe").fetchone()[0] >= 1  # type: ignore[index]
        # Named by an old key, the row is followed forwards too.
        forward = linked_keys(conn, capture.schema, "public.users", {"id": 1})
        assert {s[0]["id"] for s in forward} == {1, 2, 3}

    done = run_erase(capture, "users", "--id", "3", "--yes", "--format", "json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    per_key = {k["key_sha256"]: k["removed"] for k in report["keys"]}
    digests = {i: hashlib.sha256(f'{{"id":{i}}}'.encode()).hexdigest() for i in (1, 2, 3)}
    assert digests[3] == canonical_key_sha256("public.users", {"id": 3}) == report["key_sha256"]
    assert set(per_key) == set(digests.values()) and all(per_key[d] > 0 for d in digests.values())
    for table, text in dump_schema(capture).items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} still in {table}"
    with capture.store() as conn:
        for view in ("mutations_all", "mutations_keep"):
            left = conn.execute(
                sql.SQL("SELECT t::text FROM {} t WHERE table_name = 'public.users'").format(
                    sql.Identifier(view)
                )
            ).fetchall()
            assert all(EMAIL not in r[0] and NAME not in r[0] for r in left), view
        recorded = conn.execute("SELECT keys FROM erasures").fetchone()
        assert recorded is not None and sorted(k["key_sha256"] for k in recorded[0]) == sorted(
            digests.values()
        )
        assert "{" not in json.dumps([k["key_sha256"] for k in recorded[0]])  # hashes, no key values
    # The row that reused key 1 afterwards is another row: its history stays.
    with History(capture.store_dsn, schema=capture.schema) as h:
        assert h.at(version=h.current_version()).table("users").get(1) == {
            "id": 1,
            "email": other,
            "name": "another row",
        }
        assert [m.op for m in h.row_history("users", 1)] == ["INSERT"]
    assert capture.stop() == 0
