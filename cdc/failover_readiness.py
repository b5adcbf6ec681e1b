"""Is the slot ready to survive a promotion? The settings a failover slot needs, checked on
the primary and on every standby the source DSN names (`cdc setup`, `cdc status`).

PostgreSQL 17+ keeps a logical slot through a promotion when (docs/reliability.md):

- the slot is a failover slot (``CREATE_REPLICATION_SLOT ... (FAILOVER true)``; cdc does it
  with ``source.failover: true``);
- on the primary, ``synchronized_standby_slots`` lists the standby's physical slot, so logical
  decoding never sends a change the standby has not received (else a promotion can lose
  changes the history already holds: a fork);
- on the standby: ``sync_replication_slots = on``, ``hot_standby_feedback = on``,
  ``primary_slot_name`` set (to that physical slot), ``dbname`` in ``primary_conninfo`` and
  ``wal_level = logical``;
- the standby's copy of the slot exists, ``synced``, not ``temporary`` (its first
  synchronization completes once the primary's slot moves on) and not invalidated.

Every problem says what to set. Nothing here changes a server; no setting's value that may
hold a secret (``primary_conninfo``) is ever printed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdc.errors import error_text
from cdc.lsn import format_lsn, parse_lsn
from cdc.source_hosts import connected_host, host_dsns

__all__ = ["FailoverReadiness", "StandbyView", "check_primary", "check_standby", "readiness"]

_STANDBY_SETTINGS = ("wal_level", "sync_replication_slots", "hot_standby_feedback", "primary_slot_name")


@dataclass
class StandbyView:
    """A standby's own view: its settings and its copy of the slot."""

    host: str
    error: str | None = None  # unreachable
    role: str | None = None  # standby | primary
    slot: str | None = None  # synced | temporary | missing | not synced | invalidated (<reason>)
    slot_confirmed_lsn: str | None = None
    primary_slot_name: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.error is None and self.role == "standby" and self.slot == "synced" and not self.problems


@dataclass
class FailoverReadiness:
    """The primary's side and each standby's: whether a promotion keeps the slot."""

    server_version: int = 0
    primary: str | None = None  # host:port
    slot_failover: bool | None = None
    synchronized_standby_slots: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the primary's side
    standbys: list[StandbyView] = field(default_factory=list)

    @property
    def supported(self) -> bool:
        return self.server_version >= 170000

    @property
    def ready(self) -> bool:
        return self.supported and not self.problems and any(s.ready for s in self.standbys)

    def all_problems(self) -> list[str]:
        found = list(self.problems)
        found += [f"standby {s.host}: {p}" for s in self.standbys for p in s.problems]
        if self.supported and not self.standbys:
            found.append(
                "no standby is named in the source DSN: name every server (host=primary,standby ... "
                "target_session_attrs=primary, or source.hosts) so capture follows a promotion and "
                "`cdc status` can check the standby's copy of the slot"
            )
        return found

    def as_json(self) -> dict[str, Any]:
        return {
            "supported": self.supported,
            "ready": self.ready,
            "primary": self.primary,
            "slot_failover": self.slot_failover,
            "synchronized_standby_slots": self.synchronized_standby_slots,
            "problems": self.all_problems(),
            "standbys": [
                {
                    "host": s.host,
                    "error": s.error,
                    "role": s.role,
                    "slot": s.slot,
                    "slot_confirmed_lsn": s.slot_confirmed_lsn,
                    "primary_slot_name": s.primary_slot_name,
                    "ready": s.ready,
                }
                for s in self.standbys
            ],
        }


def _setting(conn: psycopg.Connection[Any], name: str) -> str | None:
    row = conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()
    return str(row[0]) if row and row[0] is not None else None


def _reload(setting: str, value: str) -> str:
    return f"ALTER SYSTEM SET {setting} = {value}; SELECT pg_reload_conf();"


