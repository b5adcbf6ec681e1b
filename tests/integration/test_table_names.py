"""Tables by identity in every reader: look-alike names never mixed, renamed and re-created
tables read by each of their names (Store, History, CLI, HTTP API, page)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from cdc.cli_readers import state
from cdc.errors import NotFoundError
from cdc.history import History
from cdc.lsn import format_lsn
from cdc.query import Store
from cdc.web import create_app
from tests.store_builder import INT8, TEXT, StoreBuilder

#: Each name PostgreSQL tells apart, and the value its row 1 holds.
LOOKALIKES = {
    "users": "lower",
    '"Users"': "Mixed",
    '"USERS"': "UPPER",
    '"a.b".c': "schema a.b, table c",
    'a."b.c"': "schema a, table b.c",
    "a.b": "schema a, table b",
    '"Weird Name"': "weird",
    '"日本"."表"': "unicode",
    '"say ""hi"""': "quotes",
}
#: Spellings of the same tables.
SPELLINGS = {
    "USERS": "users",
    "Users": "users",
    "public.users": "users",
    'public."Users"': '"Users"',
    "A.B": "a.b",
}
COLUMNS = {"id": INT8, "v": TEXT}


@dataclass
class Story:
    b: StoreBuilder
    v: dict[str, int]  # versions by label


@pytest.fixture(scope="module")
def story(pg: Any) -> Iterator[Story]:
    """Look-alike tables; ``orders`` renamed twice (orders → orders_v2 → archive.orders) and a new
    ``orders`` created after; ``tmp`` dropped and created again."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    v: dict[str, int] = {}
    for table in LOOKALIKES:
        b.table(table, COLUMNS)
    b.table("orders", {"id": INT8, "status": TEXT})
    b.table("tmp", COLUMNS)
    with b.txn("2026-04-01 10:00", "req-lookalikes") as t:
        for table, value in LOOKALIKES.items():
            t.insert(table, {"id": 1, "v": value})
        t.insert("tmp", {"id": 1, "v": "old tmp"})
    v["lookalikes"] = b.position
    with b.txn("2026-04-01 10:01", "req-order-new") as t:
        t.insert("orders", {"id": 1, "status": "new"})
    v["new"] = b.position
    v["rename1"] = b.rename("orders", "orders_v2")
    with b.txn("2026-04-01 10:02", "req-order-paid") as t:
        t.update("orders_v2", 1, {"status": "paid"})
    v["paid"] = b.position
    v["rename2"] = b.rename("orders_v2", "archive.orders")
    with b.txn("2026-04-01 10:03", "req-order-shipped") as t:
        t.update("archive.orders", 1, {"status": "shipped"})
    v["shipped"] = b.position
    b.table("orders", {"id": INT8, "status": TEXT})  # a new table under the first name
    with b.txn("2026-04-01 10:04", "req-other-orders") as t:
        t.insert("orders", {"id": 1, "status": "another table"})
    v["other"] = b.position
    v["drop"] = b.drop("tmp")
    b.table("tmp", COLUMNS)
    with b.txn("2026-04-01 10:05", "req-tmp-again") as t:
        t.insert("tmp", {"id": 1, "v": "new tmp"})
    v["tmp2"] = b.position
    b.finish(baseline=0x1_0000_0000)
    yield Story(b, v)
    b.close()
    pg.drop_database(name)


@pytest.fixture
def store(story: Story) -> Iterator[Store]:
    with Store(story.b.dsn) as s:
        yield s


# ============================================================================ the query layer


def test_lookalike_tables_are_never_mixed(story: Story, store: Store) -> None:
    now = story.v["tmp2"]
    for table, value in LOOKALIKES.items():
        assert store.row_at(table, 1, now) == {"id": 1, "v": value}, table
        assert [r["v"] for r in store.table_at(table, now).rows] == [value], table
        history = store.row_history(table, 1)
        assert [(m.op, m.after["v"] if m.after else None) for m in history] == [("INSERT", value)], table
        assert store.blame(table, 1)[0].value == value
        assert [m.after for m in store.mutation_log(table=table).mutations] == [{"id": 1, "v": value}]
        assert store.table(table).name == history[0].table
    for spelling, table in SPELLINGS.items():
        assert store.row_at(spelling, 1, now) == {"id": 1, "v": LOOKALIKES[table]}, spelling
    with pytest.raises(NotFoundError, match=r'no history for table public\."uSERS"'):
        store.row_at('"uSERS"', 1, now)


def test_table_names_print_as_postgresql_needs(store: Store) -> None:
    names = {info.name for info in store.tables()}
    assert {'public.users', 'public."Users"', '"a.b".c', 'a."b.c"', "a.b", 'public."Weird Name"',
            '"日本"."表"', 'public."say ""hi"""', "archive.orders", "public.orders"} <= names  # fmt: skip
    assert store.request("req-lookalikes").mutations[1].table == 'public."Users"'


