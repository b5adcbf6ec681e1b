-- Schema changes as events (docs/ddl.md): installed on the SOURCE by `cdc setup` when it runs as
-- a superuser (event triggers need one), after sql/context.sql (it reads the context settings
-- functions and cdc.context_excluded_schemas()). Idempotent.
--
-- At the end of every DDL command on a permanent table (or partitioned table) outside the
-- excluded schemas, `cdc.ddl_command_end()` compares the table's shape (name, columns by attnum,
-- types, the value ADD COLUMN gave existing rows, key flags, partitions) with the shape it saw
-- last (`cdc.ddl_shapes`, an UNLOGGED mirror: never decoded, never published) and emits one
-- transactional logical message `cdc.ddl` with both shapes, the command tag and the request
-- context of the session. A command that rewrote the table's values without row changes in the
-- WAL (ALTER COLUMN TYPE, a volatile default, ATTACH/DETACH PARTITION, a shape change of a table
-- without a key) is followed by the table's rows, as COPY text in chunks (`rows` messages), or by
-- an `inexact` message when the table has more than cdc.ddl_rewrite_max_rows() rows. A dropped
-- table gives a `drop` message. Every message goes through cdc.ddl_emit(), the one place that
-- writes the `cdc.ddl` prefix (where a MAC is added). A failure never fails the user's DDL: it is
-- reported with RAISE WARNING.
--
-- Every function here runs as its owner (the role that ran `cdc setup`), with search_path pinned
-- to pg_catalog, pg_temp and every name qualified; EXECUTE is revoked from PUBLIC.

CREATE SCHEMA IF NOT EXISTS cdc;

CREATE UNLOGGED TABLE IF NOT EXISTS cdc.ddl_shapes (
    relid   pg_catalog.oid PRIMARY KEY,
    shape   pg_catalog.jsonb NOT NULL
);
REVOKE ALL ON cdc.ddl_shapes FROM PUBLIC;

-- A DDL undone by ROLLBACK TO SAVEPOINT leaves its messages in a committed transaction: pgoutput
-- tags streamed messages with the top transaction's xid, so nothing tells them apart. Each DDL's
-- messages carry a token, and the token gets a row here; a deferred constraint trigger on that
-- row emits a `confirm` message at commit. The row, and the trigger event with it, go away with a
-- rolled-back savepoint: the daemon applies only confirmed tokens.
CREATE UNLOGGED TABLE IF NOT EXISTS cdc.ddl_pending (
    token   pg_catalog.int8 PRIMARY KEY
);
REVOKE ALL ON cdc.ddl_pending FROM PUBLIC;

-- Configuration, rewritten by install_ddl() (cdc/source_ddl.py).
CREATE OR REPLACE FUNCTION cdc.ddl_rewrite_max_rows() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 100000::pg_catalog.int8 $$;

CREATE OR REPLACE FUNCTION cdc.ddl_publication() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 'cdc'::pg_catalog.text $$;

CREATE OR REPLACE FUNCTION cdc.ddl_publishes_generated() RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT false $$;


-- A new token (the backend pid and a transaction-local counter), registered for confirmation.
CREATE OR REPLACE FUNCTION cdc.ddl_token() RETURNS pg_catalog.int8
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_next pg_catalog.int8 := coalesce(nullif(pg_catalog.current_setting('cdc._ddl_token', true), ''), '0')::pg_catalog.int8
                              OPERATOR(pg_catalog.+) 1;
    v_token pg_catalog.int8;
BEGIN
    PERFORM pg_catalog.set_config('cdc._ddl_token', v_next::pg_catalog.text, true);
    v_token := (pg_catalog.pg_backend_pid()::pg_catalog.int8 OPERATOR(pg_catalog.<<) 32)
               OPERATOR(pg_catalog.|) (pg_catalog.txid_current() OPERATOR(pg_catalog.%) 65536 OPERATOR(pg_catalog.<<) 16)
               OPERATOR(pg_catalog.|) v_next;
    INSERT INTO cdc.ddl_pending (token) VALUES (v_token) ON CONFLICT DO NOTHING;
    RETURN v_token;
END
$fn$;

-- The one function that writes `cdc.ddl` messages. Every message of a DDL command carries the
-- command's token (taken at its first message), confirmed at commit (cdc.ddl_pending).
CREATE OR REPLACE FUNCTION cdc.ddl_emit(content pg_catalog.text) RETURNS pg_catalog.pg_lsn
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_message pg_catalog.jsonb := content::pg_catalog.jsonb;
    v_token pg_catalog.text;
