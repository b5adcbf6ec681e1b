"""A primary and a streaming physical standby of it, from the same binaries (the failover
tests, tests/faults/test_failover.py).

The standby is a ``pg_basebackup -R -X stream -C -S <slot>`` copy of the primary's data
directory, run by ``cdc.devdb.LocalPostgres`` on its own port (its settings replace the
primary's in the copied ``cdc_devdb.conf``): it follows the primary through the physical
slot ``STANDBY_SLOT`` with ``primary_conninfo`` naming a database, as slot synchronization
needs. ``promote()`` is ``pg_ctl promote -w``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg

from cdc.devdb import LocalPostgres
from cdc.lsn import parse_lsn

STANDBY_SLOT = "standby1"


@dataclass
class Cluster:
    primary: LocalPostgres
    standby: LocalPostgres

    def source_dsn(self, dbname: str) -> str:
        """The multi-host DSN the daemon, the workload and the checks use: the primary first."""
        return (
            f"host=127.0.0.1,127.0.0.1 port={self.primary.port},{self.standby.port} dbname={dbname} "
            "user=postgres target_session_attrs=primary"
        )

    def promote(self) -> None:
        out = self.standby.run_as_owner(
            [str(self.standby.bin("pg_ctl")), "-D", str(self.standby.data_dir), "promote", "-w", "-t", "60"]
        )
        assert out.returncode == 0, out.stdout + out.stderr

    def wait_replayed(self, timeout: float = 60) -> None:
        """Until the standby replayed everything the primary has written so far."""
        with psycopg.connect(self.primary.dsn(), autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        target = parse_lsn(row[0])
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.standby.dsn(), autocommit=True) as conn:
            while True:
                row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
                if row is not None and row[0] and parse_lsn(row[0]) >= target:
                    return
                assert time.monotonic() < deadline, "the standby did not catch up"
                time.sleep(0.05)

    def cleanup(self) -> None:
        self.standby.cleanup()
        self.primary.cleanup()


def start_cluster(flavor: str, primary_settings: dict[str, str], standby_settings: dict[str, str]) -> Cluster:
    """Start a primary, back it up into a standby and start that; both running on return."""
    primary = LocalPostgres(flavor=flavor, settings=primary_settings)
    standby: LocalPostgres | None = None
    try:
        primary.start()
        standby = LocalPostgres(bindir=primary.bindir, settings=standby_settings)
        out = primary.run_as_owner(
            [
                "pg_basebackup",
                "-D",
                str(standby.data_dir),
                "-R",  # standby.signal and primary_conninfo (with the dbname of -d)
                "-X",
                "stream",
                "-C",  # the physical slot on the primary
                "-S",
                STANDBY_SLOT,
                "-d",
                primary.dsn(),
            ],
            timeout=300,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        standby.start()
        cluster = Cluster(primary, standby)
        cluster.wait_replayed()
        return cluster
    except BaseException:
        if standby is not None:
            standby.cleanup()
        primary.cleanup()
        raise