def test_a_table_renamed_twice_is_read_by_each_name(story: Story, store: Store) -> None:
    v = story.v
    # time travel: the table that had the name then
    assert store.row_at("orders", 1, v["new"]) == {"id": 1, "status": "new"}
    assert store.row_at("orders", 1, v["paid"]) is None  # renamed away: no table "orders" had row 1 then
    assert store.row_at("orders_v2", 1, v["paid"]) == {"id": 1, "status": "paid"}
    assert store.row_at("orders_v2", 1, v["new"]) == {"id": 1, "status": "new"}  # its history before
    assert store.row_at("orders_v2", 1, v["shipped"]) is None  # no longer its name
    assert store.row_at("archive.orders", 1, v["shipped"]) == {"id": 1, "status": "shipped"}
    assert store.row_at("archive.orders", 1, v["new"]) == {"id": 1, "status": "new"}  # the current name: all
    assert store.row_at("orders", 1, v["other"]) == {"id": 1, "status": "another table"}
    assert store.table_at("orders_v2", v["paid"]).rows == [{"id": 1, "status": "paid"}]
    assert store.table_at("orders_v2", v["shipped"]).rows == []
    # history: the current name reads everything, an old one the versions before its rename
    whole = store.row_history("archive.orders", 1)
    assert [(m.table, m.after) for m in whole] == [
        ("public.orders", {"id": 1, "status": "new"}),
        ("public.orders_v2", {"id": 1, "status": "paid"}),
        ("archive.orders", {"id": 1, "status": "shipped"}),
    ]
    assert whole[2].before == {"id": 1, "status": "paid"} and whole[2].changed == ("status",)
    assert [m.after for m in store.row_history("orders_v2", 1)] == [
        {"id": 1, "status": "new"},
        {"id": 1, "status": "paid"},
    ]
    assert [m.after for m in store.row_history("orders", 1)] == [{"id": 1, "status": "another table"}]
    assert [m.request_id for m in store.mutation_log(table="orders_v2").mutations] == [
        "req-order-paid",
        "req-order-new",
    ]
    assert store.blame("archive.orders", 1)[0].request_id == "req-order-shipped"
    with pytest.raises(NotFoundError, match=r"former name of archive\.orders"):
        store.blame("orders_v2", 1)
    info = store.table("orders_v2")
    assert info.current_name == "archive.orders" and info.until == v["rename2"]
    assert [name for _, name in info.names] == ["public.orders", "public.orders_v2", "archive.orders"]


def test_a_dropped_and_recreated_table(story: Story, store: Store) -> None:
    v = story.v
    assert store.row_at("tmp", 1, v["lookalikes"]) == {"id": 1, "v": "old tmp"}
    assert store.row_at("tmp", 1, v["drop"]) is None  # dropped, the new one not there yet
    assert store.row_at("tmp", 1, v["tmp2"]) == {"id": 1, "v": "new tmp"}
    assert [m.after for m in store.row_history("tmp", 1)] == [{"id": 1, "v": "new tmp"}]
    assert store.blame("tmp", 1)[0].value == "new tmp"
    tmps = [info for info in store.tables() if info.name == "public.tmp"]
    assert [info.dropped for info in tmps] == [False, True]
    assert store.known_tables().count("public.tmp") == 1


# ============================================================================ History


def test_history_api(story: Story) -> None:
    v = story.v
    with History(story.b.dsn) as h:
        past = h.at(version=v["paid"])
        assert past.table('"Users"').get(1) == {"id": 1, "v": "Mixed"}
        assert past.users.get(1) == {"id": 1, "v": "lower"}
        assert past['"a.b".c'].get(1) == {"id": 1, "v": "schema a.b, table c"}
        assert past['a."b.c"'].collect() == [{"id": 1, "v": "schema a, table b.c"}]
        assert past.orders_v2.get(1) == {"id": 1, "status": "paid"}
        assert past.orders.get(1) is None
        assert past.table("orders_v2").name == "public.orders_v2"
        assert h.at(version=v["new"]).orders.get(1) == {"id": 1, "status": "new"}
        assert h.at(version=v["shipped"]).table("archive.orders").get(1) == {"id": 1, "status": "shipped"}
        assert h.at(version=v["lookalikes"]).tmp.collect() == [{"id": 1, "v": "old tmp"}]
        assert [m.table for m in h.row_history("archive.orders", 1)] == [
            "public.orders",
            "public.orders_v2",
            "archive.orders",
        ]


