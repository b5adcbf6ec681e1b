"""The source's servers: a primary and its standbys, named in one libpq DSN.

A source that fails over is named by a multi-host DSN (``host=a,b port=5432,5432 ...
target_session_attrs=primary``), or by ``source.hosts`` in the config, which replaces the
DSN's host and port with the list. libpq then tries the hosts in order and keeps the first
that is a primary, for every connection cdc makes to the source (replication ones too:
``replication=database`` connections honour ``target_session_attrs``, checked on PostgreSQL
15 and 18). A multi-host DSN without ``target_session_attrs`` gets ``primary``: capture never
reads from a standby. ``read-write`` is accepted too; ``standby``, ``read-only`` and
``prefer-standby`` are refused.

Readers of one server at a time (``cdc status``, the standby checks of ``cdc setup``) take
each host alone (``host_dsns``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

__all__ = [
    "SourceHost",
    "connected_host",
    "dsn_problems",
    "host_dsns",
    "parse_host",
    "source_dsn",
    "source_hosts",
]

#: ``target_session_attrs`` values that keep capture on the primary.
PRIMARY_ATTRS = ("primary", "read-write")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s,:\[\]]+))(?::(?P<port>[0-9]{1,5}))?$")


@dataclass(frozen=True, slots=True)
class SourceHost:
    """One server of the source as the DSN names it."""

    host: str  # a name, an address or a unix socket directory ('' = libpq's default)
    port: str  # '' = libpq's default
    hostaddr: str = ""

    @property
    def label(self) -> str:
        """``host:port``, as logs, metrics and ``cdc status`` show it."""
        host = self.host or self.hostaddr or "localhost"
        host = f"[{host}]" if ":" in host and not host.startswith("/") else host
        return f"{host}:{self.port or '5432'}"


def parse_host(text: str) -> tuple[str, str]:
    """``name``, ``name:5433``, ``10.0.0.1:5432``, ``[::1]:5432`` → (host, port); ValueError else."""
    match = _HOST_PORT.match(text.strip())
    if match is None:
        raise ValueError("expected host or host:port ([::1]:5432 for an IPv6 address)")
    port = match.group("port") or ""
    if port and not 0 < int(port) < 65536:
        raise ValueError("port out of range")
    return match.group("v6") or match.group("host"), port


def _params(dsn: str) -> dict[str, Any]:
    try:
        return conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        # libpq's message may quote the DSN: never repeat it.
        raise ValueError("the source DSN does not parse as a libpq connection string") from exc


def _split(value: Any) -> list[str]:
    return [part.strip() for part in str(value).split(",")] if value not in (None, "") else []


def source_hosts(dsn: str) -> list[SourceHost]:
    """The servers a DSN names, in the order libpq tries them."""
    params = _params(dsn)
    hosts, addrs, ports = (
        _split(params.get("host")),
        _split(params.get("hostaddr")),
        _split(params.get("port")),
    )
    count = max(len(hosts), len(addrs), 1)

    def pick(values: list[str], i: int) -> str:
        if not values:
            return ""
        return values[i] if len(values) > 1 else values[0]

    return [SourceHost(pick(hosts, i), pick(ports, i), pick(addrs, i)) for i in range(count)]


def dsn_problems(dsn: str) -> list[str]:
    """What makes a DSN unfit to follow a primary (never quoting the DSN)."""
    try:
        params = _params(dsn)
        hosts = source_hosts(dsn)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    count = len(hosts)
    for key in ("host", "hostaddr", "port"):
        n = len(_split(params.get(key)))
        if n > 1 and n != count:
            problems.append(f"the source DSN lists {n} values in {key} but {count} hosts")
    attrs = params.get("target_session_attrs")
    if count > 1 and attrs not in (None, "", "any", *PRIMARY_ATTRS):
        problems.append(
            f"the source DSN has target_session_attrs={attrs}: capture needs the primary "
            "(target_session_attrs=primary, the default cdc sets for a multi-host DSN)"
        )
    return problems


def source_dsn(dsn: str, hosts: Sequence[str] = ()) -> str:
    """The DSN every source connection uses: ``hosts`` (``host:port``) replacing the DSN's
    host and port when given; ``target_session_attrs=primary`` when several hosts are named
    and the DSN does not choose (``any`` counts as not choosing: a standby cannot be captured)."""
    if not hosts:
        try:
            params = _params(dsn)
        except ValueError:
            return dsn  # libpq says what is wrong when it connects
        if len(source_hosts(dsn)) < 2 or params.get("target_session_attrs") in PRIMARY_ATTRS:
            return dsn
    else:
        params = _params(dsn)
        pairs = [parse_host(h) for h in hosts]
        params.pop("hostaddr", None)
        params["host"] = ",".join(h for h, _ in pairs)
        params["port"] = ",".join(p or "5432" for _, p in pairs)
    if len(source_hosts(make_conninfo("", **params))) > 1 and params.get("target_session_attrs") in (
        None,
        "",
        "any",
    ):
        params["target_session_attrs"] = "primary"
    return make_conninfo("", **params)


def host_dsns(dsn: str, *, connect_timeout: int = 5) -> list[tuple[SourceHost, str]]:
    """Each server of a DSN alone (any role: primary or standby), for reading its own view."""
    params = _params(dsn)
    result = []
    for host in source_hosts(dsn):
        one = dict(params)
        for key, value in (("host", host.host), ("port", host.port), ("hostaddr", host.hostaddr)):
            if value:
                one[key] = value
            else:
                one.pop(key, None)
        one["target_session_attrs"] = "any"
        one["connect_timeout"] = str(connect_timeout)
        result.append((host, make_conninfo("", **one)))
    return result


def connected_host(conn: psycopg.Connection[Any]) -> str:
    """``host:port`` of the server a connection reached (the one libpq chose among several)."""
    info = conn.info
    host = info.host or info.hostaddr or "localhost"
    return SourceHost(host, str(info.port)).label
