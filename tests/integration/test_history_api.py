"""cdc.History, the Python API, against a real store written by tests/store_builder.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

import cdc
from cdc.devdb import LocalPostgres
from cdc.errors import NotFoundError, ReadOnlyHistoryView, UsageError
from cdc.history import History, HistoryView
from cdc.lsn import format_lsn
from tests.store_builder import INT8, REQ_FAILED, TEXT, StoreBuilder, at, build_seed_000

FLOOR = 0x1_0000_0000


@pytest.fixture(scope="module")
def shop(pg: LocalPostgres) -> Iterator[tuple[StoreBuilder, dict[str, int]]]:
    """orders through a schema change, plus the seed 000 rows; versions by label."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name), schema="hist")
    build_seed_000(b)
    versions: dict[str, int] = {"seed": b.position}
    b.table("items", {"id": INT8, "title": TEXT})
    with b.txn("2026-03-11 09:00", "r-items") as t:
        for i in range(1, 8):
            t.insert("items", {"id": i, "title": f"item {i}"})
    versions["items"] = b.position
    b.table("items", {"id": INT8, "title": TEXT, "color": TEXT})  # ALTER TABLE ADD COLUMN color
    with b.txn("2026-03-11 10:00", "r-color") as t:
        t.update("items", 2, {"color": "red"})
        t.delete("items", 3)
    versions["color"] = b.position
    b.finish(baseline=FLOOR, floor=versions["seed"] - 0x100)  # pruned up to just before the last seed txn
    yield b, versions
    b.close()
    pg.drop_database(name)


@pytest.fixture
def history(shop: tuple[StoreBuilder, dict[str, int]]) -> Iterator[History]:
    with History(shop[0].dsn, schema="hist") as h:
        yield h


def test_import_from_package() -> None:
    assert cdc.History is History


def test_versions(shop: Any, history: History) -> None:
    _, versions = shop
    assert history.current_version() == versions["color"]
    assert history.earliest_version() == versions["seed"] - 0x100
    assert history.version_at_timestamp(at("2026-03-11 09:30")) == versions["items"]
    epoch_ms = int(at("2026-03-11 09:30").timestamp() * 1000)
    assert history.version_at_timestamp(epoch_ms) == versions["items"]
    # before the floor (the seed's early transactions were "pruned") → None
    assert history.version_at_timestamp(at("2026-03-10 12:30")) is None
    assert history.version_at_timestamp(at("2020-01-01 00:00")) is None


def test_get_and_attribute_access(shop: Any, history: History) -> None:
    _, versions = shop
    past = history.at(version=versions["items"])
    assert isinstance(past, HistoryView) and past.exact and past.version == versions["items"]
    assert past.table("items").get(2) == {"id": 2, "title": "item 2"}  # no "color": it did not exist yet
    assert past.items.get(3) == {"id": 3, "title": "item 3"}
    assert past["public.items"].get(9) is None
    now = history.at(version=format_lsn(versions["color"]))
    assert now.items.get(2) == {"id": 2, "title": "item 2", "color": "red"}
    assert now.items.get(3) is None
    assert now.table("items").get("4") == {"id": 4, "title": "item 4"}


def test_at_timestamp(shop: Any, history: History) -> None:
    _, versions = shop
    past = history.at(timestamp=at("2026-03-11 09:59"))
    assert past.version == versions["items"]
    assert past.items.get(3) is not None
    by_ms = history.at(timestamp=int(at("2026-03-11 10:00").timestamp() * 1000))
    assert by_ms.items.get(3) is None


