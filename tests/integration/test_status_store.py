"""`cdc status` on a store of format 2 (written by the store builder; no source)."""

from __future__ import annotations

import uuid
from typing import Any

from cdc.config import load_config
from cdc.lsn import format_lsn
from cdc.status import collect_status, render_status
from tests.store_builder import StoreBuilder, build_seed_000


def test_status_shows_the_version_range_and_counts(pg: Any) -> None:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    try:
        build_seed_000(b)
        b.table("gone", {"id": 20})
        b.drop("gone")
        b.finish(baseline=0x1_0000_0000)
        b.conn.execute("ANALYZE cdc_history.changes_default")
        status = collect_status(load_config(env={"CDC_STORE_DSN": b.dsn}))
        assert status.store_error is None, status.store_error
        assert (status.earliest_version, status.current_version) == (0x1_0000_0000, b.position)
        assert status.store_format == 2 and (status.tables, status.dropped_tables) == (3, 1)
        assert status.mutations == 6 and status.transactions is not None
        assert status.last_commit_at is not None and status.earliest_at is None  # nothing at the baseline
        lines = dict(render_status(status))
        assert lines["versions"].startswith(
            f"{format_lsn(0x1_0000_0000)} .. {format_lsn(b.position)} (2026-03-10"
        )
        assert lines["tables"] == "3 (1 dropped)" and lines["store format"] == "2"
        assert "password" not in str(status.as_json())
    finally:
        b.close()
        pg.drop_database(name)
