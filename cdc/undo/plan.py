"""Planning undo: the inverse of a request's committed changes (revert) or the statements that
put one row back to a version (restore), with their conflicts, expectations and notes."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from cdc.errors import NotFoundError, RefusedError, UsageError
from cdc.lsn import format_lsn, parse_lsn
from cdc.query import Mutation, Row, Store, TableInfo, format_key
from cdc.undo.model import (
    _LOG_PAGE,
    ColumnDiff,
    Conflict,
    RevertPlan,
    RowExpectation,
)
from cdc.undo.redactions import (
    _Redactions,
)
from cdc.undo.source import (
    _delete,
    _insert,
    _key_condition,
    _one_row,
    _reading,
    _refuse_oversize,
    _render,
    _row_condition,
    _Source,
    _Table,
    _update,
)

# ============================================================================ foreign keys


@dataclass(frozen=True)
class _Step:
    """One inverse statement and the rows it touches (for grouping)."""

    statement: sql.Composed
    table: str
    rows: frozenset[str]  # "table US canonical key" of every key it reads or writes
    keyless: bool


def _related(conn: psycopg.Connection[Any], tables: Iterable[_Table]) -> dict[str, int]:
    """Each table linked by a foreign key to another touched table (or itself) → its component.

    Tables in the same component (transitively linked) are related; a table without such a
    link is absent.
    """
    by_oid = {t.oid: t.name for t in tables}
    if not by_oid:
        return {}
    rows = conn.execute(
        "SELECT conrelid::pg_catalog.int8, confrelid::pg_catalog.int8 FROM pg_catalog.pg_constraint "
        "WHERE contype = 'f' AND conrelid = ANY(%(o)s::pg_catalog.oid[]) "
        "AND confrelid = ANY(%(o)s::pg_catalog.oid[])",
        {"o": list(by_oid)},
    ).fetchall()
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for child, referenced in rows:
        a, b = root(by_oid[int(child)]), root(by_oid[int(referenced)])
        parent[a] = b
    roots = sorted({root(name) for name in parent})
    return {name: roots.index(root(name)) for name in parent}


def _group(
    steps: Sequence[_Step], related: Mapping[str, int]
) -> tuple[list[sql.Composed], list[tuple[int, ...]]]:
    """Merge consecutive inverses on tables linked by foreign keys into one statement.

    Reversing a request replays its row changes backwards, one statement each; a foreign key
    is checked at the end of each statement, so the inverse of a cascade (a parent deleted,
    then its children by ON DELETE CASCADE / SET NULL) would insert a child before its parent.
    Consecutive inverses on tables linked (transitively) by foreign keys that touch different
    rows therefore run as one statement (data-modifying WITH queries: every foreign key is
    checked at its end), each returning its row count. Other steps stay plain statements.
    """
    groups: list[list[_Step]] = []
    for step in steps:
        group = groups[-1] if groups else None
        if (
            group is not None
            and step.table in related
            and related[step.table] == related.get(group[0].table)
            and not any(step.rows & other.rows for other in group)
            and not (step.keyless and any(other.table == step.table for other in group))
        ):
            group.append(step)
        else:
            groups.append([step])
    statements: list[sql.Composed] = []
    expected: list[tuple[int, ...]] = []
    for group in groups:
        if len(group) == 1:
            statements.append(group[0].statement)
        else:
            names = [sql.Identifier(f"s{i}") for i in range(1, len(group) + 1)]
            statements.append(
                sql.SQL("WITH\n  {ctes}\nSELECT {counts}").format(
                    ctes=sql.SQL(",\n  ").join(
                        sql.SQL("{} AS ({} RETURNING 1)").format(n, step.statement)
                        for n, step in zip(names, group, strict=True)
                    ),
                    counts=sql.SQL(", ").join(sql.SQL("(SELECT count(*) FROM {})").format(n) for n in names),
                )
            )
        expected.append(tuple(1 for _ in group))
    return statements, expected


# ============================================================================ revert


@dataclass
class _Track:
    """One row the request touched, followed through its key changes."""

    table: str
    keyless: bool
    first_position: int
    keys: list[Row]  # every key the row had during the request, first to last
    touched: set[str]  # columns the request wrote (every column for INSERT/DELETE)
    final: Row | None  # the row as the request left it (None: deleted)


def _canonical(key: Mapping[str, Any] | None) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def _follow(mutations: Sequence[Mutation], infos: Mapping[str, TableInfo]) -> list[_Track]:
    open_rows: dict[tuple[str, str], list[_Track]] = {}
    tracks: list[_Track] = []
    for m in mutations:
        keyless = infos[m.table].keyless
        key = dict(m.key or {})
        source_key = dict(m.old_key) if m.old_key is not None else key
        lookup = (m.table, _canonical(source_key))
        if m.op == "INSERT":
            track = _Track(m.table, keyless, m.position, [key], set(m.after or {}), dict(m.after or {}))
            tracks.append(track)
        else:
            stack = open_rows.get(lookup)
            track_or_none = stack.pop() if stack else None
            if track_or_none is None:
                track = _Track(m.table, keyless, m.position, [source_key], set(), None)
                tracks.append(track)
            else:
                track = track_or_none
            if m.op == "DELETE":
                track.touched |= set(m.before or {})
                track.final = None
            else:  # UPDATE
                track.touched |= set(m.changed)
                track.final = dict(m.after or {})
                if _canonical(key) != _canonical(track.keys[-1]):
                    track.keys.append(key)
        if track.final is not None:
            open_rows.setdefault((m.table, _canonical(track.keys[-1])), []).append(track)
    return tracks


def _later_changes(
    store: Store, track: _Track, request_id: str, last_truncate: dict[str, Mutation | None]
) -> list[Conflict]:
    """Committed mutations of other requests on the row after the request first touched it.

    ``last_truncate`` caches the newest committed TRUNCATE of each table (None: none).
    """
    conflicts: list[Conflict] = []
    seen: set[tuple[int, int]] = set()
    for key in {_canonical(k): k for k in track.keys}.values():
        for m in _row_log_since(store, track.table, key, track.first_position):
            if m.request_id == request_id or m.cursor in seen:
                continue
            seen.add(m.cursor)
            # an UPDATE conflicts on the columns both wrote; INSERT, DELETE (and SNAPSHOT: a new
            # baseline after a gap) on every column the request touched
            overlap = sorted(set(m.changed) & track.touched) if m.op == "UPDATE" else sorted(track.touched)
            conflicts.extend(
                Conflict(
                    table=track.table,
                    key=dict(m.key or key),
                    column=column,
                    request_id=m.request_id,
                    version=m.version,
                    reason=f"changed later ({m.op})",
                )
                for column in overlap
            )
    if track.table not in last_truncate:
        found = store.mutation_log(table=track.table, op="TRUNCATE", status="committed", limit=1).mutations
        last_truncate[track.table] = found[0] if found else None
    t = last_truncate[track.table]
    if t is not None and t.position > track.first_position:
        conflicts.append(
            Conflict(
                track.table, dict(track.keys[-1]), None, t.request_id, t.version, "table truncated later"
            )
        )
    return conflicts


def _row_log_since(store: Store, table: str, key: Row, position: int) -> Iterator[Mutation]:
    """The row's committed mutations (``key`` or ``old_key``) at or after ``position``, newest first."""
    cursor: tuple[int, int] | None = None
    while True:
        page = store.mutation_log(table=table, key=key, status="committed", before=cursor, limit=_LOG_PAGE)
        for m in page.mutations:
            if m.position < position:
                return
            yield m
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _current_state(
    source: _Source, table: _Table, expectation: RowExpectation, *, lock: bool
) -> list[Conflict]:
    """Compare the row on the source with ``expectation``; a conflict per differing column."""
    if expectation.keyless:
        if expectation.image is None:
            return []  # a multiset: another equal row may legitimately remain
        if source.count(table, _row_condition(table, expectation.image)) > 0:
            return []
        return [
            Conflict(table.name, expectation.key, None, None, None, "the row is not on the source any more")
        ]
    where = _key_condition(table, expectation.key)
    found = source.rows(table, where, lock=lock, limit=1)
    if expectation.image is None:
        if found:
            return [Conflict(table.name, expectation.key, None, None, None, "a row with this key exists now")]
        return []
    if not found:
        return [
            Conflict(table.name, expectation.key, None, None, None, "the row is not on the source any more")
        ]
    current = found[0]
    return [
        Conflict(table.name, expectation.key, column, None, None, "the current value on the source differs")
        for column, value in expectation.image.items()
        if column in current and current[column] != value
    ]


