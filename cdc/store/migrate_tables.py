"""The copy of the format-1 tables other than the mutations: tables, names and schemas,
transactions with their context, request errors and the small tables (capture state, gaps,
retention, prunes, erasures, actor sequences)."""

from __future__ import annotations

from psycopg import sql

from cdc.store.migrate_base import KEYFRAME, SUFFIX, V1_GAP_REASON, MigrationError, Run
from cdc.store.migrate_plan import Catalog, Table, split_name


def copy_tables(run: Run, tables: list[Table], table_of: dict[int, int]) -> None:
    """tables, table_names, table_schemas (schema ids kept), and the schema map the changes use."""
    conn = run.conn
    run.begin_step()
    acked = conn.execute(sql.SQL("SELECT max(acked_lsn) FROM {}").format(run.v1("capture_state"))).fetchone()
    dropped_at = int(acked[0]) if acked and acked[0] is not None else None
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (table_id, relation_oid, first_position, dropped_position) VALUES (%s, %s, %s, %s)"
            ).format(run.t("tables")),
            [
                (
                    t.table_id,
                    t.relation_oid,
                    t.first_position,
                    (dropped_at if dropped_at is not None else t.first_position) if t.dropped else None,
                )
                for t in tables
            ],
        )
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (table_id, schema_name, table_name, from_position) VALUES (%s, %s, %s, %s)"
            ).format(run.t("table_names")),
            [(t.table_id, nsp, name, start) for t in tables for nsp, name, start in t.names],
        )
    run.report.tables = len(tables)
    run.report.table_names = sum(len(t.names) for t in tables)
    run.report.dropped_tables = sum(t.dropped for t in tables)
    conn.execute(
        sql.SQL("SELECT setval(pg_get_serial_sequence({}, 'table_id'), greatest(%s, 1), %s)").format(
            sql.Literal(run.t("tables").as_string(conn))
        ),
        (len(tables), bool(tables)),
    )
    run.step("tables", len(tables))
    run.begin_step()
    conn.execute(
        "CREATE TEMP TABLE _cdc_mig_table_of (schema_id integer PRIMARY KEY, table_id integer NOT NULL) ON COMMIT DROP"
    )
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO _cdc_mig_table_of VALUES (%s, %s)", sorted(table_of.items()))
    rows = run.exec(
        sql.SQL(
            "INSERT INTO {s2} (schema_id, table_id, replica_identity, key_columns, columns, fingerprint, "
            "first_position, first_seen_at) "
            'SELECT s.schema_id, m.table_id, s.replica_identity::"char", s.key_columns, s.columns, s.fingerprint, '
            "s.first_position, s.first_seen_at FROM {s1} s JOIN _cdc_mig_table_of m USING (schema_id)"
        ).format(s2=run.t("table_schemas"), s1=run.v1("table_schemas"))
    )
    conn.execute(
        sql.SQL(
            "SELECT setval(pg_get_serial_sequence({}, 'schema_id'), greatest((SELECT max(schema_id) FROM {}), 1), "
            "(SELECT count(*) > 0 FROM {}))"
        ).format(
            sql.Literal(run.t("table_schemas").as_string(conn)),
            run.t("table_schemas"),
            run.t("table_schemas"),
        )
    )
    # What the changes need of each schema row: its table, the key columns in key order (all
    # columns in table order for a table without a key), whether the WAL sent whole old rows, and
    # its columns in table order with their JSON member prefixes ('"name": ').
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE _cdc_mig_schemas ON COMMIT DROP AS "
            "SELECT s.schema_id, s.table_id, k.kc, cardinality(k.kc) AS n, s.replica_identity = 'f' AS whole_row, "
            "  c.cols, c.members "
            "FROM {} s CROSS JOIN LATERAL (SELECT "
            "  ARRAY(SELECT e->>'name' FROM jsonb_array_elements(s.columns) WITH ORDINALITY x(e, i) ORDER BY i) AS cols, "
            "  ARRAY(SELECT to_json(e->>'name')::text || ': ' FROM jsonb_array_elements(s.columns) "
            "    WITH ORDINALITY x(e, i) ORDER BY i) AS members) c "
            "CROSS JOIN LATERAL (SELECT CASE WHEN cardinality(s.key_columns) > 0 THEN s.key_columns "
            "  ELSE c.cols END AS kc) k"
        ).format(run.t("table_schemas"))
    )
    conn.execute("ALTER TABLE _cdc_mig_schemas ADD PRIMARY KEY (schema_id)")
    run.report.schemas = rows
    run.step("table_schemas", rows)


