"""cdc/capture/ddl.py without a server: shape diffs, defaults, the renumbering of a transaction."""

from __future__ import annotations

from collections.abc import Iterator

from cdc.capture.ddl import DdlHandler, _Insert, column_diff, default_value
from cdc.capture.model import FinishedTransaction


def col(attnum: int, name: str, type_oid: int = 25, **extra: object) -> dict[str, object]:
    return {
        "attnum": attnum,
        "name": name,
        "type_oid": type_oid,
        "type_modifier": -1,
        "published": True,
        **extra,
    }


def shape(name: str, *columns: dict[str, object]) -> dict[str, object]:
    return {"oid": 1, "schema": "public", "name": name, "columns": list(columns)}


def test_column_diff_by_attnum() -> None:
    old = shape("t", col(1, "id", 23), col(2, "a"), col(3, "gone"), col(4, "n", 23))
    new = shape(
        "t2",
        col(1, "id", 23),
        col(2, "b"),
        col(4, "n", 25, type="text"),
        col(5, "c", 23, has_missing=True, missing="7"),
        col(6, "d"),
    )
    diff = column_diff(old, new)
    assert diff["renamed"] == {"a": "b"}
    assert diff["added"] == {"c": 7, "d": None}
    assert diff["dropped"] == ["gone"]
    assert diff["retyped"][0]["name"] == "n"
    assert diff["renamed_from"] == ["public", "t"]
    assert column_diff(None, new) == {"name": ["public", "t2"], "created": True}


def test_default_values_follow_the_json_of_images() -> None:
    assert default_value({"type_oid": 16, "has_missing": True, "missing": "t"}) is True
    assert default_value({"type_oid": 20, "has_missing": True, "missing": "12"}) == 12
    assert default_value({"type_oid": 1700, "has_missing": True, "missing": "1.50"}) == "1.50"
    assert default_value({"type_oid": 25, "has_missing": False, "missing": None}) is None


class _Source:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def chunks(self, max_bytes: int) -> Iterator[bytes]:
        yield self.data


def test_inserted_rows_renumber_the_transaction_and_its_messages() -> None:
    lines = b"".join(b"99\t%d\tT0\t1\t1\tI\t0\t5\t\\N\t[%d]\t{}\t\\N\t\\N\t\\N\n" % (i, i) for i in range(3))
    messages = [
        (0, 1, "cdc.context", b"{}"),
        (1, 2, "cdc.ddl", b"a"),
        (1, 3, "cdc.ddl", b"b"),
        (2, 4, "cdc.context", b"{}"),
    ]
    txn = FinishedTransaction(
        xid=1, position=99, commit_lsn=98, committed_at_us=0, committed_at_text="t", status="c", flags=0,
        origin=None, change_count=3, pending_count=0, first_lsn=1, last_lsn=2, messages=messages, counts={},
        _source=_Source(lines),
    )  # fmt: skip
    snap = [b"99\t0\tT\t1\t1\tS\t0\t99\t\\N\t[7]\t{}\t\\N\t\\N\t\\N\n"] * 2
    out = DdlHandler._insert(txn, [_Insert(1, 2, snap, 1)])
    got = b"".join(out.chunks(1 << 20)).splitlines()
    assert [line.split(b"\t")[1] for line in got] == [b"0", b"1", b"2", b"3", b"4"]
    assert [line.split(b"\t")[5] for line in got] == [b"I", b"S", b"S", b"I", b"I"]
    assert [m[0] for m in out.messages] == [0, 1, 1, 4]  # the message after the rows moved up
    assert out.change_count == 5 and out.counts == {(1, "S", False): 2}