def check_primary(conn: psycopg.Connection[Any], slot: str, result: FailoverReadiness) -> None:
    """The primary's side: the slot's failover flag and synchronized_standby_slots."""
    result.server_version = conn.info.server_version
    result.primary = connected_host(conn)
    if not result.supported:
        result.problems.append(
            f"failover slots need PostgreSQL 17 or later (the source is {result.server_version // 10000}): "
            "a promoted standby has no copy of the slot, and capture stops at a recorded gap"
        )
        return
    row = conn.execute(
        "SELECT failover FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
        (slot,),
    ).fetchone()
    result.slot_failover = bool(row[0]) if row else None
    if row is None:
        result.problems.append(f"slot {slot!r} does not exist on the primary: run `cdc setup`")
    elif not row[0]:
        result.problems.append(
            f"slot {slot!r} is not a failover slot: set source.failover: true and run `cdc setup` "
            f"(it runs ALTER_REPLICATION_SLOT {slot} (FAILOVER true) while the daemon is stopped)"
        )
    value = _setting(conn, "synchronized_standby_slots") or ""
    names = [n.strip().strip('"') for n in value.split(",") if n.strip()]
    result.synchronized_standby_slots = names
    physical = {
        str(r[0]): (bool(r[1]), r[2])
        for r in conn.execute(
            "SELECT slot_name, active, wal_status FROM pg_replication_slots WHERE slot_type = 'physical'"
        ).fetchall()
    }
    if not names:
        suggestion = ", ".join(sorted(physical)) or "<the standby's primary_slot_name>"
        result.problems.append(
            "synchronized_standby_slots is empty on the primary: capture may receive changes the standby "
            "has not, which a promotion loses while the history keeps them. Set it to the standby's "
            f"physical slot: {_reload('synchronized_standby_slots', repr(suggestion))}"
        )
    for name in names:
        if name == "*":
            continue
        state = physical.get(name)
        if state is None:
            result.problems.append(
                f"synchronized_standby_slots names {name!r}, which is no physical slot on the primary: "
                "logical decoding waits for it, capture stalls. Create it "
                f"(SELECT pg_create_physical_replication_slot('{name}');) for the standby, or remove it"
            )
        elif state[1] == "lost":
            result.problems.append(f"physical slot {name!r} is invalidated: rebuild its standby")
        elif not state[0]:
            result.problems.append(
                f"physical slot {name!r} is not in use: its standby is disconnected, and capture waits for it"
            )


def check_standby(
    conn: psycopg.Connection[Any], slot: str, primary: FailoverReadiness, view: StandbyView
) -> None:
    """A standby's side: the settings slot synchronization needs and its copy of the slot."""
    in_recovery = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    view.role = "standby" if in_recovery and in_recovery[0] else "primary"
    if view.role != "standby":
        return
    if conn.info.server_version < 170000:
        view.problems.append("PostgreSQL 17 or later is needed to synchronize a slot")
        return
    settings = {name: _setting(conn, name) for name in _STANDBY_SETTINGS}
    if settings["wal_level"] != "logical":
        view.problems.append("set wal_level = logical on the standby (ALTER SYSTEM, then restart it)")
    if settings["sync_replication_slots"] != "on":
        view.problems.append(f"set sync_replication_slots: {_reload('sync_replication_slots', 'on')}")
    if settings["hot_standby_feedback"] != "on":
        view.problems.append(f"set hot_standby_feedback: {_reload('hot_standby_feedback', 'on')}")
    name = settings["primary_slot_name"] or ""
    view.primary_slot_name = name or None
    if not name:
        view.problems.append(
            "primary_slot_name is not set: create a physical slot on the primary "
            "(SELECT pg_create_physical_replication_slot('standby1');), then on the standby "
            f"{_reload('primary_slot_name', repr('standby1'))}"
        )
    elif (
        primary.supported
        and primary.synchronized_standby_slots
        and name not in primary.synchronized_standby_slots
    ):
        view.problems.append(
            f"its physical slot {name!r} is not in the primary's synchronized_standby_slots "
            f"({', '.join(primary.synchronized_standby_slots)}): add it"
        )
    conninfo = _setting(conn, "primary_conninfo")  # never printed: it may hold a password
    if conninfo is not None and "dbname" not in conninfo:
        view.problems.append(
            "primary_conninfo has no dbname: slot synchronization needs one (add dbname=postgres to it)"
        )
    row = conn.execute(
        "SELECT synced, temporary, invalidation_reason, confirmed_flush_lsn::text FROM pg_replication_slots "
        "WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        view.slot = "missing"
        view.problems.append(f"slot {slot!r} is not synchronized to this standby (yet)")
        return
    synced, temporary, invalid, confirmed = row
    view.slot_confirmed_lsn = format_lsn(parse_lsn(confirmed)) if confirmed else None
    if invalid:
        view.slot = f"invalidated ({invalid})"
        view.problems.append(f"its copy of slot {slot!r} is invalidated ({invalid})")
    elif not synced:
        view.slot = "not synced"
        view.problems.append(f"a slot {slot!r} exists here but is not synchronized from the primary")
    elif temporary:
        view.slot = "temporary"
        view.problems.append(
            f"the first synchronization of slot {slot!r} is not complete: it completes once capture "
            "confirms a position the standby has received (keep the daemon running)"
        )
    else:
        view.slot = "synced"


def readiness(source_dsn: str, slot: str, *, connect_timeout: int = 5) -> FailoverReadiness:
    """Both sides: the primary (``source_dsn``) and every other server the DSN names."""
    result = FailoverReadiness()
    with psycopg.connect(source_dsn, autocommit=True, connect_timeout=connect_timeout) as conn:
        conn.execute("SET statement_timeout = '10s'")
        check_primary(conn, slot, result)
    for host, dsn in host_dsns(source_dsn, connect_timeout=connect_timeout):
        if host.label == result.primary:
            continue
        view = StandbyView(host.label)
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("SET statement_timeout = '10s'"))
                if connected_host(conn) == result.primary:
                    continue
                check_standby(conn, slot, result, view)
        except psycopg.Error as exc:
            view.error = error_text(exc)
        if view.role == "primary":
            result.problems.append(f"{host.label} is a primary too: two primaries (an old one not fenced)?")
        else:
            result.standbys.append(view)
    return result