BEGIN
    IF NOT v_message OPERATOR(pg_catalog.?) 'token' THEN
        v_token := nullif(pg_catalog.current_setting('cdc._ddl_current', true), '');
        IF v_token IS NULL THEN
            v_token := cdc.ddl_token()::pg_catalog.text;
            PERFORM pg_catalog.set_config('cdc._ddl_current', v_token, true);
        END IF;
        v_message := v_message OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object('token', v_token::pg_catalog.int8);
    END IF;
    RETURN pg_catalog.pg_logical_emit_message(true, 'cdc.ddl', v_message::pg_catalog.text);
END
$fn$;

CREATE OR REPLACE FUNCTION cdc.ddl_confirm() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object('kind', 'confirm', 'token', NEW.token)::pg_catalog.text);
    DELETE FROM cdc.ddl_pending AS p WHERE p.token OPERATOR(pg_catalog.=) NEW.token;
    RETURN NULL;
END
$fn$;

DROP TRIGGER IF EXISTS cdc_ddl_confirm ON cdc.ddl_pending;
CREATE CONSTRAINT TRIGGER cdc_ddl_confirm AFTER INSERT ON cdc.ddl_pending
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION cdc.ddl_confirm();

-- A table's shape as history needs it. `published`: the column is in the publication's rows
-- (generated columns only where the server publishes stored ones); `missing`: the value ADD
-- COLUMN gave the rows that existed then (attmissingval), as its type's text output.
CREATE OR REPLACE FUNCTION cdc.ddl_shape(rel pg_catalog.oid) RETURNS pg_catalog.jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, MDY' SET intervalstyle = 'postgres' SET extra_float_digits = 1
SET bytea_output = 'hex' SET timezone = 'UTC'
AS $$
SELECT pg_catalog.jsonb_build_object(
    'oid', c.oid::pg_catalog.int8,
    'schema', n.nspname::pg_catalog.text,
    'name', c.relname::pg_catalog.text,
    'relkind', c.relkind::pg_catalog.text,
    'replica_identity', c.relreplident::pg_catalog.text,
    'keyless', NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
                            WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid
                              AND (i.indisprimary OR (c.relreplident OPERATOR(pg_catalog.=) 'i' AND i.indisreplident))),
    'parent', (SELECT i.inhparent::pg_catalog.int8 FROM pg_catalog.pg_inherits AS i
                WHERE i.inhrelid OPERATOR(pg_catalog.=) c.oid AND c.relispartition LIMIT 1),
    'partitions', CASE WHEN c.relkind OPERATOR(pg_catalog.=) 'p' THEN
        (SELECT pg_catalog.jsonb_agg(t.relid::pg_catalog.int8 ORDER BY t.relid)
           FROM pg_catalog.pg_partition_tree(c.oid) AS t WHERE t.isleaf) END,
    'columns', coalesce((
        SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                   'attnum', a.attnum::pg_catalog.int4,
                   'name', a.attname::pg_catalog.text,
                   'type_oid', a.atttypid::pg_catalog.int8,
                   'type_modifier', a.atttypmod,
                   'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
                   'generated', a.attgenerated::pg_catalog.text,
                   'published', a.attgenerated OPERATOR(pg_catalog.=) ''
                       OR (a.attgenerated OPERATOR(pg_catalog.=) 's' AND cdc.ddl_publishes_generated()),
                   'key', CASE c.relreplident
                       WHEN 'f' THEN true
                       WHEN 'n' THEN false
                       ELSE EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
                                     WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid
                                       AND a.attnum OPERATOR(pg_catalog.=) ANY (i.indkey::pg_catalog.int2[])
                                       AND ((c.relreplident OPERATOR(pg_catalog.=) 'd' AND i.indisprimary)
                                            OR (c.relreplident OPERATOR(pg_catalog.=) 'i' AND i.indisreplident)))
                       END,
                   'has_missing', m.attrelid IS NOT NULL,
                   'missing', (m.attmissingval::pg_catalog.text::pg_catalog.text[])[1]
               ) ORDER BY a.attnum)
          FROM pg_catalog.pg_attribute AS a
          -- the value ADD COLUMN gave existing rows: a partitioned table's is on its partitions
          LEFT JOIN LATERAL (
              SELECT x.attrelid, x.attmissingval
                FROM pg_catalog.pg_attribute AS x
               WHERE x.atthasmissing AND NOT x.attisdropped
                 AND ((x.attrelid OPERATOR(pg_catalog.=) c.oid AND x.attnum OPERATOR(pg_catalog.=) a.attnum)
                      OR (c.relkind OPERATOR(pg_catalog.=) 'p' AND x.attname OPERATOR(pg_catalog.=) a.attname
                          AND x.attrelid IN (SELECT t.relid FROM pg_catalog.pg_partition_tree(c.oid) AS t WHERE t.isleaf)))
               LIMIT 1) AS m ON true
         WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
           AND NOT a.attisdropped), '[]'::pg_catalog.jsonb)
)
  FROM pg_catalog.pg_class AS c
  JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE c.oid OPERATOR(pg_catalog.=) rel
