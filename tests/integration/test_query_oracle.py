"""Differential tests: random histories written by the store builder, read back through
cdc.query.Store and checked against the builder's own idea of every row at every version."""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from cdc.devdb import LocalPostgres
from cdc.query import Store
from cdc.store.keys import key_text
from tests.store_builder import INT4, INT8, TEXT, StoreBuilder

ITEMS = '"Items"'  # a quoted name, with a look-alike beside it
LOOKALIKE = "items"
PAIRS = "pairs"
PAIRS_RENAMED = 'app."Pairs 2"'
BAG = "bag"
REQUESTS = ["req-a", "req-b", "req-c", None]


def _random_history(b: StoreBuilder, rng: random.Random, transactions: int) -> dict[str, Any]:
    """A random history over a keyed, a composite-keyed (renamed half way) and a keyless table."""
    b.table(ITEMS, {"id": INT8, "v": TEXT, "n": INT4})
    b.table(LOOKALIKE, {"id": INT8, "v": TEXT})
    b.table(PAIRS, {"a": TEXT, "b": INT4, "v": TEXT}, key=("a", "b"))
    b.table(BAG, {"k": TEXT, "n": INT4}, key=())
    with b.txn("2026-01-01 09:00", "req-lookalike") as t:  # same ids, another table
        for i in range(1, 6):
            t.insert(LOOKALIKE, {"id": i, "v": f"lookalike {i}"})
    names = {"items": ITEMS, "pairs": PAIRS, "bag": BAG}
    for n in range(transactions):
        if n == transactions // 2:
            names["renamed_at"] = str(b.rename(PAIRS, PAIRS_RENAMED))
            names["pairs"] = PAIRS_RENAMED
        status = "rolled_back" if rng.random() < 0.15 else "committed"
        with b.txn(f"2026-01-01 10:{n // 60:02d}:{n % 60:02d}", rng.choice(REQUESTS), status=status) as t:
            for _ in range(rng.randint(1, 5)):
                _random_change(t, names, rng)
    b.finish(baseline=0x1_0000_0000)
    return names


def _random_change(t: Any, names: dict[str, str], rng: random.Random) -> None:
    kind = rng.choice(["items", "items", "pairs", "bag"])
    table = names[kind]
    attempt = rng.random() < 0.1
    live = t.rows(table, rolled_back=attempt)
    request = rng.choice(REQUESTS) if rng.random() < 0.2 else None
    choice = rng.random()
    if kind == "bag":
        if live and choice < 0.3:
            t.delete(table, rng.choice(live), rolled_back=attempt)
        elif live and choice < 0.5:
            t.update(table, rng.choice(live), {"n": rng.randint(0, 3)}, rolled_back=attempt)
        elif choice < 0.53:
            t.truncate(table, rolled_back=attempt)
        else:
            t.insert(table, {"k": rng.choice("xyz"), "n": rng.randint(0, 3)}, rolled_back=attempt)
        return
    if kind == "items":
        keys = {r["id"] for r in live}
        fresh = [i for i in range(1, 12) if i not in keys]
        if live and choice < 0.4:
            row = rng.choice(live)
            changes: dict[str, Any] = {"v": rng.choice(["a", "b", "c", None]), "n": rng.randint(0, 2)}
            if fresh and rng.random() < 0.2:
                changes["id"] = rng.choice(fresh)  # a key change
            t.update(table, row["id"], changes, rolled_back=attempt, request_id=request)
        elif live and choice < 0.6:
            t.delete(table, rng.choice(live)["id"], rolled_back=attempt, request_id=request)
        elif choice < 0.63:
            t.truncate(table, rolled_back=attempt)
        elif fresh:
            t.insert(
                table, {"id": rng.choice(fresh), "v": "new", "n": 0}, rolled_back=attempt, request_id=request
            )
        return
    keys = {(r["a"], r["b"]) for r in live}
    fresh = [(a, b) for a in "pqr" for b in range(3) if (a, b) not in keys]
    if live and choice < 0.4:
        row = rng.choice(live)
        key = {"a": row["a"], "b": row["b"]}
        changes = {"v": rng.choice(["x", "y", None])}
        if fresh and rng.random() < 0.2:
            a, b = rng.choice(fresh)
            changes.update(a=a, b=b)
        t.update(table, key, changes, rolled_back=attempt)
    elif live and choice < 0.6:
        row = rng.choice(live)
        t.delete(table, {"a": row["a"], "b": row["b"]}, rolled_back=attempt)
    elif fresh:
        a, b = rng.choice(fresh)
        t.insert(table, {"a": a, "b": b, "v": "new"}, rolled_back=attempt)


