"""`cdc state history|blame|at` and `cdc why` against a real store (click's CliRunner, TZ=UTC)."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from cdc.cli_readers import parse_time, state, why
from cdc.devdb import LocalPostgres
from cdc.errors import UsageError
from cdc.render import MUTATION_CSV_FIELDS
from tests.store_builder import REQ_FAILED, REQ_PLAN, StoreBuilder, at, build_seed_000

SEED_HISTORY = """\
  public.users id=42  (4 mutations)

  2026-03-10 12:00  INSERT  email=a@b.com, plan=free        req:1a2b3c4d
  2026-03-10 14:21  UPDATE  name: null → Alice Smith        req:a3c91ef0
  2026-03-10 14:22  UPDATE  plan: free → pro                req:4f9a3b2c
  2026-03-10 14:22  UPDATE  plan: pro → null  (rolled back) req:550e8400
"""

# The seed shows the request's changes this way; ours agree with the row's own history (pro → null).
SEED_REQUEST = """\
  users    id=42   plan: pro → null  (rolled back)
  orders   id=81b2 status: pending → null  (rolled back)
"""

SEED_BLAME = """\
  email   a@b.com       req:1a2b3c4d  2026-03-10 12:00
  name    Alice Smith   req:a3c91ef0  2026-03-10 14:21
  plan    pro           req:4f9a3b2c  2026-03-10 14:22  ✗ rolled back req:550e8400
"""

SEED_WHY = """\
  REQUEST      550e8400-e29b-41d4-a716-446655440000
  ACTOR        alice@example.com
  OUTCOME      rolled back
  ROOT CAUSE   TimeoutError: Stripe API timeout after 10s
  REPORTED BY  db_user app, pid 4242
  LOCATION     payments/create.ts:42
  CONTEXT      app=app, db user=app, client=10.0.0.5, pid=4242, route=/pay
  WHEN         2026-03-10 14:22
  TRANSACTION  xid {xid}  rolled back at {position}  2026-03-10 14:22  2 changes
  DATA CHANGES users.id=42     plan: pro → null  (rolled back)
               orders.id=81b2  status: pending → null  (rolled back)
