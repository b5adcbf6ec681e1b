-- cdc: dry-run capture on the SOURCE database (`cdc.simulate(conn, fn)`, cdc/simulate.py).
--
-- Installed (and updated) by `cdc setup` through cdc.simulate.install_simulate(), which runs
-- this file and attaches two triggers to every captured table; idempotent. Everything lives
-- in schema `cdc` (shared with the request-context trigger, sql/context.sql).
--
--   cdc_simulate           AFTER INSERT OR UPDATE OR DELETE, FOR EACH ROW
--   cdc_simulate_truncate  BEFORE TRUNCATE, FOR EACH STATEMENT
--
-- both with the condition  WHEN (current_setting('cdc.simulate', true) = 'on').
--
-- Cost when no simulation runs: the WHEN condition is evaluated by the executor when the
-- row event would be queued; it is false, so no trigger event is queued and no function is
-- called. What remains is one current_setting() lookup per changed row (a hash lookup in the
-- session's settings). Measured in docs/undo.md ("What it costs when not in use").
--
-- During a simulation (`cdc.simulate` is 'on' only inside the simulation's transaction, set
-- by cdc.simulate_begin() with is_local): the row trigger sends one INFO message per changed
-- row to the client:
--     message 'cdc.simulate', detail  [seq, relid, op, old_record_text, new_record_text]
-- INFO messages always reach the client, whatever client_min_messages says, and do not wait
-- for the end of the transaction: the deltas of a callback that fails with a database error
-- (which aborts the transaction) are still known to the client. The record texts are the
-- rows' composite output (each column through its type's output function) under the same
-- output settings the capture daemon uses (the function's SET clauses), so the values are
-- exactly the text forms the history store keeps.
--
-- `seq` is a transaction-local counter (`cdc.simulate_seq`, set with set_config(..., true)):
-- a rolled-back savepoint inside the callback takes its increments with it, so a message
-- whose seq is not greater than an earlier one tells the client that the earlier deltas from
-- that seq on were rolled back, and the final value of the counter drops deltas of a
-- rolled-back savepoint at the end.
--
-- The commit guard: cdc.simulate_begin() inserts a row into the UNLOGGED table
-- cdc.simulate_guard, whose DEFERRABLE INITIALLY DEFERRED constraint trigger raises at
-- commit. A simulation's transaction can therefore never commit, even when the callback runs
-- a raw COMMIT. The table stays empty (its rows are always rolled back).

CREATE SCHEMA IF NOT EXISTS cdc;

-- The row trigger. Called only when the WHEN condition holds (a simulation is running).
-- The SET clauses apply for the duration of the call: the record output below uses the
-- capture daemon's output settings (cdc/stream/replication.py OUTPUT_SETTINGS).
CREATE OR REPLACE FUNCTION cdc.simulate_capture() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET DateStyle = 'ISO, MDY'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
SET TimeZone = 'UTC'
AS $fn$
DECLARE
    v_seq pg_catalog.text;
BEGIN
    v_seq := pg_catalog.set_config(
        'cdc.simulate_seq',
        (coalesce(pg_catalog.current_setting('cdc.simulate_seq', true), '0')::pg_catalog.int8
            OPERATOR(pg_catalog.+) 1)::pg_catalog.text,
        true);
    RAISE INFO USING
        MESSAGE = 'cdc.simulate',
        DETAIL = pg_catalog.json_build_array(
            v_seq::pg_catalog.int8, TG_RELID::pg_catalog.int8, TG_OP,
            CASE WHEN TG_OP OPERATOR(pg_catalog.<>) 'INSERT' THEN OLD::pg_catalog.text END,
            CASE WHEN TG_OP OPERATOR(pg_catalog.<>) 'DELETE' THEN NEW::pg_catalog.text END
        )::pg_catalog.text;
    RETURN NULL;
END
$fn$;

-- TRUNCATE fires no row triggers: before it runs, report every row of the table as deleted.
CREATE OR REPLACE FUNCTION cdc.simulate_capture_truncate() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET DateStyle = 'ISO, MDY'
SET IntervalStyle = 'postgres'
SET extra_float_digits = 1
SET bytea_output = 'hex'
SET TimeZone = 'UTC'
AS $fn$
DECLARE
    v_row pg_catalog.text;
    v_seq pg_catalog.text;
BEGIN
    FOR v_row IN EXECUTE pg_catalog.format('SELECT t::pg_catalog.text FROM ONLY %s AS t', TG_RELID::pg_catalog.regclass)
    LOOP
        v_seq := pg_catalog.set_config(
            'cdc.simulate_seq',
            (coalesce(pg_catalog.current_setting('cdc.simulate_seq', true), '0')::pg_catalog.int8
                OPERATOR(pg_catalog.+) 1)::pg_catalog.text,
            true);
        RAISE INFO USING
            MESSAGE = 'cdc.simulate',
            DETAIL = pg_catalog.json_build_array(
                v_seq::pg_catalog.int8, TG_RELID::pg_catalog.int8, 'DELETE', v_row, NULL::pg_catalog.text
            )::pg_catalog.text;
    END LOOP;
    RETURN NULL;
END
$fn$;

-- The commit guard (see above).
CREATE UNLOGGED TABLE IF NOT EXISTS cdc.simulate_guard (started_at timestamptz NOT NULL DEFAULT pg_catalog.now());
COMMENT ON TABLE cdc.simulate_guard IS
    'cdc simulate: a row inserted here by cdc.simulate_begin() makes the transaction fail at commit; always empty';

CREATE OR REPLACE FUNCTION cdc.simulate_refuse_commit() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $fn$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'invalid_transaction_termination',
        MESSAGE = 'cdc simulate: a simulation''s transaction cannot commit',
        HINT = 'the callback passed to cdc.simulate() ran COMMIT (or SET CONSTRAINTS ALL IMMEDIATE); '
               'a simulation always rolls back';
END
$fn$;

DO $do$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                    WHERE tgrelid = 'cdc.simulate_guard'::pg_catalog.regclass
                      AND tgname = 'cdc_simulate_refuse_commit') THEN
        CREATE CONSTRAINT TRIGGER cdc_simulate_refuse_commit AFTER INSERT ON cdc.simulate_guard
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION cdc.simulate_refuse_commit();
    END IF;