def _merge(conflicts: Sequence[Conflict]) -> list[Conflict]:
    """One conflict per (table, key, column), preferring the one that names a later request."""
    best: dict[tuple[str, str, str | None], Conflict] = {}
    for c in conflicts:
        slot = (c.table, _canonical(c.key), c.column)
        kept = best.get(slot)
        if kept is None or (kept.version is None and c.version is not None):
            best[slot] = c
    return list(best.values())


def _writable(info: TableInfo) -> TableInfo:
    """A table undo may write to: not dropped (its current name is where rows go)."""
    if info.dropped:
        raise RefusedError(
            f"{info.current_name} was dropped on the source: its rows cannot be written back",
            hint="its history stays readable: cdc state history / cdc state at",
        )
    return info


def _by_current_name(
    store: Store, mutations: Sequence[Mutation]
) -> tuple[list[Mutation], dict[str, TableInfo]]:
    """The mutations with ``table`` set to their table's current name (a table renamed since is
    reverted under its new name), and each table's facts by that name."""
    by_id: dict[int, TableInfo] = {}
    out: list[Mutation] = []
    for m in mutations:
        if m.table_id is None:
            raise UsageError(f"{m.table}: no table identity in the history")
        if m.table_id not in by_id:
            by_id[m.table_id] = _writable(store.table(m.table, m.position))
            if by_id[m.table_id].table_id != m.table_id:  # not expected: names resolve by position
                raise UsageError(f"{m.table}: the history names another table at {format_lsn(m.position)}")
            by_id[m.table_id] = store.table(by_id[m.table_id].current_name)
        out.append(replace(m, table=by_id[m.table_id].name))
    return out, {info.name: info for info in by_id.values()}


