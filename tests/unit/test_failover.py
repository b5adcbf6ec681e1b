"""Source failover without servers: the source DSN's hosts, the timeline history, and the
decision whether capture may resume on a server (cdc/source_hosts.py, cdc/capture/failover.py)."""

from __future__ import annotations

import pytest
from psycopg import sql

from cdc.capture.failover import SlotView, SourceServer, Switch, assess, parse_history
from cdc.config import load_config
from cdc.errors import ConfigError, SourceUnavailableError
from cdc.failover_readiness import create_slot_command
from cdc.lsn import parse_lsn
from cdc.source_hosts import dsn_problems, host_dsns, parse_host, source_dsn, source_hosts

# ============================================================================ hosts


def test_multi_host_dsn_targets_the_primary() -> None:
    assert "target_session_attrs=primary" in source_dsn("host=a,b port=5432,5433 dbname=app")
    # read-write is kept; a single host is left alone
    assert "target_session_attrs=read-write" in source_dsn(
        "host=a,b dbname=x target_session_attrs=read-write"
    )
    assert source_dsn("host=a dbname=x") == "host=a dbname=x"
    uri = source_dsn("postgresql://u:pw@a:5432,b:5433/app")
    assert "target_session_attrs=primary" in uri and "host=a,b" in uri and "port=5432,5433" in uri


def test_hosts_replace_the_dsn_host_and_port() -> None:
    dsn = source_dsn("host=old port=1 dbname=app user=cdc", ["db1:5432", "db2", "[::1]:5433"])
    assert "host=db1,db2,::1" in dsn and "port=5432,5432,5433" in dsn
    assert "target_session_attrs=primary" in dsn
    assert [h.label for h in source_hosts(dsn)] == ["db1:5432", "db2:5432", "[::1]:5433"]


def test_host_dsns_name_each_server_alone() -> None:
    pairs = host_dsns("host=a,b port=5432,5433 dbname=app password=secret target_session_attrs=primary")
    assert [h.label for h, _ in pairs] == ["a:5432", "b:5433"]
    for host, dsn in pairs:
        assert f"host={host.host}" in dsn and "target_session_attrs=any" in dsn and "password=secret" in dsn


@pytest.mark.parametrize("text", ["a:b:c", "", "host name", "a:99999", "[zz]:1"])
def test_parse_host_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host(text)


def test_dsn_problems() -> None:
    assert dsn_problems("host=a,b dbname=x target_session_attrs=primary") == []
    assert "target_session_attrs=standby" in dsn_problems("host=a,b target_session_attrs=standby")[0]
    assert "3 values in port but 2 hosts" in dsn_problems("host=a,b port=1,2,3")[0]


def test_config_source_hosts_and_failover() -> None:
    config = load_config(
        env={
            "CDC_SOURCE_DSN": "dbname=app user=cdc password=secret",
            "CDC_SOURCE__HOSTS": "db1,db2:5433",
            "CDC_SOURCE__FAILOVER": "true",
        }
    )
    assert config.source.failover is True
    assert config.source.hosts == ("db1", "db2:5433")
    assert "host=db1,db2" in config.require_source()
    with pytest.raises(ConfigError) as caught:
        load_config(env={"CDC_SOURCE_DSN": "host=a,b password=secret target_session_attrs=read-only"})
    assert "read-only" in str(caught.value) and "secret" not in str(caught.value)


def test_failover_slot_command() -> None:
    def text(command: sql.SQL) -> str:
        return command.as_string(None)

    assert "FAILOVER true" in text(create_slot_command(170000, True))
    assert "FAILOVER" not in text(create_slot_command(170000, False))
    assert "FAILOVER" not in text(create_slot_command(160000, True))  # setup warns instead
    assert "EXPORT_SNAPSHOT" in text(create_slot_command(140000, False))


# ============================================================================ timelines


def test_parse_history() -> None:
    content = "1\t0/3000860\tno recovery target specified\n\n2\t0/5000000\tbefore 2026-12-01\n"
    assert parse_history(content) == {1: parse_lsn("0/3000860"), 2: parse_lsn("0/5000000")}


# ============================================================================ the decision

A, B = "a:5432", "b:5432"
ACKED = parse_lsn("0/4000000")


def previous(host: str = A, timeline: int = 1, outcome: str = "first") -> Switch:
    return Switch(1, host, timeline, outcome, ACKED, None, None)


def synced(confirmed: str = "0/3F00000") -> SlotView:
    return SlotView(parse_lsn(confirmed), "reserved", True, True)


def decide(
    prev: Switch | None, server: SourceServer, view: SlotView | None, history: dict[int, int] | None = None
) -> tuple[str, str | None]:
    verdict = assess(slot="cdc", previous=prev, server=server, acked_lsn=ACKED, view=view, history=history)
    return verdict.outcome, verdict.reason


def test_first_session_and_same_server() -> None:
    assert decide(None, SourceServer(A, "1", 1), synced())[0] == "first"
    assert decide(previous(), SourceServer(A, "1", 1), synced())[0] == "same"


def test_promotion_with_a_synchronized_slot_resumes() -> None:
    history = {1: parse_lsn("0/4800000")}
    outcome, reason = decide(previous(), SourceServer(B, "1", 2), synced(), history)
    assert outcome == "resumed" and reason is not None and "synchronized" in reason
    # the acked position exactly at the fork point is in the new history too
    assert decide(previous(), SourceServer(B, "1", 2), synced(), {1: ACKED})[0] == "resumed"


def test_promotion_without_the_slot_is_a_gap() -> None:
    outcome, reason = decide(previous(), SourceServer(B, "1", 2), None, {1: parse_lsn("0/4800000")})
    assert outcome == "gap"
    assert reason is not None and "not synchronized" in reason and "0/4000000" in reason


def test_slot_confirmed_past_the_store_is_a_gap() -> None:
    outcome, reason = decide(previous(), SourceServer(A, "1", 1), synced("0/4000100"))
    assert outcome == "gap" and reason is not None and "consumed elsewhere" in reason
    assert decide(previous(), SourceServer(A, "1", 1), SlotView(ACKED, "lost", None, None))[0] == "gap"
    assert decide(None, SourceServer(A, "1", 1), None)[0] == "gap"


def test_acked_past_the_fork_point_is_a_fork() -> None:
    outcome, reason = decide(previous(), SourceServer(B, "1", 2), synced(), {1: parse_lsn("0/3FFFFFF")})
    assert outcome == "fork" and reason is not None and "never reached the promoted one" in reason
    # a history that does not descend from the timeline capture read: cannot be checked
    assert decide(previous(timeline=2), SourceServer(B, "1", 3), synced(), {1: ACKED})[0] == "fork"


def test_two_promotions_while_stopped() -> None:
    history = {1: parse_lsn("0/4800000"), 2: parse_lsn("0/5000000")}
    assert decide(previous(), SourceServer(A, "1", 3), synced(), history)[0] == "resumed"


def test_an_old_primary_is_refused_and_retried() -> None:
    with pytest.raises(SourceUnavailableError) as caught:
        decide(previous(B, 2), SourceServer(A, "1", 1), synced())
    assert caught.value.retryable and "older than timeline 2" in caught.value.message