def name_timelines(run: Run, tables: list[Table], catalog: Catalog | None) -> None:
    """The names of a table that had several, from its changes: a schema row's first position
    misses a rename back to an earlier name (format 1 reused that name's schema row). Each change
    follows the Relation message in force, so the name changes where its schema row's name does;
    renames in pruned history keep the positions of their schema rows."""
    run.begin_step()
    renamed = [t for t in tables if len({(n[0], n[1]) for n in t.names}) > 1]
    for table in renamed:
        timeline = run.conn.execute(
            sql.SQL(
                "SELECT position, text FROM (SELECT c.position, s.table_name AS text, "
                "  lag(s.table_name) OVER (ORDER BY c.position, c.ordinal) AS prev "
                "  FROM (SELECT position, ordinal, schema_id FROM {c} WHERE table_id = %(t)s AND flags & {kf} = 0 "
                "        UNION ALL SELECT position, ordinal, schema_id FROM {k} WHERE table_id = %(t)s "
                "        AND flags & {kf} = 0) c "
                "  JOIN {s} s ON s.schema_id = c.schema_id) x "
                "WHERE prev IS DISTINCT FROM text ORDER BY position"
            ).format(
                c=run.t("changes"),
                k=run.t("changes_keep"),
                s=run.v1("table_schemas"),
                kf=sql.Literal(KEYFRAME),
            ),
            {"t": table.table_id},
        ).fetchall()
        if not timeline:
            continue
        first_change = int(timeline[0][0])
        names = [n for n in table.names if n[2] < first_change]
        for position, text in timeline:
            nsp, name, _how = split_name(str(text), table.relation_oid, catalog)
            if names and names[-1][:2] == (nsp, name):
                continue
            names.append((nsp, name, int(position)))
        names[0] = (names[0][0], names[0][1], table.first_position)
        if names == table.names:
            continue
        table.names = names
        run.conn.execute(
            sql.SQL("DELETE FROM {} WHERE table_id = %s").format(run.t("table_names")), (table.table_id,)
        )
        with run.conn.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {} (table_id, schema_name, table_name, from_position) VALUES (%s, %s, %s, %s)"
                ).format(run.t("table_names")),
                [(table.table_id, nsp, name, start) for nsp, name, start in names],
            )
    run.report.table_names = sum(len(t.names) for t in tables)
    run.step("table_names", run.report.table_names)


def check_schema_ids(run: Run) -> None:
    """Every mutation names its schema row (format 1 always wrote one); refuse the rest."""
    run.begin_step()
    sources = [run.v1("mutations")] + ([run.v1("mutations_keep")] if run.has_v1("mutations_keep") else [])
    bad = run.conn.execute(
        sql.SQL(" UNION ").join(
            sql.SQL(
                "(SELECT DISTINCT m.table_name, m.schema_id FROM {} m WHERE NOT EXISTS "
                "(SELECT 1 FROM _cdc_mig_schemas s WHERE s.schema_id = m.schema_id) LIMIT 20)"
            ).format(src)
            for src in sources
        )
    ).fetchall()
    if bad:
        names = ", ".join(f"{r[0]} (schema id {r[1]})" for r in bad)
        raise MigrationError(
            f"mutations without a schema row in table_schemas: {names}",
            hint="the format-1 store is inconsistent; nothing was changed",
        )
    run.step("check", 0)


_TXN_COLUMNS = sql.SQL(
    "position, committed_at, xid, commit_lsn, status, flags, origin, change_count, request_id, actor, actor_seq, "
    "context"
)
_CTX_COLUMNS = sql.SQL("position, committed_at, from_ordinal, request_id, actor, actor_seq, context")


def copy_transactions(run: Run) -> None:
    """transactions (format-1 rows with their first context), those format 1 lost (the kept rows
    of pruned partitions: transactions_keep), context_changes and context_changes_keep."""
    v1 = run.v1("transactions")
    no_v1_row = sql.SQL("NOT EXISTS (SELECT 1 FROM {} t WHERE t.position = s.position)").format(v1)
    run.begin_step()
    rows = run.exec(
        sql.SQL(
            "INSERT INTO {t2} ({cols}) SELECT t.position, t.committed_at, t.xid, t.commit_lsn, "
            "(CASE WHEN t.status = 'committed' THEN 'c' ELSE 'r' END)::\"char\", 0, t.origin, t.mutation_count, "
            "s.request_id, s.actor, s.actor_seq, s.context "
            "FROM {v1} t LEFT JOIN _cdc_mig_spans s ON s.first AND s.position = t.position"
        ).format(t2=run.t("transactions"), cols=_TXN_COLUMNS, v1=v1)
    )
    synthesized = sql.SQL(
        "INSERT INTO {} ({}) SELECT s.position, s.committed_at, s.xid, NULL, "
        "(CASE WHEN s.committed THEN 'c' ELSE 'r' END)::\"char\", 0, NULL, s.n, s.request_id, s.actor, "
        "s.actor_seq, s.context FROM _cdc_mig_spans s WHERE s.first AND s.keep = {} AND {}"
    )
    missing = run.exec(synthesized.format(run.t("transactions"), _TXN_COLUMNS, sql.Literal(False), no_v1_row))
    if missing:
        run.report.warnings.append(
            f"{missing} transaction(s) missing from format-1 transactions were rebuilt from their mutations"
        )
    run.step("transactions", rows + missing)
    run.begin_step()
    kept = run.exec(
        synthesized.format(run.t("transactions_keep"), _TXN_COLUMNS, sql.Literal(True), no_v1_row)
    )
    run.step("transactions_keep", kept)
    contexts = sql.SQL(
        "INSERT INTO {} ({}) SELECT s.position, s.committed_at, s.ordinal, s.request_id, s.actor, s.actor_seq, "
        "s.context FROM _cdc_mig_spans s WHERE NOT s.first AND {}"
    )
    run.begin_step()
    rows = run.exec(
        contexts.format(
            run.t("context_changes"), _CTX_COLUMNS, sql.SQL("(NOT s.keep OR NOT {})").format(no_v1_row)
        )
    )
    run.step("context_changes", rows)
    run.begin_step()
    rows = run.exec(
        contexts.format(
            run.t("context_changes_keep"), _CTX_COLUMNS, sql.SQL("s.keep AND {}").format(no_v1_row)
        )
    )
    run.step("context_changes_keep", rows)