$$;

-- The request context of the session running the DDL (the context trigger does not fire on DDL).
CREATE OR REPLACE FUNCTION cdc.ddl_context() RETURNS pg_catalog.jsonb
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
SELECT pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
    'request_id', coalesce(
        nullif(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.request_id', true), ''),
        cdc.request_id_from_application_name(pg_catalog.current_setting('application_name'))),
    'actor', nullif(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.actor', true), ''),
    'application_name', nullif(pg_catalog.current_setting('application_name'), ''),
    'db_user', SESSION_USER::pg_catalog.text,
    'client_addr', pg_catalog.host(pg_catalog.inet_client_addr()),
    'backend_pid', pg_catalog.pg_backend_pid(),
    'source', 'ddl'))
$$;

-- A value as a COPY text field (the type's output function, COPY escapes, NULL as \N).
CREATE OR REPLACE FUNCTION cdc.ddl_copy_field(v anyelement) RETURNS pg_catalog.text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
SELECT CASE WHEN v IS NULL THEN E'\\N' ELSE
    pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
        pg_catalog.format('%s', v), E'\\', E'\\\\'), E'\t', E'\\t'), E'\n', E'\\n'), E'\r', E'\\r') END
$$;

-- The table's rows after the DDL, as `rows` messages of COPY text (1000 rows each), in the
-- published columns' order; an `inexact` message instead when it has more than the limit.
-- `reset`: readers forget the table's earlier rows at this point (a TRUNCATE before the rows).
CREATE OR REPLACE FUNCTION cdc.ddl_snapshot(rel pg_catalog.oid, shape pg_catalog.jsonb, reason pg_catalog.text,
                                            reset boolean) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET datestyle = 'ISO, MDY' SET intervalstyle = 'postgres' SET extra_float_digits = 1
SET bytea_output = 'hex' SET timezone = 'UTC'
AS $fn$
DECLARE
    v_cols pg_catalog.text;
    v_rel pg_catalog.text;
    v_count pg_catalog.int8;
    v_limit pg_catalog.int8 := cdc.ddl_rewrite_max_rows();
    v_chunk pg_catalog.text;
    v_seq pg_catalog.int4 := 0;
BEGIN
    SELECT pg_catalog.string_agg(pg_catalog.format('cdc.ddl_copy_field(%I)', c OPERATOR(pg_catalog.->>) 'name'),
                                 $$ OPERATOR(pg_catalog.||) E'\t' OPERATOR(pg_catalog.||) $$
                                 ORDER BY (c OPERATOR(pg_catalog.->>) 'attnum')::pg_catalog.int4)
      INTO v_cols
      FROM pg_catalog.jsonb_array_elements(shape OPERATOR(pg_catalog.->) 'columns') AS c
     WHERE (c OPERATOR(pg_catalog.->>) 'published')::boolean;
    IF v_cols IS NULL THEN
        RETURN;
    END IF;
    v_rel := pg_catalog.format('%I.%I', shape OPERATOR(pg_catalog.->>) 'schema', shape OPERATOR(pg_catalog.->>) 'name');
    EXECUTE pg_catalog.format('SELECT pg_catalog.count(*) FROM (SELECT 1 FROM %s LIMIT %s) AS x',
                              v_rel, v_limit OPERATOR(pg_catalog.+) 1) INTO v_count;
    IF v_count OPERATOR(pg_catalog.>) v_limit THEN
        PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object(
            'kind', 'inexact', 'oid', rel::pg_catalog.int8, 'reason', reason, 'limit', v_limit)::pg_catalog.text);
        RETURN;
    END IF;
    FOR v_chunk IN EXECUTE pg_catalog.format(
        'SELECT pg_catalog.string_agg(l, E''\n'') OPERATOR(pg_catalog.||) E''\n'' FROM ('
        ' SELECT l, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS g'
        ' FROM (SELECT %s AS l FROM %s) AS x) AS y GROUP BY g ORDER BY g', v_cols, v_rel)
    LOOP
        PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object(
            'kind', 'rows', 'oid', rel::pg_catalog.int8, 'reset', reset AND v_seq OPERATOR(pg_catalog.=) 0,
            'seq', v_seq, 'copy', v_chunk)::pg_catalog.text);
        v_seq := v_seq OPERATOR(pg_catalog.+) 1;
    END LOOP;
    IF v_seq OPERATOR(pg_catalog.=) 0 AND reset THEN
        PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object(
            'kind', 'rows', 'oid', rel::pg_catalog.int8, 'reset', true, 'seq', 0, 'copy', '')::pg_catalog.text);
    END IF;