def plan_revert(
    store: Store,
    source_conn: psycopg.Connection[Any],
    request_id: str,
    *,
    keep_redacted: bool = False,
    policies: Mapping[str, Mapping[str, str]] | None = None,
) -> RevertPlan:
    """The SQL that undoes the committed changes of ``request_id`` (full id or unique prefix).

    Reads the history from ``store`` and the current rows and column types from
    ``source_conn`` (inside a transaction or savepoint that is rolled back). Raises
    :class:`~cdc.errors.NotFoundError` for an unknown request,
    :class:`~cdc.errors.UsageError` for changes that cannot be inverted (TRUNCATE) and
    :class:`RedactedValuesError` when an inverse would write a redacted column (see the module
    documentation; ``policies``: the ``columns`` config section, ``keep_redacted``: leave such
    columns as they are).
    """
    full = store.resolve_request(request_id)
    mutations = [m for m in store.request_mutations(full) if not m.rolled_back and m.version is not None]
    notes: list[str] = []
    truncates = [m for m in mutations if m.op == "TRUNCATE"]
    if truncates:
        raise RefusedError(
            f"request {full} truncated {', '.join(sorted({m.table for m in truncates}))}: "
            "a TRUNCATE cannot be reverted row by row",
            hint="restore the rows one by one with `cdc restore TABLE --id ID --version V`",
        )
    mutations, infos = _by_current_name(
        store, [m for m in mutations if m.op in ("INSERT", "UPDATE", "DELETE")]
    )
    if not mutations:
        notes.append(f"request {full} has no committed data changes: nothing to revert")
    redactions = _Redactions(store, policies, keep_redacted, infos.values())
    steps: list[_Step] = []
    conflicts: list[Conflict] = []
    expectations: list[RowExpectation] = []
    with _reading(source_conn) as source:
        tables = {t: source.table(t, info.relation_oid) for t, info in infos.items()}
        for m in reversed(mutations):
            table = tables[m.table]
            keyless = infos[m.table].keyless
            rows = frozenset(
                f"{m.table}\x1f{_canonical(k)}" for k in (m.key, m.old_key) if k is not None and not keyless
            )
            if m.op == "INSERT":
                after = dict(m.after or {})
                _refuse_oversize(m.table, dict(m.key or {}), after if keyless else dict(m.key or {}))
                where = _one_row(table, after) if keyless else _key_condition(table, dict(m.key or {}))
                steps.append(_Step(_delete(table, where), m.table, rows, keyless))
            elif m.op == "DELETE":
                before = dict(m.before or {})
                _refuse_oversize(m.table, dict(m.key or {}), before)
                gone = [c for c in before if c not in table.columns]
                if gone:
                    notes.append(
                        f"{m.table}: column(s) {', '.join(gone)} no longer exist; left out of the INSERT"
                    )
                before = redactions.image(table, before)
                steps.append(_Step(_insert(table, before), m.table, rows, keyless))
            else:
                before, after = dict(m.before or {}), dict(m.after or {})
                changed = [c for c in m.changed if c in before]
                if not changed:
                    continue  # an UPDATE that changed nothing
                missing = [c for c in changed if c not in table.columns]
                for column in missing:
                    conflicts.append(
                        Conflict(
                            m.table, dict(m.key or {}), column, None, None, "the column no longer exists"
                        )
                    )
                values = redactions.values(
                    table,
                    {c: before[c] for c in changed if c in table.columns and not table.columns[c].generated},
                )
                if not values:
                    continue
                _refuse_oversize(m.table, dict(m.key or {}), values if not keyless else {**values, **after})
                where = _one_row(table, after) if keyless else _key_condition(table, dict(m.key or {}))
                steps.append(_Step(_update(table, values, where), m.table, rows, keyless))
        statements, expected_rows = _group(steps, _related(source_conn, tables.values()))
        final: dict[tuple[str, str], RowExpectation] = {}
        keyless_rows: list[RowExpectation] = []
        last_truncate: dict[str, Mutation | None] = {}
        for track in _follow(mutations, infos):
            conflicts.extend(_later_changes(store, track, full, last_truncate))
            image = (
                None
                if track.final is None
                else redactions.comparable(
                    track.table, {c: v for c, v in track.final.items() if c in track.touched or track.keyless}
                )
            )
            expectation = RowExpectation(
                track.table, dict(track.keys[-1]), image, track.keyless, infos[track.table].relation_oid
            )
            if track.keyless:
                keyless_rows.append(expectation)
            else:  # a key deleted and inserted again by the request: the last state counts
                final[(track.table, _canonical(track.keys[-1]))] = expectation
        expectations = [*final.values(), *keyless_rows]
        for expectation in expectations:
            table = tables[expectation.table]
            conflicts.extend(_current_state(source, table, expectation, lock=False))
        redactions.check("revert")
        notes.extend(redactions.notes())
        for name in sorted({m.table for m in mutations if m.op == "UPDATE"}):
            unseen = redactions.unseen(name)
            if unseen:
                notes.append(
                    f"{name}: a change the request made to redacted column(s) {', '.join(unseen)} is not in the "
                    "history (excluded, or masked before and after): it is not undone"
                )
        sql_text = _render(source_conn, statements)
    return RevertPlan(
        statements=statements,
        sql_text=sql_text,
        conflicts=_merge(conflicts),
        kind="revert",
        context_key="reverts",
        context_value=full,
        expected_rows=expected_rows,
        expectations=expectations,
        notes=notes,
    )


