"""The copy of the format-1 ``mutations`` and ``mutations_keep`` into format-2 ``changes`` and
``changes_keep`` (partition by partition, on the server), and the context spans of every
transaction that the ``transactions`` step reads (docs/store.md "Migration from format 1")."""

from __future__ import annotations

from psycopg import sql

from cdc.store.format import OP_CODES, ChangeFlag
from cdc.store.migrate_base import KEYFRAME, NAMEDATALEN, Run
from cdc.store.migrate_plan import Part, target_name


def history_floor(run: Run) -> int | None:
    row = run.conn.execute(
        sql.SQL("SELECT max(history_floor) FROM {}").format(run.v1("capture_state"))
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def _key_text(column: str) -> sql.Composable:
    """``jsonb_build_array(<column>-><key columns in order>)::text``, NULL when ``column`` is."""
    c = sql.SQL(column)
    direct = [
        sql.SQL("WHEN s.n = {} THEN jsonb_build_array({})").format(
            sql.Literal(n),
            sql.SQL(", ").join(sql.SQL("{} -> s.kc[{}]").format(c, sql.Literal(i)) for i in range(1, n + 1)),
        )
        for n in range(1, 5)
    ]
    return sql.SQL(
        "(CASE WHEN {c} IS NULL THEN NULL WHEN s.n = 0 THEN jsonb_build_array() {direct} "
        "ELSE (SELECT jsonb_agg({c} -> u.c ORDER BY u.i) FROM unnest(s.kc) WITH ORDINALITY u(c, i)) END)::text"
    ).format(c=c, direct=sql.SQL(" ").join(direct))


#: Columns spelled out one by one in an image's expression; wider tables take a slower path.
IMAGE_TERMS = 64


def _image(value: str, terms: int) -> sql.Composable:
    """The text of the jsonb object ``value`` with its members in table order (docs/store.md
    "Images and values"), spelled as jsonb prints it: ``concat_ws`` of the schema row's first
    ``terms`` columns (a subquery over all of them for a wider table); jsonb's own text when the
    object has a member the schema row does not list."""
    v = sql.SQL(value)
    members = sql.SQL(", ").join(
        sql.SQL("CASE WHEN {v} ? s.cols[{i}] THEN s.members[{i}] || ({v} -> s.cols[{i}])::text END").format(
            v=v, i=sql.Literal(i)
        )
        for i in range(1, terms + 1)
    )
    return sql.SQL(
        "(CASE WHEN {v} IS NULL THEN NULL WHEN ({v} - s.cols) <> '{{}}'::jsonb THEN ({v})::text "
        "WHEN cardinality(s.cols) <= {terms} THEN '{{' || concat_ws(', ', {members}) || '}}' "
        "ELSE (SELECT '{{' || coalesce(string_agg(u.p || ({v} -> u.c)::text, ', ' ORDER BY u.i), '') || '}}' "
        "  FROM unnest(s.cols, s.members) WITH ORDINALITY u(c, p, i) WHERE {v} ? u.c) END)"
    ).format(v=v, terms=sql.Literal(terms), members=members)


_OP = sql.SQL('(CASE m.op {} END)::"char"').format(
    sql.SQL(" ").join(
        sql.SQL("WHEN {} THEN {}").format(sql.Literal(n), sql.Literal(c)) for n, c in OP_CODES.items()
    )
)
_CHANGE_COLUMNS = sql.SQL(
    "position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, image, before, old_key_text"
)


def _changes_select(
    source: sql.Composable, transactions: sql.Composable, part: Part | None, keep: bool, terms: int
) -> sql.Composable:
    """The SELECT turning the mutations of ``source`` into changes (``terms``: see _image)."""
    bounds: list[sql.Composable] = []
    if part is not None and part.lo is not None:
        bounds.append(sql.SQL("AND t.committed_at >= {}").format(sql.Literal(part.lo)))
    if part is not None and part.hi is not None:
        bounds.append(sql.SQL("AND t.committed_at < {}").format(sql.Literal(part.hi)))
    return sql.SQL(
        "SELECT m.position, m.ordinal, m.committed_at, s.table_id, m.schema_id, {op}, "
        "((CASE WHEN m.version IS NULL THEN {rb} ELSE 0 END) "
        " | (CASE WHEN m.op = 'UPDATE' AND s.whole_row AND m.before IS NOT NULL THEN {bw} ELSE 0 END) "
        " | (CASE WHEN m.op <> 'TRUNCATE' AND NOT coalesce(m.key ?& s.kc, false) THEN {ku} ELSE 0 END) "
        " | {kf})::smallint, "
        "m.lsn, {xid}, {key}, "
        "CASE m.op WHEN 'TRUNCATE' THEN NULL "
        "  WHEN 'DELETE' THEN {deleted} ELSE {after} END, "
        "CASE WHEN m.op = 'UPDATE' AND s.whole_row THEN {before} END, {old_key} "
        "FROM {src} m JOIN _cdc_mig_schemas s ON s.schema_id = m.schema_id "
        "LEFT JOIN {txn} t ON t.position = m.position AND t.committed_at = m.committed_at {bounds}"
    ).format(
        op=_OP,
        rb=sql.Literal(int(ChangeFlag.ROLLED_BACK)),
        bw=sql.Literal(int(ChangeFlag.BEFORE_FROM_WAL)),
        ku=sql.Literal(int(ChangeFlag.KEY_UNKNOWN)),
        kf=sql.SQL("(CASE WHEN m.keyframe THEN {} ELSE 0 END)").format(sql.Literal(KEYFRAME))
        if keep
        else sql.SQL("0"),
        # the transaction's own xid is implied; keyframes belong to no transaction
        xid=sql.SQL(
            "CASE WHEN m.keyframe THEN NULL ELSE nullif(m.xid, t.xid) END" if keep else "nullif(m.xid, t.xid)"
        ),
        key=_key_text("m.key"),
        old_key=_key_text("m.old_key"),
        deleted=sql.SQL("(CASE WHEN s.whole_row AND m.before IS NOT NULL THEN {} ELSE {} END)").format(
            _image("m.before", terms), _image("m.key", terms)
        ),
        after=_image("m.after", terms),
        before=_image("m.before", terms),
        src=source,
        txn=transactions,
        bounds=sql.SQL(" ").join(bounds),
    )


def _pending_keyframes(floor: int | None) -> sql.Composable:
    """The condition selecting the kept rows to migrate: not the staged (pending) keyframes."""
    if floor is None:
        return sql.SQL("NOT m.keyframe")
    return sql.SQL("(NOT m.keyframe OR m.position <= {})").format(sql.Literal(floor))


def copy_changes(
    run: Run, mutation_parts: list[Part], transaction_parts: list[Part], floor: int | None
) -> None:
    """changes (partition by partition, attached once filled) and changes_keep."""
    conn = run.conn
    run.begin_step()
    taken: set[str] = set()
    done = 0
    transactions = run.v1("transactions")
    widest = conn.execute("SELECT coalesce(max(cardinality(cols)), 0) FROM _cdc_mig_schemas").fetchone()
    terms = max(1, min(int(widest[0]) if widest else 0, IMAGE_TERMS))
    for part in mutation_parts:
        source = run.t(part.name)
        if part.bound is None or part.default:
            # the format-1 table was not partitioned, or its default partition: through the parent
            target = run.t("changes")
            done += run.exec(
                sql.SQL("INSERT INTO {} ({}) ").format(target, _CHANGE_COLUMNS)
                + _changes_select(source, transactions, None, keep=False, terms=terms)
            )
            run.step("changes", done, done=False)
            continue
        name = target_name("changes", part, taken)
        table = run.t(name)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED)"
            ).format(table, run.t("changes"))
        )
        if part.lo is not None and part.hi is not None:
            # a constraint matching the bound lets ATTACH skip its scan
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {} ADD CONSTRAINT {} CHECK (committed_at >= {} AND committed_at < {})"
                ).format(
                    table,
                    sql.Identifier(f"{name}_bound"[:NAMEDATALEN]),
                    sql.Literal(part.lo),
                    sql.Literal(part.hi),
                )
            )
        done += run.exec(
            sql.SQL("INSERT INTO {} ({}) ").format(table, _CHANGE_COLUMNS)
            + _changes_select(source, transactions, part, keep=False, terms=terms)
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} {}").format(
                run.t("changes"), table, sql.SQL(part.bound)
            )
        )
        run.step("changes", done, done=False)
    run.step("changes", done)
    for part in transaction_parts:
        if part.bound is None or part.default:
            continue
        for parent in ("transactions", "context_changes"):
            name = target_name(parent, part, taken)
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} {}").format(
                    run.t(name), run.t(parent), sql.SQL(part.bound)
                )
            )
    run.report.v1_rows = done
    run.begin_step()
    kept = 0
    if run.has_v1("mutations_keep"):
        kept = run.exec(
            sql.SQL("INSERT INTO {} ({}) ").format(run.t("changes_keep"), _CHANGE_COLUMNS)
            + _changes_select(run.v1("mutations_keep"), transactions, None, keep=True, terms=terms)
            + sql.SQL(" WHERE ")
            + _pending_keyframes(floor)
        )
        pending = conn.execute(
            sql.SQL("SELECT count(*) FROM {} m WHERE NOT ").format(run.v1("mutations_keep"))
            + _pending_keyframes(floor)
        ).fetchone()
        run.report.pending_keyframes = int(pending[0]) if pending else 0
        if run.report.pending_keyframes:
            run.report.warnings.append(
                f"{run.report.pending_keyframes} staged keyframe(s) of an unfinished prune were left out "
                "(the next `cdc prune` computes them again)"
            )
    run.report.v1_rows += kept
    run.step("changes_keep", kept)