# ============================================================================ CLI


def _cli(story: Story, *args: str) -> str:
    result = CliRunner().invoke(
        state, list(args), env={"TZ": "UTC", "CDC_STORE_DSN": story.b.dsn, "CDC_CONFIG": None}
    )
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout


def test_cli(story: Story) -> None:
    v = story.v
    out = _cli(story, "history", '"Users"', "--id", "1")
    assert out.splitlines()[0] == '  public."Users" id=1  (1 mutation)' and "v=Mixed" in out
    assert "v=lower" in _cli(story, "history", "USERS", "--id", "1")
    assert "v=UPPER" in _cli(story, "history", '"USERS"', "--id", "1")
    assert _cli(story, "history", '"a.b".c', "--id", "1").startswith('  "a.b".c id=1')
    assert _cli(story, "history", 'a."b.c"', "--id", "1").startswith('  a."b.c" id=1')
    at = json.loads(
        _cli(story, "at", "orders_v2", "--id", "1", "--version", format_lsn(v["paid"]), "--format", "json")
    )
    assert at["table"] == "public.orders_v2" and at["row"] == {"id": 1, "status": "paid"}
    gone = _cli(story, "at", "orders_v2", "--id", "1", "--version", str(v["shipped"]))
    assert "absent" in gone
    history = json.loads(_cli(story, "history", "archive.orders", "--id", "1", "--format", "json"))
    assert [m["table"] for m in history] == ["public.orders", "public.orders_v2", "archive.orders"]
    table_log = _cli(story, "history", "orders_v2")
    assert table_log.splitlines()[0] == "  public.orders_v2  (newest 2 mutations)"
    result = CliRunner().invoke(
        state, ["blame", "orders_v2", "--id", "1"], env={"CDC_STORE_DSN": story.b.dsn, "CDC_CONFIG": None}
    )
    assert result.exit_code == 7 and "former name of archive.orders" in result.stderr


# ============================================================================ HTTP API and page


@pytest.fixture(scope="module")
def client(story: Story) -> Iterator[TestClient]:
    with TestClient(create_app(story.b.dsn, open_access=True)) as c:
        yield c


def _get(client: TestClient, url: str) -> Any:
    response = client.get(url)
    assert response.status_code == 200, (url, response.text)
    return response.json()


def test_api(story: Story, client: TestClient) -> None:
    v = story.v
    for table, value in LOOKALIKES.items():
        body = _get(client, f"/api/v1/tables/{quote(table, safe='')}/rows/1")
        assert body["row"] == {"id": 1, "v": value}, table
        history = _get(client, f"/api/v1/tables/{quote(table, safe='')}/rows/1/history")
        assert [m["after"]["v"] for m in history["mutations"]] == [value]
    paid = _get(client, f"/api/v1/tables/orders_v2/rows/1?version={v['paid']}")
    assert paid["table"] == "public.orders_v2" and paid["row"] == {"id": 1, "status": "paid"}
    rows = _get(client, f"/api/v1/tables/orders/rows?version={v['new']}")["rows"]
    assert rows == [{"id": 1, "status": "new"}]
    tables = {t["name"]: t for t in _get(client, "/api/v1/tables")["tables"] if not t["dropped"]}
    assert tables["archive.orders"]["former_names"] == ["public.orders", "public.orders_v2"]
    assert tables["public.orders"]["former_names"] == []
    log = _get(client, "/api/v1/mutations?table=" + quote('"Users"'))["mutations"]
    assert [m["after"]["v"] for m in log] == ["Mixed"]


def test_page(story: Story, client: TestClient) -> None:
    document = client.get("/tables/" + quote('"Users"', safe="") + "/rows/1", headers={"Accept": "text/html"})
    assert document.status_code == 200 and "Mixed" in document.text and "lower" not in document.text
    renamed = client.get("/tables/archive.orders/rows/1", headers={"Accept": "text/html"}).text
    assert "shipped" in renamed and "paid" in renamed and "another table" not in renamed
    old = client.get(f"/tables/tmp/rows/1?version={story.v['lookalikes']}", headers={"Accept": "text/html"})
    assert old.status_code == 200 and "old tmp" in old.text and "new tmp" not in old.text
    log = client.get("/?table=tmp", headers={"Accept": "text/html"}).text
    assert "new tmp" in log and "old tmp" not in log
    everything = client.get("/?limit=100", headers={"Accept": "text/html"}).text
    pinned = f"/tables/tmp/rows/1?version={story.v['lookalikes']}"
    assert pinned in everything.replace("&amp;", "&")  # the old table's row, by a version it had the name