END
$fn$;

-- Whether the table (or one of its partitions) was rewritten by the command now ending.
CREATE OR REPLACE FUNCTION cdc.ddl_was_rewritten(rel pg_catalog.oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
SELECT EXISTS (
    SELECT 1
      FROM pg_catalog.unnest(pg_catalog.string_to_array(
               nullif(pg_catalog.current_setting('cdc._ddl_rewritten', true), ''), ',')) AS r(oid)
     WHERE r.oid::pg_catalog.oid OPERATOR(pg_catalog.=) rel
        OR r.oid::pg_catalog.oid IN (SELECT t.relid FROM pg_catalog.pg_partition_tree(rel) AS t))
$$;

-- One table after a DDL command: compare, emit, snapshot when values changed without WAL rows.
CREATE OR REPLACE FUNCTION cdc.ddl_record(rel pg_catalog.oid, tag pg_catalog.text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_old pg_catalog.jsonb;
    v_new pg_catalog.jsonb := cdc.ddl_shape(rel);
    v_rewritten boolean := cdc.ddl_was_rewritten(rel);
    v_published boolean;
    v_columns_changed boolean;
    v_gone pg_catalog.int8;
    v_parent pg_catalog.oid;
BEGIN
    IF v_new IS NULL THEN
        RETURN;
    END IF;
    SELECT s.shape INTO v_old FROM cdc.ddl_shapes AS s WHERE s.relid OPERATOR(pg_catalog.=) rel;
    IF v_old IS NOT DISTINCT FROM v_new AND NOT v_rewritten THEN
        RETURN;  -- nothing history sees (an index, statistics, a comment, ...)
    END IF;
    INSERT INTO cdc.ddl_shapes AS s (relid, shape) VALUES (rel, v_new)
        ON CONFLICT (relid) DO UPDATE SET shape = EXCLUDED.shape;
    v_parent := (v_new OPERATOR(pg_catalog.->>) 'parent')::pg_catalog.oid;
    IF v_parent IS NOT NULL THEN
        -- a partition created or changed: the parent's mirror follows, without a message
        UPDATE cdc.ddl_shapes AS s SET shape = cdc.ddl_shape(v_parent)
         WHERE s.relid OPERATOR(pg_catalog.=) v_parent
           AND (v_old IS NULL OR tag OPERATOR(pg_catalog.=) 'CREATE TABLE');
    END IF;
    v_published := EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables AS p
                            WHERE p.pubname OPERATOR(pg_catalog.=) cdc.ddl_publication()
                              AND p.schemaname OPERATOR(pg_catalog.=) (v_new OPERATOR(pg_catalog.->>) 'schema')
                              AND p.tablename OPERATOR(pg_catalog.=) (v_new OPERATOR(pg_catalog.->>) 'name'));
    PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object(
        'kind', 'alter', 'tag', tag, 'oid', rel::pg_catalog.int8, 'old', v_old, 'new', v_new,
        'rewritten', v_rewritten, 'published', v_published, 'context', cdc.ddl_context())::pg_catalog.text);
    IF NOT v_published OR v_old IS NULL THEN
        RETURN;
    END IF;
    v_columns_changed := (v_old OPERATOR(pg_catalog.->) 'columns') IS DISTINCT FROM (v_new OPERATOR(pg_catalog.->) 'columns');
    IF v_rewritten
       OR (v_old OPERATOR(pg_catalog.->) 'partitions') IS DISTINCT FROM (v_new OPERATOR(pg_catalog.->) 'partitions')
       OR (v_columns_changed AND (v_new OPERATOR(pg_catalog.->>) 'keyless')::boolean) THEN
        PERFORM cdc.ddl_snapshot(rel, v_new, tag, true);
    END IF;
    -- A table attached as a partition: its rows are its parent's from now on (published through
    -- the root); as a table of its own it ends here, like a dropped one.
    FOR v_gone IN
        SELECT x::pg_catalog.int8
          FROM pg_catalog.jsonb_array_elements_text(coalesce(
                   nullif(v_new OPERATOR(pg_catalog.->) 'partitions', 'null'::pg_catalog.jsonb), '[]')) AS x
         WHERE NOT coalesce(nullif(v_old OPERATOR(pg_catalog.->) 'partitions', 'null'::pg_catalog.jsonb), '[]')
                   OPERATOR(pg_catalog.@>) pg_catalog.to_jsonb(x::pg_catalog.int8)
    LOOP
        PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object(
            'kind', 'drop', 'tag', 'ATTACH PARTITION', 'oid', v_gone, 'attached', true,
            'schema', (SELECT n.nspname FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n
                        ON n.oid OPERATOR(pg_catalog.=) c.relnamespace WHERE c.oid OPERATOR(pg_catalog.=) v_gone::pg_catalog.oid),
            'name', (SELECT c.relname FROM pg_catalog.pg_class AS c WHERE c.oid OPERATOR(pg_catalog.=) v_gone::pg_catalog.oid),
            'context', cdc.ddl_context())::pg_catalog.text);
    END LOOP;
    -- A partition detached: a table of its own from now on, its rows recorded here.
    FOR v_gone IN
        SELECT x::pg_catalog.int8
          FROM pg_catalog.jsonb_array_elements_text(coalesce(
                   nullif(v_old OPERATOR(pg_catalog.->) 'partitions', 'null'::pg_catalog.jsonb), '[]')) AS x
         WHERE NOT coalesce(nullif(v_new OPERATOR(pg_catalog.->) 'partitions', 'null'::pg_catalog.jsonb), '[]')
                   OPERATOR(pg_catalog.@>) pg_catalog.to_jsonb(x::pg_catalog.int8)
    LOOP
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid OPERATOR(pg_catalog.=) v_gone::pg_catalog.oid
                      AND NOT c.relispartition) THEN
            PERFORM cdc.ddl_record_detached(v_gone::pg_catalog.oid, tag);
        END IF;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION cdc.ddl_record_detached(rel pg_catalog.oid, tag pg_catalog.text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_new pg_catalog.jsonb := cdc.ddl_shape(rel);
BEGIN
    INSERT INTO cdc.ddl_shapes AS s (relid, shape) VALUES (rel, v_new)
        ON CONFLICT (relid) DO UPDATE SET shape = EXCLUDED.shape;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables AS p
                    WHERE p.pubname OPERATOR(pg_catalog.=) cdc.ddl_publication()
                      AND p.schemaname OPERATOR(pg_catalog.=) (v_new OPERATOR(pg_catalog.->>) 'schema')
                      AND p.tablename OPERATOR(pg_catalog.=) (v_new OPERATOR(pg_catalog.->>) 'name')) THEN
        RETURN;
    END IF;
    PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object(
        'kind', 'alter', 'tag', tag, 'oid', rel::pg_catalog.int8, 'old', NULL, 'new', v_new,
        'rewritten', false, 'published', true, 'detached', true, 'context', cdc.ddl_context())::pg_catalog.text);
    PERFORM cdc.ddl_snapshot(rel, v_new, tag, true);
