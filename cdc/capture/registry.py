"""The tables capture knows: the capture core's ``describe`` callback, and actor sequences.

``Registry.describe`` turns a Relation message (or the baseline's view of a table) into what the
core needs to encode its rows (``RelationInfo``): the table's identity in the store (``tables``,
one live row per relation oid), its names (``table_names``: a new row when the relation's schema
or name differs from the name in force at that position: a rename), its shape (``table_schemas``,
with each column's policy), the key columns and the column policies. Registrations are
idempotent (a registration repeated after a crash finds the existing rows), run on the
registry's own autocommit store connection, and are cached: a Relation message resent unchanged
costs a dictionary lookup.

The key: the columns pgoutput flags for REPLICA IDENTITY DEFAULT/INDEX; for FULL and NOTHING
the primary key read from the source catalog (a connection with a deadline), else keyless (all
columns name the row). A policy configured on a key column is refused by `cdc setup`
(:func:`key_policy_problems`); should one reach capture all the same (a key changed since), it
is never applied: it is reported once (``policy_on_key_column_ignored``) and capture goes on.
cdc's own tables on the source (schema ``cdc``: the context-signing key) are never captured:
they are described as ignored (the core drops their changes) and never registered.

This module is the only writer of ``tables``, ``table_names`` and ``table_schemas``. It reads
row data never, and logs no values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc.capture.model import Kind, Policy, RelationDesc, RelationInfo
from cdc.config import format_table
from cdc.errors import SourceUnavailableError, StoreUnavailableError, error_text
from cdc.lsn import format_lsn
from cdc.names import parse_table
from cdc.source import INTERNAL_SCHEMA, describe_table, primary_key
from cdc.watchdog import Deadline

log = structlog.get_logger("cdc.registry")

_POLICIES = {"exclude": Policy.EXCLUDE, "mask": Policy.MASK, "hash": Policy.HASH}

#: Table policies: column name -> "exclude" | "mask" | "hash", by canonical ``schema.name``.
ColumnPolicyConfig = Mapping[str, Mapping[str, str]]


def key_columns(
    replica_identity: str, flagged: tuple[str, ...], found_key: tuple[str, ...] | None, names: tuple[str, ...]
) -> tuple[str, ...]:
    """The columns naming a row, in key order; empty when the whole row names it (keyless).

    ``flagged``: the columns pgoutput flags (the replica identity); ``found_key``: the table's
    primary key. DEFAULT and INDEX identities name rows by the flagged columns; FULL (which
    flags every column) and NOTHING (none) by the primary key, if there is one."""
    if replica_identity in ("d", "i") and flagged:
        return flagged
    return found_key if found_key and set(found_key) <= set(names) else ()


def key_policy_problems(conn: psycopg.Connection[Any], policies: ColumnPolicyConfig) -> list[str]:
    """A column policy (``columns:`` of the config) on a column that names the row, for each
    configured table that exists on the source (``conn``): the key must stay readable, so such a
    policy is refused before capture starts. A keyless table is named by all its columns."""
    problems = []
    for table, configured in sorted(policies.items()):
        schema, name = parse_table(table)
        row = conn.execute(
            "SELECT c.oid, c.relreplident FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
            (schema, name),
        ).fetchone()
        if row is None:
            continue  # not there yet: capture checks it when it appears
        source = describe_table(conn, int(row[0]), schema, name, str(row[1]))
        names = tuple(c.name for c in source.columns)
        flagged = tuple(c.name for c in source.columns if c.is_key)
        key = key_columns(source.replica_identity, flagged, source.primary_key or None, names)
        note = "" if key else " (the table has no key: all its columns name a row)"
        for column, policy in sorted(configured.items()):
            if column in (key or names):
                problems.append(
                    f"columns.{table}.{column}: {column} is a key column of {table}{note}: it names the row, "
                    f"so it cannot be {_PAST.get(policy, policy)}; remove the policy"
                )
    return problems


_PAST = {"exclude": "excluded", "hash": "hashed", "mask": "masked"}


def _cache_key(desc: RelationDesc) -> tuple[Any, ...]:
    return (desc.oid, desc.namespace, desc.name, desc.replica_identity, desc.columns)


class Registry:
    """Registers captured tables in the store; one per capture session (or baseline).

    ``catalog`` is a source connection for primary keys (None: the tables are keyed by the
    flagged columns or keyless); ``report`` records a problem as the daemon's last error.
    """

    def __init__(
        self,
        store_dsn: str,
        schema: str,
        *,
        policies: ColumnPolicyConfig,
        catalog: psycopg.Connection[Any] | None = None,
        source_timeout: float = 30.0,
        store_timeout: float = 30.0,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.store_dsn = store_dsn
        self.schema = schema
        self.policies = policies
        self.catalog = catalog
        self.source_timeout = source_timeout
        self.store_timeout = store_timeout
        self.report = report
        self._conn: psycopg.Connection[Any] | None = None
        self._last: dict[int, tuple[tuple[Any, ...], RelationInfo]] = {}  # oid -> last desc seen
        self._table_ids: dict[int, int] = {}  # relation oid -> table_id
        self._schema_ids: dict[str, int] = {}  # fingerprint -> schema_id
        self._names: dict[int, str] = {}  # table_id -> current "schema.name" (metrics labels)
        self._primary_keys: dict[int, tuple[str, ...] | None] = {}
        self._warned: set[tuple[int, str]] = set()

    # -- connections -------------------------------------------------------------
    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(
                    self.store_dsn, autocommit=True, connect_timeout=10, application_name="cdc-registry"
                )
                self._conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
            except psycopg.OperationalError as exc:
                self._conn = None
                raise StoreUnavailableError(f"cannot reach the history store: {error_text(exc)}") from exc
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _store(self) -> Deadline:
        return Deadline(self.conn, self.store_timeout, _store_silent)

    # -- names ---------------------------------------------------------------------
    def table_name(self, table_id: int) -> str:
        """The table's current ``schema.name`` as this session knows it (for metrics labels)."""
        return self._names.get(table_id, str(table_id))

    # -- describe -------------------------------------------------------------------
    def describe(self, desc: RelationDesc) -> RelationInfo:
        """Register the relation (idempotent) and return how its rows are encoded."""
        key = _cache_key(desc)
        last = self._last.get(desc.oid)
        if last is not None and last[0] == key:
            return last[1]
        try:
            info = self._describe(desc)
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreUnavailableError(f"cannot register a table in the store: {error_text(exc)}") from exc
        self._last[desc.oid] = (key, info)
        return info

    def _describe(self, desc: RelationDesc) -> RelationInfo:
        names = tuple(c.name for c in desc.columns)
        if desc.namespace == INTERNAL_SCHEMA:
            return self._internal(desc, names)
        key_columns = self._key_columns(desc)
        keyless = not key_columns
        key = tuple(names.index(c) for c in key_columns) if key_columns else tuple(range(len(names)))
        configured = self.policies.get(format_table(desc.namespace, desc.name), {})
        policies: list[Policy] = []
        for index, name in enumerate(names):
            policy = _POLICIES.get(configured.get(name, ""), Policy.NONE)
            if policy is not Policy.NONE and index in key:
                self._ignored_policy(desc, name, configured[name])
                policy = Policy.NONE
            policies.append(policy)
        with self._store():
            table_id = self._table_id(desc)
            self._name(table_id, desc)
            schema_id = self._schema_id(table_id, desc, key_columns, policies)
        return RelationInfo(
            table_id=table_id,
            schema_id=schema_id,
            names=names,
            kinds=tuple(Kind.for_type(c.type_oid) for c in desc.columns),
            policies=tuple(policies),
            key=key,
            keyless=keyless,
        )

    def _internal(self, desc: RelationDesc, names: tuple[str, ...]) -> RelationInfo:
        """cdc's own tables on the source (the context-signing key among them) are never captured:
        an all-tables publication sends their changes too; the core drops them, nothing is
        registered in the store."""
        if (desc.oid, "") not in self._warned:
            self._warned.add((desc.oid, ""))
            log.info("internal_table_not_captured", table=format_table(desc.namespace, desc.name))
        return RelationInfo(
            table_id=0,
            schema_id=0,
            names=names,
            kinds=tuple(Kind.TEXT for _ in names),
            policies=tuple(Policy.NONE for _ in names),
            key=tuple(range(len(names))),
            keyless=True,
            ignored=True,
        )

    def _key_columns(self, desc: RelationDesc) -> tuple[str, ...]:
        """The columns naming a row, in key order; empty when the whole row names it."""
        flagged = tuple(c.name for c in desc.columns if c.flagged_key)
        if desc.replica_identity in ("d", "i") and flagged:
            return flagged
        names = tuple(c.name for c in desc.columns)
        return key_columns(desc.replica_identity, flagged, self._primary_key(desc.oid), names)

    def _primary_key(self, oid: int) -> tuple[str, ...] | None:
        if oid in self._primary_keys:
            return self._primary_keys[oid]
        catalog = self.catalog
        if catalog is None:
            return None
        try:
            with Deadline(catalog, self.source_timeout, _source_silent):
                found = primary_key(catalog, oid)
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"cannot read a table's primary key: {error_text(exc)}") from exc
        self._primary_keys[oid] = found
        return found

    def _ignored_policy(self, desc: RelationDesc, column: str, policy: str) -> None:
        if (desc.oid, column) in self._warned:
            return
        self._warned.add((desc.oid, column))
        table = format_table(desc.namespace, desc.name)
        log.error("policy_on_key_column_ignored", table=table, column=column, policy=policy)
        if self.report is not None:
            self.report(
                f"columns.{table}.{column}: a key column cannot be {_PAST.get(policy, policy)} (it names "
                "the row); the policy is not applied"
            )

    def _table_id(self, desc: RelationDesc) -> int:
        found = self._table_ids.get(desc.oid)
        if found is not None:
            return found
        conn = self.conn
        row = conn.execute(
            "INSERT INTO tables (relation_oid, first_position) VALUES (%s, %s) "
            "ON CONFLICT (relation_oid) WHERE dropped_position IS NULL DO NOTHING RETURNING table_id",
            (desc.oid, desc.lsn),
        ).fetchone()
        if row is None:
            row = conn.execute(
                "SELECT table_id FROM tables WHERE relation_oid = %s AND dropped_position IS NULL",
                (desc.oid,),
            ).fetchone()
        assert row is not None
        table_id = int(row[0])
        self._table_ids[desc.oid] = table_id
        log.debug("table_registered", table_id=table_id, lsn=format_lsn(desc.lsn))
        return table_id

    def _name(self, table_id: int, desc: RelationDesc) -> None:
        """A new ``table_names`` row when the name in force at the message's position differs."""
        conn = self.conn
        row = conn.execute(
            "SELECT schema_name, table_name FROM table_names WHERE table_id = %s AND from_position <= %s "
            "ORDER BY from_position DESC LIMIT 1",
            (table_id, desc.lsn),
        ).fetchone()
        if row is None or (row[0], row[1]) != (desc.namespace, desc.name):
            conn.execute(
                "INSERT INTO table_names (table_id, schema_name, table_name, from_position) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (table_id, from_position) DO NOTHING",
                (table_id, desc.namespace, desc.name, desc.lsn),
            )
            if row is not None:
                log.info(
                    "table_renamed",
                    table_id=table_id,
                    table=format_table(desc.namespace, desc.name),
                    previous=format_table(str(row[0]), str(row[1])),
                    lsn=format_lsn(desc.lsn),
                )
        self._names[table_id] = format_table(desc.namespace, desc.name)

    def _schema_id(
        self, table_id: int, desc: RelationDesc, key_columns: tuple[str, ...], policies: list[Policy]
    ) -> int:
        columns: list[dict[str, Any]] = []
        for column, policy in zip(desc.columns, policies, strict=True):
            entry: dict[str, Any] = {
                "name": column.name,
                "type_oid": column.type_oid,
                "type_modifier": column.type_modifier,
                "key": column.name in key_columns,
            }
            if policy is not Policy.NONE:
                entry["policy"] = policy.name.lower()
            columns.append(entry)
        text = json.dumps(columns, separators=(",", ":"), ensure_ascii=False)
        fingerprint = hashlib.sha256(
            json.dumps([table_id, desc.replica_identity, list(key_columns), columns], sort_keys=True).encode()
        ).hexdigest()[:32]
        found = self._schema_ids.get(fingerprint)
        if found is not None:
            return found
        row = self.conn.execute(
            "INSERT INTO table_schemas (table_id, replica_identity, key_columns, columns, fingerprint, "
            "first_position) VALUES (%s, %s, %s, %s::jsonb, %s, %s) ON CONFLICT (fingerprint) DO UPDATE SET "
            "first_position = least(table_schemas.first_position, EXCLUDED.first_position) RETURNING schema_id",
            (table_id, desc.replica_identity, list(key_columns), text, fingerprint, desc.lsn),
        ).fetchone()
        assert row is not None
        self._schema_ids[fingerprint] = int(row[0])
        return int(row[0])

    # -- schema changes (cdc/capture/ddl.py) ------------------------------------------
    def live_table(self, oid: int) -> int | None:
        """The live table of a relation oid, if capture knows it (no registration)."""
        found = self._table_ids.get(oid)
        if found is not None:
            return found
        with self._store():
            row = self.conn.execute(
                "SELECT table_id FROM tables WHERE relation_oid = %s AND dropped_position IS NULL", (oid,)
            ).fetchone()
        return int(row[0]) if row else None

    def forget(self, oid: int) -> None:
        """The relation was dropped: the oid, if seen again, is a new table."""
        table_id = self._table_ids.pop(oid, None)
        self._last.pop(oid, None)
        self._primary_keys.pop(oid, None)
        if table_id is not None:
            self._names.pop(table_id, None)

    # -- actor sequences -----------------------------------------------------------
    def actor_last_seq(self, actor: str) -> int:
        """The last sequence number stored for ``actor`` (0: none yet)."""
        try:
            with self._store():
                row = self.conn.execute(
                    "SELECT last_seq FROM actor_sequences WHERE actor = %s", (actor,)
                ).fetchone()
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreUnavailableError(f"cannot read an actor's sequence: {error_text(exc)}") from exc
        return int(row[0]) if row else 0


def _source_silent(what: str) -> SourceUnavailableError:
    return SourceUnavailableError(f"the source went silent: a catalog query had {what}")


def _store_silent(what: str) -> StoreUnavailableError:
    return StoreUnavailableError(f"the history store went silent: a query had {what}")