def copy_request_errors(run: Run) -> None:
    """request_errors from the requests with an error. Format 1 kept no LSN of the error message:
    each gets a synthetic negative one (-1, -2, ... in time order), so none can meet a real one.
    Format 1's messages were unsigned (any role could write one): no reporter is recorded, so
    readers show them as unverified, never as a request's root cause (docs/security.md)."""
    run.begin_step()
    rows = 0
    if run.has_v1("requests"):
        rows = run.exec(
            sql.SQL(
                "INSERT INTO {} (lsn, request_id, reported_at, error_type, message, location) "
                "SELECT -row_number() OVER (ORDER BY coalesce(r.error_at, r.last_seen_at), r.request_id), "
                "r.request_id, coalesce(r.error_at, r.last_seen_at), r.error_type, r.error_message, r.error_location "
                "FROM {} r WHERE r.error_type IS NOT NULL OR r.error_message IS NOT NULL"
            ).format(run.t("request_errors"), run.v1("requests"))
        )
    run.step("request_errors", rows)


def _copy_common(
    run: Run,
    table: str,
    values: dict[str, sql.Composable] | None = None,
    where: sql.Composable | None = None,
) -> int:
    """Copy the rows of ``<table>_v1`` into ``table`` by the columns both have (``values``:
    expressions over ``o``, the old row, for columns computed instead; ``where``: which rows)."""
    if not run.has_v1(table):
        return 0
    values = values or {}
    old = set(run.columns(table + SUFFIX))
    names = [c for c in run.columns(table) if c in values or c in old]
    exprs = [values.get(c, sql.SQL("o.{}").format(sql.Identifier(c))) for c in names]
    return run.exec(
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} o WHERE {}").format(
            run.t(table),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(exprs),
            run.v1(table),
            where or sql.SQL("true"),
        )
    )


def copy_small_tables(run: Run, tables: list[Table]) -> None:
    """capture_state, gaps, retention_state, prunes, actor_sequences, erasures."""
    conn = run.conn
    copies: tuple[tuple[str, dict[str, sql.Composable] | None], ...] = (
        ("capture_state", None),
        ("gaps", {"reason": sql.Literal(V1_GAP_REASON)}),
        ("prunes", None),
        ("actor_sequences", None),
    )
    for table, values in copies:
        run.begin_step()
        run.step(table, _copy_common(run, table, values))
    run.begin_step()
    conn.execute(sql.SQL("DELETE FROM {}").format(run.t("retention_state")))
    # a keyframe staging of format 1 is not carried over (its keyframes were left out)
    rows = _copy_common(run, "retention_state", {"staged": sql.SQL("NULL::jsonb")})
    if not rows:
        conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(run.t("retention_state")))
    run.step("retention_state", rows)
    run.begin_step()
    rows = 0
    if run.has_v1("erasures"):
        # a format-1 name -> the table that had it last
        latest: dict[str, tuple[int, int]] = {}
        for t in tables:
            for nsp, name, start in t.names:
                for text in (f"{nsp}.{name}",):
                    if text not in latest or latest[text][0] <= start:
                        latest[text] = (start, t.table_id)
        conn.execute(
            "CREATE TEMP TABLE _cdc_mig_names (name text PRIMARY KEY, table_id integer) ON COMMIT DROP"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO _cdc_mig_names VALUES (%s, %s)", [(k, v[1]) for k, v in sorted(latest.items())]
            )
        known = sql.SQL("EXISTS (SELECT 1 FROM _cdc_mig_names n WHERE n.name = o.table_name)")
        rows = _copy_common(
            run,
            "erasures",
            {"table_id": sql.SQL("(SELECT n.table_id FROM _cdc_mig_names n WHERE n.name = o.table_name)")},
            known,
        )
        unknown = conn.execute(
            sql.SQL("SELECT count(*) FROM {} o WHERE NOT {}").format(run.v1("erasures"), known)
        ).fetchone()
        if unknown and unknown[0]:
            run.report.warnings.append(
                f"{unknown[0]} erasure record(s) name a table format 1 never described: left in erasures_v1"
            )
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({}, 'erasure_id'), greatest((SELECT max(erasure_id) FROM {}), 1), "
                "(SELECT count(*) > 0 FROM {}))"
            ).format(sql.Literal(run.t("erasures").as_string(conn)), run.t("erasures"), run.t("erasures"))
        )
    run.step("erasures", rows)