# ============================================================================ `cdc setup`


def create_slot_command(server_version: int, failover: bool) -> sql.SQL:
    """CREATE_REPLICATION_SLOT exporting its snapshot; a failover slot on 17+ when asked."""
    if server_version >= 170000 and failover:
        return sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER true)")
    if server_version >= 150000:
        return sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')")
    return sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT")


def align_slot_failover(source_dsn: str, slot: str, failover: bool, options: str) -> str | None:
    """Set an existing slot's failover flag to ``failover`` (17+); what was done, or None."""
    with psycopg.connect(
        source_dsn, replication="database", autocommit=True, connect_timeout=10, options=options
    ) as repl:
        if repl.info.server_version < 170000:
            return None
        with psycopg.connect(source_dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT failover, active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            ).fetchone()
        if row is None or bool(row[0]) == failover:
            return None
        if row[1]:
            raise _SlotActive(slot)
        repl.execute(
            sql.SQL("ALTER_REPLICATION_SLOT {} (FAILOVER {})").format(
                sql.Identifier(slot), sql.SQL("true" if failover else "false")
            )
        )
        return f"source: slot {slot} failover {'on' if failover else 'off'}"


class _SlotActive(Exception):  # noqa: N818 - turned into a warning by setup_failover
    pass


def setup_failover(config: Any, source_dsn: str, options: str) -> tuple[list[str], list[str]]:
    """`cdc setup`'s part: align the slot's failover flag with ``source.failover``, then check
    what a promotion needs. Returns (steps done, warnings)."""
    slot, wanted = config.source.slot, bool(config.source.failover)
    steps: list[str] = []
    warnings: list[str] = []
    try:
        done = align_slot_failover(source_dsn, slot, wanted, options)
    except _SlotActive:
        warnings.append(
            f"slot {slot} is in use: stop `cdc run`, then run `cdc setup` again to turn its failover flag "
            f"{'on' if wanted else 'off'}"
        )
        done = None
    if done:
        steps.append(done)
    several = len(host_dsns(source_dsn)) > 1
    if not wanted:
        if several:
            warnings.append(
                "the source DSN names several servers but source.failover is off: the slot does not "
                "survive a promotion; capture then stops at a recorded gap (set source.failover: true, "
                "PostgreSQL 17+)"
            )
        return steps, warnings
    result = readiness(source_dsn, slot)
    if result.ready:
        ready = ", ".join(s.host for s in result.standbys if s.ready)
        steps.append(f"source: slot {slot} is a failover slot, synchronized to {ready}")
    warnings.extend(f"failover: {p}" for p in result.all_problems())
    return steps, warnings


# ============================================================================ `cdc status`


def failover_json(source_dsn: str, slot: str, wanted: bool) -> dict[str, Any] | None:
    """The readiness as `cdc status` shows it; None on a single server without failover."""
    several = len(host_dsns(source_dsn)) > 1
    try:
        result = readiness(source_dsn, slot)
    except psycopg.Error as exc:
        return {"ready": False, "error": error_text(exc)}
    if not (wanted or several or result.slot_failover):
        return None
    data = result.as_json()
    data["enabled"] = wanted
    return data


def failover_lines(
    server: str | None,
    failover: dict[str, Any] | None,
    switches: list[dict[str, Any]],
    pending: str | None,
) -> list[tuple[str, str]]:
    """(label, value) lines for the table form of `cdc status`."""
    lines: list[tuple[str, str]] = []
    if server is not None:
        lines.append(("source server", server))
    if failover is not None:
        if "error" in failover:
            lines.append(("failover", f"UNKNOWN: {failover['error']}"))
        else:
            state = "READY" if failover["ready"] else "NOT READY"
            lines.append(
                ("failover", f"{state} (slot failover: {'yes' if failover['slot_failover'] else 'no'})")
            )
            for standby in failover["standbys"]:
                what = standby["error"] and f"UNREACHABLE: {standby['error']}"
                what = what or f"slot {standby['slot']}" + (
                    f" at {standby['slot_confirmed_lsn']}" if standby["slot_confirmed_lsn"] else ""
                )
                lines.append(("standby", f"{standby['host']}: {what}"))
            lines.extend(("failover problem", problem) for problem in failover["problems"])
    if pending is not None:
        lines.append(("CAPTURE STOPPED", f"{pending} (run `cdc setup --recreate-slot`)"))
    for switch in switches[:3]:
        lines.append(
            (
                "source switch",
                f"{switch['at']}: {switch['outcome']} on {switch['host']} timeline {switch['timeline']}"
                + (
                    f" (from {switch['previous_host']} timeline {switch['previous_timeline']})"
                    if switch["previous_host"]
                    else ""
                )
                + f", acknowledged {switch['acked_lsn']}",
            )
        )
    return lines