# ============================================================================ restore


def _resolve_version(store: Store, version: int | str | None, at: datetime | None) -> int:
    if (version is None) == (at is None):
        raise UsageError("give exactly one of a version or a time")
    if at is not None:
        resolved = store.version_at_timestamp(at)
        if resolved is None:
            raise NotFoundError(f"no stored version at or before {at.isoformat()}")
        return resolved
    assert version is not None
    if isinstance(version, bool):
        raise UsageError(f"invalid version {version!r}: expected an int LSN or X/Y")
    number = parse_lsn(version)
    if not store.check_version(number):
        floor = store.earliest_version()
        raise NotFoundError(
            f"version {format_lsn(number)} is below the history floor {format_lsn(floor or 0)}: "
            "it was pruned or precedes the capture"
        )
    return number


def plan_restore(
    store: Store,
    source_conn: psycopg.Connection[Any],
    table: str,
    key: Any,
    *,
    version: int | str | None = None,
    at: datetime | None = None,
    keep_redacted: bool = False,
    policies: Mapping[str, Mapping[str, str]] | None = None,
) -> RevertPlan:
    """The SQL that makes row ``key`` of ``table`` on the source equal to its state at ``version``.

    ``version``: an int LSN or ``X/Y``; or ``at``: a time (the newest version at or before it).
    The plan's ``diff`` lists the differing columns; it has no conflicts, but applying it
    checks that the row has not changed since the plan. Redacted columns: as for
    :func:`plan_revert` (:class:`RedactedValuesError` unless ``keep_redacted``).
    """
    info = _writable(store.table(table))
    stored = store.stored_key(info, key)
    number = _resolve_version(store, version, at)
    target = store.row_at(info, stored, number)  # the row of this table (identity) then
    if target is None and not store.has_history(info, stored):
        raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
    if target is not None:
        _refuse_oversize(info.current_name, stored, target)
    label = f"{info.current_name} {format_key(stored)} @ {format_lsn(number)}"
    redactions = _Redactions(store, policies, keep_redacted, [info])
    notes: list[str] = []
    statements: list[sql.Composed] = []
    expected_rows: list[tuple[int, ...]] = []
    diff: list[ColumnDiff] = []
    with _reading(source_conn) as source:
        src = source.table(info.current_name, info.relation_oid)
        plain = {c.name for c in src.plain}
        if target is not None:
            gone = [c for c in target if c not in src.columns]
            if gone:
                notes.append(f"column(s) {', '.join(gone)} no longer exist on the source: not restored")
            excluded = {c for c, p in redactions.policies(info.name).items() if p == "exclude"}
            added = [c for c in plain if c not in target and c not in excluded]
            if added:
                notes.append(f"column(s) {', '.join(added)} did not exist at that version: left as they are")
            target = {c: v for c, v in target.items() if c in plain}
        if info.keyless:
            count = source.count(src, _row_condition(src, stored))
            current: Row | None = dict(stored) if count else None
            expectation = RowExpectation(src.name, stored, current, True, info.relation_oid)
            if target is not None and count == 0:
                statements.append(_insert(src, target))
                expected_rows.append((1,))
            elif target is None and count > 0:
                statements.append(_delete(src, _row_condition(src, stored)))
                expected_rows.append((count,))
        else:
            found = source.rows(src, _key_condition(src, stored), limit=1)
            current = found[0] if found else None
            expectation = RowExpectation(src.name, stored, current, False, info.relation_oid)
            if target is not None and current is None:
                target = redactions.image(src, target)
                statements.append(_insert(src, target))
                expected_rows.append((1,))
            elif target is None and current is not None:
                statements.append(_delete(src, _key_condition(src, stored)))
                expected_rows.append((1,))
            elif target is not None and current is not None:
                # An excluded column's value was never captured (stored as null): an UPDATE leaves
                # it as it is; only a re-inserted row would need it (refused above, or kept).
                excluded = {c for c, p in redactions.policies(info.name).items() if p == "exclude"}
                target = {c: v for c, v in target.items() if c not in excluded or v is not None}
                values = redactions.values(
                    src, {c: v for c, v in target.items() if c not in current or current[c] != v}
                )
                target = {
                    c: v for c, v in target.items() if c in values or c not in current or current[c] == v
                }
                if values:
                    statements.append(_update(src, values, _key_condition(src, stored)))
                    expected_rows.append((1,))
        redactions.check("restore")
        notes.extend(redactions.notes())
        diff = _diff(current, target)
        if not statements:
            notes.append(f"{src.name} {format_key(stored)} already equals its state at {format_lsn(number)}")
        sql_text = _render(source_conn, statements)
    return RevertPlan(
        statements=statements,
        sql_text=sql_text,
        conflicts=[],
        kind="restore",
        context_key="restores",
        context_value=label,
        expected_rows=expected_rows,
        expectations=[expectation],
        diff=diff,
        notes=notes,
    )


def _diff(current: Row | None, target: Row | None) -> list[ColumnDiff]:
    columns = list(dict.fromkeys([*(target or {}), *(current or {})]))
    out: list[ColumnDiff] = []
    for column in columns:
        in_current = current is not None and column in current
        in_target = target is not None and column in target
        now = current.get(column) if current is not None else None
        then = target.get(column) if target is not None else None
        if in_current and in_target and now == then:
            continue
        if current is not None and target is not None and not in_target:
            continue  # a column added since: left alone
        out.append(ColumnDiff(column, now, then, current_present=in_current, target_present=in_target))
    return out