def test_collect_and_pages(shop: Any, history: History) -> None:
    _, versions = shop
    now = history.at(version=versions["color"])
    rows = now.items.collect()
    assert rows is not None
    assert [r["id"] for r in rows] == [1, 2, 4, 5, 6, 7]
    pages = list(now.items.pages(page_size=4))
    assert [[r["id"] for r in p] for p in pages] == [[1, 2, 4, 5], [6, 7]]
    assert [r["id"] for r in now.items.collect(limit=2)] == [1, 2]
    assert [r["id"] for r in now.items.collect(limit=2, after=2)] == [4, 5]
    assert [r["id"] for r in now.items.collect(after=5)] == [6, 7]
    assert [r["id"] for r in now.items] == [1, 2, 4, 5, 6, 7]
    assert now.table("users").collect() == [
        {"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": "pro"}
    ]


def test_below_the_floor_reads_none(shop: Any, history: History) -> None:
    b, _ = shop
    old = history.at(version=b.positions[0])
    assert not old.exact
    assert old.orders.get("81b2") is None
    assert old.orders.collect() is None
    assert list(old.orders.pages()) == []
    assert history.at(timestamp=at("2020-01-01 00:00")).users.get(42) is None
    with pytest.raises(NotFoundError):  # an unknown table stays an error
        old.userz.get(1)


def test_views_are_read_only(shop: Any, history: History) -> None:
    _, versions = shop
    past = history.at(version=versions["items"])
    table = past.items
    attempts = [
        lambda: setattr(past, "items", 1),
        lambda: setattr(past, "_version", 1),
        lambda: delattr(past, "_version"),
        lambda: past.__setitem__("items", []),
        lambda: past.insert("items", {"id": 1}),
        lambda: setattr(table, "title", "x"),
        lambda: table.insert({"id": 99}),
        lambda: table.patch(1, {"title": "x"}),
        lambda: table.replace(1, {"id": 1}),
        lambda: table.delete(1),
        lambda: table.__setitem__(1, {}),
    ]
    for attempt in attempts:
        with pytest.raises(ReadOnlyHistoryView):
            attempt()
    assert past.version == versions["items"]


def test_bad_arguments(shop: Any, history: History) -> None:
    _, versions = shop
    with pytest.raises(UsageError, match="exactly one"):
        history.at()
    with pytest.raises(UsageError, match="exactly one"):
        history.at(version=1, timestamp=at("2026-03-11 09:00"))
    with pytest.raises(UsageError, match="ahead of the history store"):
        history.at(version=versions["color"] + 0x1000)
    with pytest.raises(UsageError, match="invalid LSN"):
        history.at(version="zz/1")
    with pytest.raises(NotFoundError, match=r"did you mean public\.items"):
        history.at(version=versions["color"]).itemz.get(1)
    with pytest.raises(UsageError, match="invalid key value"):
        history.at(version=versions["color"]).items.get("one")


def test_row_history_blame_request(shop: Any, history: History) -> None:
    mutations = history.row_history("users", 42)
    assert [m.op for m in mutations] == ["INSERT", "UPDATE", "UPDATE", "UPDATE"]
    assert [m.op for m in history.row_history("users", 42, since=at("2026-03-10 14:00"))] == ["UPDATE"] * 3
    assert history.row_history("users", 42, until=at("2026-03-10 14:00"))[0].op == "INSERT"
    assert history.row_history("users", 42, since=timedelta(days=10_000))[0].op == "INSERT"
    blame = {e.column: e for e in history.blame("users", 42)}
    assert blame["plan"].rolled_back_request_id == REQ_FAILED
    record = history.request("550e8400")
    assert record.request_id == REQ_FAILED and record.outcome == "rolled_back"
    page = history.mutations(table="items", limit=2)
    assert [m.op for m in page.mutations] == ["DELETE", "UPDATE"]
    assert history.mutations(request_id="550e", limit=10).mutations[0].request_id == REQ_FAILED


def test_close_and_reuse(shop: Any) -> None:
    h = History(shop[0].dsn, schema="hist")
    assert h.current_version() is not None
    h.close()
    assert h.current_version() is not None  # reconnects lazily
    h.close()
    assert "hist" in repr(h) and "password" not in repr(h)