END
$do$;

-- The dry-run marker: a transactional `cdc.simulate` logical message (the capture daemon sees a
-- streamed, then aborted, transaction; the marker says that it was a dry run). SECURITY DEFINER
-- because `cdc setup`, run as a superuser, revokes pg_logical_emit_message() from PUBLIC; the
-- content is fixed, the caller chooses nothing. search_path pinned with pg_temp last, names
-- qualified. EXECUTE stays granted to PUBLIC: cdc.simulate_begin() runs as the application's role.
CREATE OR REPLACE FUNCTION cdc.emit_simulate_marker() RETURNS pg_lsn
LANGUAGE sql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$ SELECT pg_catalog.pg_logical_emit_message(true, 'cdc.simulate', '{"simulate": true}'::pg_catalog.text) $$;

-- Start a simulation in the current transaction: switch the triggers on (transaction-local),
-- reset the counter, arm the commit guard, and mark the transaction in the WAL. Returns true.
CREATE OR REPLACE FUNCTION cdc.simulate_begin() RETURNS boolean
LANGUAGE sql VOLATILE SECURITY INVOKER
AS $$
SELECT pg_catalog.set_config('cdc.simulate', 'on', true) IS NOT NULL
   AND pg_catalog.set_config('cdc.simulate_seq', '0', true) IS NOT NULL;
INSERT INTO cdc.simulate_guard DEFAULT VALUES;
SELECT cdc.emit_simulate_marker() IS NOT NULL
$$;

-- Tables created later: an event trigger (installed only when `cdc setup` runs as superuser)
-- attaches the two triggers to every new permanent table or partition outside the system
-- schemas and the schemas listed by cdc.simulate_excluded_schemas(). A failure only warns.
CREATE OR REPLACE FUNCTION cdc.simulate_excluded_schemas() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '{}'::pg_catalog.text[] $$;

CREATE OR REPLACE FUNCTION cdc.simulate_attach_new_tables() RETURNS event_trigger
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT c.oid::pg_catalog.regclass AS rel
          FROM pg_catalog.pg_event_trigger_ddl_commands() AS d
          JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) d.objid
          JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND d.objsubid OPERATOR(pg_catalog.=) 0
           AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::"char"[])
           AND c.relpersistence OPERATOR(pg_catalog.=) 'p'
           AND n.nspname::pg_catalog.text OPERATOR(pg_catalog.<>) ALL (cdc.simulate_excluded_schemas()
                OPERATOR(pg_catalog.||) '{cdc,pg_catalog,information_schema,pg_toast}'::pg_catalog.text[])
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                            WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid AND t.tgname OPERATOR(pg_catalog.=) 'cdc_simulate')
    LOOP
        BEGIN
            EXECUTE pg_catalog.format('CREATE TRIGGER cdc_simulate AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW'
                           ' WHEN (pg_catalog.current_setting(''cdc.simulate'', true) OPERATOR(pg_catalog.=) ''on'')'
                           ' EXECUTE FUNCTION cdc.simulate_capture()', r.rel);
            EXECUTE pg_catalog.format('CREATE TRIGGER cdc_simulate_truncate BEFORE TRUNCATE ON %s FOR EACH STATEMENT'
                           ' WHEN (pg_catalog.current_setting(''cdc.simulate'', true) OPERATOR(pg_catalog.=) ''on'')'
                           ' EXECUTE FUNCTION cdc.simulate_capture_truncate()', r.rel);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc: could not attach the simulate triggers to %: %', r.rel, SQLERRM;
        END;
    END LOOP;
END
$fn$;

-- Privileges. The application's roles run simulations (cdc.simulate_begin(), the triggers'
-- functions, the marker) and the event trigger runs as the role that created a table, which
-- creates the triggers (CREATE TRIGGER checks EXECUTE on their functions): those keep EXECUTE
-- for PUBLIC. The commit guard's trigger function and the event trigger function need none.
GRANT USAGE ON SCHEMA cdc TO PUBLIC;
GRANT INSERT ON cdc.simulate_guard TO PUBLIC;
REVOKE EXECUTE ON FUNCTION
    cdc.simulate_refuse_commit(),
    cdc.simulate_attach_new_tables()
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    cdc.simulate_capture(),
    cdc.simulate_capture_truncate(),
    cdc.simulate_begin(),
    cdc.emit_simulate_marker(),
    cdc.simulate_excluded_schemas()
TO PUBLIC;