END
$fn$;

CREATE OR REPLACE FUNCTION cdc.ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT d.objid AS rel, pg_catalog.min(d.command_tag) AS tag
          FROM pg_catalog.pg_event_trigger_ddl_commands() AS d
          JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) d.objid
          JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND c.relkind IN ('r', 'p')
           AND c.relpersistence OPERATOR(pg_catalog.=) 'p'
           AND n.nspname OPERATOR(pg_catalog.<>) ALL (cdc.context_excluded_schemas()
                                 OPERATOR(pg_catalog.||) ARRAY['cdc', 'pg_catalog', 'information_schema', 'pg_toast'])
         GROUP BY d.objid
         ORDER BY d.objid
    LOOP
        BEGIN
            PERFORM cdc.ddl_record(r.rel, r.tag);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc: could not record the schema change of table %: %', r.rel, SQLERRM;
        END;
    END LOOP;
    PERFORM pg_catalog.set_config('cdc._ddl_rewritten', '', true);
    PERFORM pg_catalog.set_config('cdc._ddl_current', '', true);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'cdc: could not record a schema change: %', SQLERRM;
END
$fn$;

CREATE OR REPLACE FUNCTION cdc.ddl_table_rewrite() RETURNS event_trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    PERFORM pg_catalog.set_config('cdc._ddl_rewritten',
        coalesce(nullif(pg_catalog.current_setting('cdc._ddl_rewritten', true), '') OPERATOR(pg_catalog.||) ',', '')
        OPERATOR(pg_catalog.||) pg_catalog.pg_event_trigger_table_rewrite_oid()::pg_catalog.text, true);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'cdc: could not note a table rewrite: %', SQLERRM;