def _canon(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(json.dumps(r, sort_keys=True) for r in rows)


@pytest.fixture(scope="module", params=[1, 2, 3])
def history(
    request: pytest.FixtureRequest, pg: LocalPostgres
) -> Iterator[tuple[StoreBuilder, dict[str, str]]]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    names = _random_history(b, random.Random(request.param), 60)
    kinds = Counter(c["op"] for c in b.log)
    assert kinds["TRUNCATE"] and kinds["DELETE"] and kinds["INSERT"] and kinds["UPDATE"]
    assert any(c["old_key_text"] for c in b.log), "no key change"
    assert any(c["status"] == "rolled_back" for c in b.log), "no rolled-back change"
    yield b, names
    b.close()
    pg.drop_database(name)


def _versions(b: StoreBuilder) -> list[int]:
    return [b.positions[0] - 1, *b.positions, *(p + 7 for p in b.positions[::5])]


def test_tables_at_every_version_match_the_oracle(history: Any) -> None:
    b, names = history
    with Store(b.dsn) as store:
        for version in _versions(b):
            for kind in ("items", "pairs", "bag"):
                name = names[kind]
                table_id = b.table_id(name)
                expected = b.state_at(table_id, version)
                page = store.table_at(name, version, limit=1000).rows
                assert _canon(page) == _canon(expected), (kind, version)
                if kind == "pairs" and version < int(names["renamed_at"]):  # the old name, then
                    assert store.table_at(PAIRS, version, limit=1000).rows == page
                streamed = [r for p in store.iter_table_at(name, version, page_size=3) for r in p]
                assert streamed == page, (kind, version)
                paged: list[dict[str, Any]] = []
                after = None
                while True:
                    part = store.table_at(name, version, after_key=after, limit=4)
                    paged.extend(part.rows)
                    if part.next_after is None:
                        break
                    after = part.next_after
                assert paged == page, (kind, version)
                if kind == "items":
                    assert [r["id"] for r in page] == sorted(r["id"] for r in expected)
                if kind == "pairs":
                    assert [(r["a"], r["b"]) for r in page] == sorted((r["a"], r["b"]) for r in expected)
            lookalike = store.table_at(LOOKALIKE, version).rows
            assert all(r["v"].startswith("lookalike") for r in lookalike)


def test_rows_at_every_version_match_the_oracle(history: Any) -> None:
    b, names = history
    with Store(b.dsn) as store:
        items = b.table_id(names["items"])
        pairs = b.table_id(names["pairs"])
        for version in _versions(b):
            state = {r["id"]: r for r in b.state_at(items, version)}
            for i in range(1, 12):
                assert store.row_at(ITEMS, i, version) == state.get(i), (i, version)
            state_pairs = {(r["a"], r["b"]): r for r in b.state_at(pairs, version)}
            for a in "pqr":
                for n in range(3):
                    got = store.row_at(names["pairs"], {"a": a, "b": n}, version)
                    assert got == state_pairs.get((a, n)), ((a, n), version)
            bag = _canon(b.state_at(b.table_id(BAG), version))
            for k in "xyz":
                for n in range(4):
                    row = {"k": k, "n": n}
                    expected = row if bag[json.dumps(row, sort_keys=True)] else None
                    assert store.row_at(BAG, row, version) == expected, (row, version)


def _expected_history(b: StoreBuilder, table_id: int, k: str) -> list[tuple[Any, ...]]:
    out = []
    for c in b.log:
        if c["table_id"] != table_id:
            continue
        if c["op"] == "TRUNCATE":
            if k in c["removed"]:
                out.append((c["position"], c["ordinal"], "TRUNCATE", c["status"], None, None))
        elif k in (c["key_text"], c["old_key_text"]):
            out.append((c["position"], c["ordinal"], c["op"], c["status"], c["before"], c["after"]))
    return out


def test_row_histories_match_the_oracle(history: Any) -> None:
    b, names = history
    with Store(b.dsn) as store:
        cases = [(names["items"], {"id": i}) for i in range(1, 12)]
        cases += [(names["pairs"], {"a": a, "b": n}) for a in "pqr" for n in range(3)]
        for name, key in cases:
            k = key_text(list(key.values()))
            expected = _expected_history(b, b.table_id(name), k)
            if not expected:
                continue
            found = store.row_history(name, key)
            got = [(m.position, m.ordinal, m.op, m.status, m.before, m.after) for m in found]
            assert got == expected, (name, key)
            for m in found:
                if m.op == "UPDATE" and m.before is not None and m.after is not None:
                    assert set(m.changed) == {c for c in m.after if m.before.get(c) != m.after[c]}
            now = store.row_at(name, key, b.position)
            if now is not None:
                blame = store.blame(name, key)
                assert [(e.column, e.value) for e in blame] == [
                    (c, v) for c, v in now.items() if c not in key
                ]
                moved_in = any(m.old_key is not None and m.key == key for m in found)
                for e in blame if not moved_in else ():  # blamed: a committed write of the row
                    writes = [m for m in found if m.version is not None and m.after and m.key == key]
                    assert e.request_id in {m.request_id for m in writes}


def test_requests_and_the_log_match_the_oracle(history: Any) -> None:
    b, _ = history
    with Store(b.dsn) as store:
        for request_id in [r for r in REQUESTS if r is not None]:
            expected = [(c["position"], c["ordinal"]) for c in b.log if c["request_id"] == request_id]
            record = store.request(request_id, mutation_limit=None)
            assert [m.cursor for m in record.mutations] == expected
            assert record.mutation_count == len(expected)
            assert all(m.request_id == request_id for m in record.mutations)
        seen = []
        cursor = None
        while True:
            page = store.mutation_log(limit=7, before=cursor)
            seen.extend(m.cursor for m in page.mutations)
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == sorted(((c["position"], c["ordinal"]) for c in b.log), reverse=True)