"""


@pytest.fixture(scope="module")
def seed(pg: LocalPostgres) -> Iterator[StoreBuilder]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    build_seed_000(b)
    b.finish(baseline=0x1_0000_0000)
    yield b
    b.close()
    pg.drop_database(name)


@pytest.fixture
def run(seed: StoreBuilder) -> Any:
    runner = CliRunner()

    def invoke(command: click.Command, *args: str, env: dict[str, str | None] | None = None) -> Result:
        full_env: dict[str, str | None] = {"TZ": "UTC", "CDC_STORE_DSN": seed.dsn, "CDC_CONFIG": None}
        full_env.update(env or {})
        return runner.invoke(command, list(args), env=full_env, catch_exceptions=False)

    return invoke


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def fails(result: Result, code: int, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    err = result.stderr
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "Traceback" not in result.stdout
    for needle in needles:
        assert needle in err, err
    return err


# ============================================================================ the seed's examples


def test_history_of_a_row_is_the_seed_text(run: Any) -> None:
    assert ok(run(state, "history", "users", "--id", "42")) == SEED_HISTORY
    assert ok(run(state, "history", "public.users", "--id", "42")) == SEED_HISTORY


def test_history_of_a_request_is_the_seed_text(run: Any) -> None:
    assert ok(run(state, "history", "--request", "550e8400")) == SEED_REQUEST


def test_blame(run: Any) -> None:
    assert ok(run(state, "blame", "users", "--id", "42")) == SEED_BLAME


def test_why(run: Any, seed: StoreBuilder) -> None:
    from cdc.lsn import format_lsn

    out = ok(run(why, "550e8400"))
    xid, position = seed.conn.execute(
        "SELECT xid, position FROM cdc_history.transactions WHERE status = 'r'"
    ).fetchone() or (0, 0)
    expected = SEED_WHY.format(xid=xid, position=format_lsn(position))
    assert out == expected
    committed = ok(run(why, REQ_PLAN))
    assert "  OUTCOME      committed" in committed and "ROOT CAUSE" not in committed


def test_time_filters(run: Any) -> None:
    since = ok(
        run(state, "history", "users", "--id", "42", "--between", "2026-03-10T14:00", "2026-03-10T15:00")
    )
    assert "(3 mutations)" in since and "INSERT" not in since
    day = ok(run(state, "history", "users", "--id", "42", "--between", "2026-03-10", "2026-03-10"))
    assert "(4 mutations)" in day
    offset = ok(
        run(
            state,
            "history",
            "users",
            "--id",
            "42",
            "--between",
            "2026-03-10T15:00+01:00",
            "2026-03-10T16:00+01:00",
        )
    )
    assert "(3 mutations)" in offset
    recent = ok(run(state, "history", "users", "--id", "42", "--since", "24h"))
    assert "(0 mutations)" in recent  # the seed happened long before "now"
    ok(run(state, "history", "users", "--id", "42", "--since", "100000d"))
    local = ok(run(state, "history", "users", "--id", "42", env={"TZ": "Asia/Kolkata"}))
    assert "2026-03-10 17:30  INSERT" in local
    utc = ok(run(state, "history", "users", "--id", "42", "--utc", env={"TZ": "Asia/Kolkata"}))
    assert utc == SEED_HISTORY
    # naive times on the command line are local times too
    kolkata = ["--between", "2026-03-10T19:30", "2026-03-10T20:00"]
    assert "(3 mutations)" in ok(
        run(state, "history", "users", "--id", "42", *kolkata, env={"TZ": "Asia/Kolkata"})
    )
    assert "(0 mutations)" in ok(run(state, "history", "users", "--id", "42", *kolkata))


def test_table_without_id_shows_its_newest_changes(run: Any) -> None:
    out = ok(run(state, "history", "users", "--limit", "2"))
    lines = out.splitlines()
    assert lines[0] == "  public.users  (newest 2 mutations)"
    assert "plan: free → pro" in lines[2] and "(rolled back)" in lines[3]


# ============================================================================ exports


def test_json_export_round_trips(run: Any) -> None:
    data = json.loads(ok(run(state, "history", "users", "--id", "42", "--format", "json")))
    assert len(data) == 4
    required = {"version", "lsn", "xid", "committed_at", "table", "key", "op", "before", "after", "changed",
                "request_id", "context", "status"}  # fmt: skip
    assert all(required <= set(d) for d in data)
    assert data[0]["table"] == "public.users" and data[0]["key"] == {"id": 42} and data[0]["op"] == "INSERT"
    assert data[0]["committed_at"] == "2026-03-10T12:00:00+00:00"
    assert isinstance(data[0]["version"], int) and isinstance(data[0]["lsn"], int)
    assert data[3]["status"] == "rolled_back" and data[3]["version"] is None
    assert data[3]["before"]["plan"] == "pro" and data[3]["after"]["plan"] is None
    assert data[3]["changed"] == ["plan"] and data[3]["request_id"] == REQ_FAILED
    assert data[3]["context"]["actor"] == "alice@example.com"
    request = json.loads(ok(run(state, "history", "--request", "550e8400", "--format", "json")))
    assert [d["table"] for d in request] == ["public.users", "public.orders"]


def test_csv_export_round_trips(run: Any) -> None:
    text = ok(run(state, "history", "users", "--id", "42", "--format", "csv"))
    rows = list(csv.DictReader(io.StringIO(text)))
    data = json.loads(ok(run(state, "history", "users", "--id", "42", "--format", "json")))
    assert len(rows) == 4 and list(rows[0]) == list(MUTATION_CSV_FIELDS)
    for row, want in zip(rows, data, strict=True):
        for name in ("key", "before", "after", "changed", "context"):
            assert json.loads(row[name]) == want[name]
        assert row["op"] == want["op"] and row["status"] == want["status"]
        assert row["version"] == ("" if want["version"] is None else str(want["version"]))


def test_blame_and_why_exports(run: Any) -> None:
    blame = json.loads(ok(run(state, "blame", "users", "--id", "42", "--format", "json")))
    assert [b["column"] for b in blame] == ["email", "name", "plan"]
    assert blame[2]["rolled_back_request_id"] == REQ_FAILED
    rows = list(
        csv.DictReader(io.StringIO(ok(run(state, "blame", "users", "--id", "42", "--format", "csv"))))
    )
    assert rows[2]["value"] == "pro" and rows[2]["rolled_back"] == "true"
    record = json.loads(ok(run(why, "550e8400", "--format", "json")))
    assert record["outcome"] == "rolled_back" and record["error"]["message"] == "Stripe API timeout after 10s"
    assert len(record["mutations"]) == 2
    why_csv = list(csv.DictReader(io.StringIO(ok(run(why, "550e8400", "--format", "csv")))))
    assert [r["table"] for r in why_csv] == ["public.users", "public.orders"]


# ============================================================================ at


def test_at_version_and_time(run: Any, seed: StoreBuilder) -> None:
    from cdc.lsn import format_lsn

    insert_version = seed.positions[1]
    out = ok(run(state, "at", "users", "--id", "42", "--version", format_lsn(insert_version)))
    assert out == (
        f"  public.users id=42 at version {format_lsn(insert_version)}\n\n"
        "  id     42\n  email  a@b.com\n  name   null\n  plan   free\n"
    )
    assert ok(run(state, "at", "users", "--id", "42", "--version", str(insert_version))) == out
    assert ok(run(state, "at", "users", "--id", "42", "--at", "2026-03-10T13:00")) == out
    assert ok(run(state, "at", "users", "--id", "42", "--at", "2026-03-10T14:00+01:00")) == out
    before = seed.positions[0]
    absent = ok(run(state, "at", "users", "--id", "42", "--version", format_lsn(before)))
    assert absent == f"  public.users id=42 absent at version {format_lsn(before)}\n"
    row = json.loads(
        ok(run(state, "at", "users", "--id", "42", "--at", "2026-03-10T13:00", "--format", "json"))
    )
    assert row["row"] == {"id": 42, "email": "a@b.com", "name": None, "plan": "free"}
    assert row["version"] == insert_version
    gone = json.loads(
        ok(run(state, "at", "users", "--id", "42", "--version", str(before), "--format", "json"))
    )
    assert gone["row"] is None
    cells = list(csv.DictReader(io.StringIO(ok(run(state, "at", "orders", "--id", "81b2", "--at", "now",
                                                       "--format", "csv")))))  # fmt: skip
    assert {c["column"]: c["value"] for c in cells} == {"id": "81b2", "status": "pending", "total": "12.50"}


# ============================================================================ errors


def test_errors_are_one_line_with_exit_codes(run: Any, seed: StoreBuilder) -> None:
    fails(
        run(state, "history", "userz", "--id", "42"), 7, "no history for table public.userz", "public.users"
    )
    fails(run(state, "history", "users", "--id", "7"), 7, "no history for public.users id=7")
    fails(run(state, "history", "users", "--id", "abc"), 6, "invalid key value")
    fails(run(state, "history", "users", "--id", '{"id": '), 6, "not valid JSON")
    fails(run(state, "history", "--request", "ffffffff"), 7, "no request 'ffffffff'")
    fails(run(why, "nope"), 7, "no request")
    fails(run(state, "history", "users", "--id", "42", "--since", "yesterday-ish"), 6, "invalid time")
    fails(
        run(state, "history", "users", "--id", "42", "--between", "2026-03-11", "2026-03-10"), 6, "empty time"
    )
    fails(run(state, "history", "users", "--id", "42", "--request", "550e"), 6, "not both")
    fails(run(state, "history"), 6, "--request")
    fails(run(state, "blame", "users", "--id", "7"), 7, "no history")
    fails(run(state, "at", "users", "--id", "42", "--version", "1/0", "--at", "now"), 6, "exactly one")
    fails(run(state, "at", "users", "--id", "42"), 6, "exactly one")
    fails(run(state, "at", "users", "--id", "42", "--version", "x/y"), 6, "invalid LSN")
    fails(run(state, "at", "users", "--id", "42", "--version", "0/10"), 7, "below the history floor")
    fails(run(state, "at", "users", "--id", "42", "--version", "FF/0"), 6, "ahead of the history store")
    fails(run(state, "at", "users", "--id", "42", "--at", "2000-01-01"), 7, "no stored version")
    fails(run(state, "at", "users", "--id", "7", "--at", "now"), 7, "no history for public.users id=7")
    fails(
        run(state, "history", "users", "--id", "42", env={"CDC_STORE_DSN": None}), 2, "no history store given"
    )
    down = "host=127.0.0.1 port=1 dbname=hist user=u password=s3cret connect_timeout=2"
    err = fails(
        run(state, "history", "users", "--id", "42", "--store", down), 9, "cannot connect", "dbname=hist"
    )
    assert "s3cret" not in err
    fails(run(why, "550e8400", "--store", down), 9, "cannot connect")
    fails(run(state, "history", "users", "--id", "42", "--schema", "nope"), 9, "cdc setup")


def test_ambiguous_request_prefix(run: Any, seed: StoreBuilder) -> None:
    from tests.store_builder import INT8, TEXT

    seed.table("notes", {"id": INT8, "body": TEXT})
    with seed.txn("2026-03-12 10:00", "beef0001-x") as t:
        t.insert("notes", {"id": 1, "body": "a"})
    with seed.txn("2026-03-12 10:01", "beef0002-y") as t:
        t.insert("notes", {"id": 2, "body": "b"})
    seed.finish(baseline=0x1_0000_0000)
    fails(run(why, "beef"), 6, "ambiguous", "beef0001-x", "beef0002-y")
    assert "REQUEST      beef0002-y" in ok(run(why, "beef0002"))


def test_request_ids_shown_whole_or_by_their_shortest_unique_prefix(run: Any, seed: StoreBuilder) -> None:
    from tests.store_builder import INT8, TEXT

    seed.table("memos", {"id": INT8, "body": TEXT})
    with seed.txn("2026-03-13 10:00", "c0ffee00-1111-aaaa") as t:
        t.insert("memos", {"id": 1, "body": "a"})
    with seed.txn("2026-03-13 10:01", "c0ffee00-1111-bbbb") as t:
        t.update("memos", 1, {"body": "b"})
    with seed.txn("2026-03-13 10:02", "d00dfeed-2222-cccc") as t:
        t.update("memos", 1, {"body": "c"})
    seed.finish(baseline=0x1_0000_0000)
    lines = ok(run(state, "history", "memos", "--id", "1")).splitlines()
    assert [line.split()[-1] for line in lines[2:]] == [
        "req:c0ffee00-1111-a",  # unique only from the 15th character
        "req:c0ffee00-1111-b",
        "req:d00dfeed",  # unique after 8: 8 characters
    ]
    table_log = ok(run(state, "history", "memos")).splitlines()
    assert [line.split()[-1] for line in table_log[2:]] == [
        "req:c0ffee00-1111-a",
        "req:c0ffee00-1111-b",
        "req:d00dfeed",
    ]
    blame = ok(run(state, "blame", "memos", "--id", "1"))
    assert "req:d00dfeed " in blame
    # each shown prefix is accepted back; a shorter one lists what it matches
    assert "REQUEST      c0ffee00-1111-bbbb" in ok(run(why, "c0ffee00-1111-b"))
    fails(run(why, "c0ffee00"), 6, "ambiguous", "c0ffee00-1111-aaaa", "c0ffee00-1111-bbbb")


def test_store_from_the_config_file(run: Any, seed: StoreBuilder, tmp_path: Path) -> None:
    config = tmp_path / "cdc.yaml"
    config.write_text(f"store:\n  dsn: {json.dumps(seed.dsn)}\n  schema: cdc_history\n")
    out = ok(
        run(state, "history", "users", "--id", "42", "--config", str(config), env={"CDC_STORE_DSN": None})
    )
    assert out == SEED_HISTORY
    via_env = ok(
        run(state, "history", "users", "--id", "42", env={"CDC_STORE_DSN": None, "CDC_CONFIG": str(config)})
    )
    assert via_env == SEED_HISTORY
    config.write_text("store:\n  dsn: 42\n  shema: x\n")
    err = run(state, "history", "users", "--id", "42", "--config", str(config), env={"CDC_STORE_DSN": None})
    assert err.exit_code == 2 and "Traceback" not in err.stderr and "shema" in err.stderr


def test_parse_time() -> None:
    now = at("2026-03-10 12:00")
    assert parse_time("24h", now=now) == at("2026-03-09 12:00")
    assert parse_time("2026-03-10T14:00", utc=True) == at("2026-03-10 14:00")
    assert parse_time("2026-03-10 14:00Z") == at("2026-03-10 14:00")
    assert parse_time("2026-03-10", utc=True, end=True) == at("2026-03-11 00:00")
    assert parse_time("now", now=now) == now
    with pytest.raises(UsageError, match="invalid time"):
        parse_time("tomorrow")