END
$fn$;

CREATE OR REPLACE FUNCTION cdc.ddl_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
    v_old pg_catalog.jsonb;
    v_parent pg_catalog.oid;
BEGIN
    FOR r IN
        SELECT d.objid, d.schema_name, d.object_name
          FROM pg_catalog.pg_event_trigger_dropped_objects() AS d
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND d.objsubid OPERATOR(pg_catalog.=) 0 AND d.object_type OPERATOR(pg_catalog.=) 'table'
           AND NOT d.is_temporary
         ORDER BY d.objid
    LOOP
        BEGIN
            DELETE FROM cdc.ddl_shapes AS s WHERE s.relid OPERATOR(pg_catalog.=) r.objid RETURNING s.shape INTO v_old;
            PERFORM cdc.ddl_emit(pg_catalog.jsonb_build_object(
                'kind', 'drop', 'tag', TG_TAG, 'oid', r.objid::pg_catalog.int8, 'schema', r.schema_name,
                'name', r.object_name, 'context', cdc.ddl_context())::pg_catalog.text);
            -- A dropped partition takes its rows out of its parent.
            v_parent := (v_old OPERATOR(pg_catalog.->>) 'parent')::pg_catalog.oid;
            IF v_parent IS NOT NULL AND EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c
                                                 WHERE c.oid OPERATOR(pg_catalog.=) v_parent) THEN
                PERFORM cdc.ddl_snapshot(v_parent, cdc.ddl_shape(v_parent), TG_TAG, true);
                UPDATE cdc.ddl_shapes AS s SET shape = cdc.ddl_shape(v_parent)
                 WHERE s.relid OPERATOR(pg_catalog.=) v_parent;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc: could not record the drop of table %: %', r.objid, SQLERRM;
        END;
    END LOOP;
    PERFORM pg_catalog.set_config('cdc._ddl_current', '', true);
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'cdc: could not record a drop: %', SQLERRM;
END
$fn$;

-- Every table's shape now: the first DDL of each table after setup has its previous shape.
CREATE OR REPLACE FUNCTION cdc.ddl_seed_shapes() RETURNS void
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
INSERT INTO cdc.ddl_shapes AS s (relid, shape)
SELECT c.oid, cdc.ddl_shape(c.oid)
  FROM pg_catalog.pg_class AS c
  JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND c.relpersistence OPERATOR(pg_catalog.=) 'p'
   AND n.nspname OPERATOR(pg_catalog.<>) ALL (cdc.context_excluded_schemas()
                         OPERATOR(pg_catalog.||) ARRAY['cdc', 'pg_catalog', 'information_schema', 'pg_toast'])
ON CONFLICT (relid) DO UPDATE SET shape = EXCLUDED.shape
$$;

REVOKE EXECUTE ON FUNCTION
    cdc.ddl_rewrite_max_rows(),
    cdc.ddl_publication(),
    cdc.ddl_publishes_generated(),
    cdc.ddl_token(),
    cdc.ddl_confirm(),
    cdc.ddl_emit(pg_catalog.text),
    cdc.ddl_copy_field(anyelement),
    cdc.ddl_shape(pg_catalog.oid),
    cdc.ddl_context(),
    cdc.ddl_snapshot(pg_catalog.oid, pg_catalog.jsonb, pg_catalog.text, boolean),
    cdc.ddl_was_rewritten(pg_catalog.oid),
    cdc.ddl_record(pg_catalog.oid, pg_catalog.text),
    cdc.ddl_record_detached(pg_catalog.oid, pg_catalog.text),
    cdc.ddl_command_end(),
    cdc.ddl_table_rewrite(),
    cdc.ddl_sql_drop(),
    cdc.ddl_seed_shapes()
FROM PUBLIC;