def context_spans(run: Run, mutation_parts: list[Part]) -> None:
    """Each transaction's context spans: its first mutation, and every later one whose context
    (request id, actor, context document) differs from the previous mutation's, or whose actor
    sequence number does not follow it (so that ``actor_seq + k`` gives every mutation's).
    First rows also carry what a transaction missing from format-1 ``transactions`` needs.

    One format-1 partition at a time (a transaction's mutations share its commit time, so one
    partition holds them all, but see below): each sort stays in memory."""
    run.begin_step()
    run.conn.execute(
        "CREATE TEMP TABLE _cdc_mig_spans (position bigint, ordinal integer, committed_at timestamptz, "
        "keep boolean, first boolean, n bigint, xid bigint, committed boolean, request_id text, actor text, "
        "actor_seq bigint, context text) ON COMMIT DROP"
    )
    sources: list[tuple[sql.Composable, bool]] = [(run.t(p.name), False) for p in mutation_parts]
    if run.has_v1("mutations_keep"):
        sources.append((run.v1("mutations_keep"), True))
    done = 0
    for source, keep in sources:
        done += run.exec(
            sql.SQL(
                "INSERT INTO _cdc_mig_spans SELECT position, ordinal, committed_at, {keep}, prev IS NULL, n, xid_min, "
                "  committed, request_id, actor, actor_seq, context::text FROM ("
                "  SELECT m.position, m.ordinal, m.committed_at, m.request_id, m.actor, m.actor_seq, m.context, "
                "    lag(m.ordinal) OVER w AS prev, "
                "    (m.request_id, m.actor, m.context) IS DISTINCT FROM "
                "      (lag(m.request_id) OVER w, lag(m.actor) OVER w, lag(m.context) OVER w) "
                "      OR m.actor_seq IS DISTINCT FROM lag(m.actor_seq) OVER w + 1 AS differs, "
                "    count(*) OVER p AS n, min(m.xid) OVER p AS xid_min, "
                "    bool_or(m.version IS NOT NULL) OVER p AS committed "
                "  FROM {src} m WHERE {which} "
                "  WINDOW w AS (PARTITION BY m.position ORDER BY m.ordinal), p AS (PARTITION BY m.position)"
                ") x WHERE prev IS NULL OR differs"
            ).format(keep=sql.Literal(keep), src=source, which=sql.SQL("NOT m.keyframe" if keep else "true"))
        )
        run.step("context spans", done, done=False)
    # A rolled-back transaction written again after a crash with another abort time (before
    # PostgreSQL 16) may have mutations under two commit times: one first row per transaction.
    split = run.exec(
        sql.SQL(
            "UPDATE _cdc_mig_spans s SET first = false FROM (SELECT position, min(ordinal) AS o "
            "FROM _cdc_mig_spans WHERE first GROUP BY position HAVING count(*) > 1) d "
            "WHERE s.first AND s.position = d.position AND s.ordinal > d.o"
        )
    )
    if split:
        run.report.warnings.append(f"{split} transaction(s) had mutations under two commit times")
    run.conn.execute("CREATE INDEX ON _cdc_mig_spans (position) WHERE first")
    run.conn.execute("ANALYZE _cdc_mig_spans")
    run.step("context spans", done)
