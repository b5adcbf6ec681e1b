-- cdc: request context on the SOURCE database.
--
-- Installed (and updated) by `cdc setup` through cdc/source_context.py, which runs this file
-- and then replaces the configuration functions below with the configured values; idempotent.
-- Everything lives in schema `cdc`. Setting values are never stored in tables or logged: they
-- only go into the WAL, as logical decoding messages that the daemon reads from its slot.
--
-- A statement-level trigger `cdc_context` (BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE,
-- FOR EACH STATEMENT) on every captured table writes a transactional logical message, prefix
-- `cdc.context`, before the changes of the first statement of a transaction, and again before
-- the next statement whenever the request id or application_name changed:
--   {"request_id": str|null, "actor": str|null, "application_name": str|null, "db_user": str,
--    "client_addr": str|null, "backend_pid": int,
--    "source": "setting"|"application_name"|"client"|"none", "extra": {str: str}}
-- (row_to_json() output: compact; "extra" as json_build_object() writes it, with spaces).
--
-- Where the context comes from, in priority order:
--   1. `SET LOCAL cdc.request_id = '...'` (with `cdc.actor`; the configured extra names
--      `cdc.<name>` go to "extra"): source "setting";
--   2. `application_name` matched against the configured pattern (default `req:<id>`):
--      source "application_name";
--   3. nothing: request_id null, source "none". With cdc.context_emit_none() (the default), one
--      message per transaction carrying db_user, pid, application_name (and actor and extras if
--      set); without it, no message at all.
-- The client helper (cdc/client.py) writes the message itself (source "client") and records the
-- fingerprint below, so the trigger stays quiet for its transactions.
--
-- Dedupe: `cdc._emitted` holds the fingerprint of the last emission,
--     request_id || chr(31) || application_name      (request_id '' when never set)
-- transaction-local after a request's message; at session level in a session without a request
-- (such sessions then write no state per transaction). Every statement compares it with the
-- current fingerprint: that is the whole fast path. A change of actor or of an extra setting
-- alone, mid-transaction, is therefore not noticed (they are read when the message is built). A
-- rolled-back savepoint takes its emission and the fingerprint with it, so the context is emitted
-- again after it when needed. With emit_none, a transaction without a request gets its "none"
-- message from the first statement that runs before the transaction has an xid (the message
-- gives it one): a transaction that got its xid earlier (a row lock, a write to a table without
-- the trigger, txid_current()) goes without its "none" message. Requests are never missed.
--
-- Cost: the trigger runs for every INSERT/UPDATE/DELETE/TRUNCATE statement on a captured table.
-- PL/pgSQL rebuilds the state of every expression of every trigger (one per table) in every
-- transaction, about a microsecond per function call in the expression: that, not evaluation, is
-- the dominant cost. So everything is written as inlinable SQL functions folded into as few
-- PL/pgSQL "simple expressions" with as few function calls as possible: PERFORM (goes through the
-- executor), local variables, loops, a `SET search_path` clause (a GUC save/restore per call,
-- ~2 us) and a per-transaction set_config() are avoided on purpose. Instead of a SET search_path
-- clause, every name is schema-qualified (functions, operators, types), so the trigger behaves
-- the same under any search_path. The "none" message is cached in the session settings
-- `cdc._cache_key`/`cdc._cache_msg`. Measured figures: cdc/source_context.py.
--
-- Extra settings: PostgreSQL cannot list custom settings from SQL (pg_settings and SHOW ALL hide
-- placeholder variables), so the trigger reads a configured list of names.
--
-- Nothing in the trigger can raise: current_setting(..., true) never fails, set_config() of the
-- `cdc._*` placeholders cannot fail, json_build_object() escapes everything, and the pattern was
-- compiled once by install_context. There is no EXCEPTION block (that would start a
-- subtransaction on every statement).

CREATE SCHEMA IF NOT EXISTS cdc;
COMMENT ON SCHEMA cdc IS 'cdc change-data-capture: request-context trigger and helpers';

-- ---------------------------------------------------------------------------------------------
-- Configuration. These small SQL functions are inlined and constant-folded into the cached plans
-- of the trigger, so reading them costs nothing; install_context() replaces them with the
-- configured values (CREATE OR REPLACE invalidates the cached plans in every session).

-- The prefix of the settings: `<prefix>.request_id`, `<prefix>.actor`, `<prefix>.<extra>`.
CREATE OR REPLACE FUNCTION cdc.context_settings_prefix() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 'cdc'::pg_catalog.text $$;

-- The request id carried by an application_name, or NULL. Generated from the Python pattern
-- (default `req:(?P<id>[A-Za-z0-9._:-]+)`) by cdc.context.pattern_to_postgres(), behind a
-- strpos() test of a literal every match contains (cdc.context.required_literal()), cheaper than
-- running the regular expression on every statement. install_context() runs it once, so a pattern
-- PostgreSQL cannot compile is refused there, never in the trigger.
CREATE OR REPLACE FUNCTION cdc.request_id_from_application_name(app text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN pg_catalog.strpos(app, 'req:') OPERATOR(pg_catalog.>) 0
             THEN nullif(pg_catalog.substring(app, E'req:([A-Za-z0-9._:-]+)'::pg_catalog.text), '') END $$;

-- A token that changes with every install_context(): part of the session cache key, so a new
-- configuration (pattern, extras) is not hidden behind a message cached under the old one.
CREATE OR REPLACE FUNCTION cdc.context_config_id() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ''::pg_catalog.text $$;

-- Whether a transaction with no request id at all gets a "none" message.
CREATE OR REPLACE FUNCTION cdc.context_emit_none() RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT true $$;

-- The "extra" object: the configured `<prefix>.<name>` settings. Generated by install_context as
--   json_build_object('tenant', nullif(current_setting('cdc.tenant', true), ''), ...)
-- (unset names are null; the parser drops them).
CREATE OR REPLACE FUNCTION cdc.context_extra_json() RETURNS json
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT '{}'::pg_catalog.json $$;

-- The extra settings' part of the session cache key. Generated by install_context as
--   E'\x1f' || coalesce(current_setting('cdc.tenant', true), '') || E'\x1f' || ...
CREATE OR REPLACE FUNCTION cdc.context_extra_key() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT ''::pg_catalog.text $$;

-- Schemas whose new tables the event trigger leaves alone (besides cdc and the system ones).
CREATE OR REPLACE FUNCTION cdc.context_excluded_schemas() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '{}'::pg_catalog.text[] $$;

-- ---------------------------------------------------------------------------------------------
-- The context, as SQL functions that the planner inlines into the trigger's expressions.

-- The fingerprint compared with `cdc._emitted` on every statement: the raw request id setting
-- ('' when never set) and application_name. Must match cdc.context.context_fingerprint().
CREATE OR REPLACE FUNCTION cdc.context_fingerprint() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT coalesce(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.request_id', true), '')
       OPERATOR(pg_catalog.||) E'\x1f'
       OPERATOR(pg_catalog.||) pg_catalog.current_setting('application_name')
$$;

-- What the cached "none" message depends on besides the fingerprint (the backend pid and the
-- client address do not change within a session).
CREATE OR REPLACE FUNCTION cdc.context_cache_key() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT coalesce(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.actor', true), '')
       OPERATOR(pg_catalog.||) (E'\x1f' OPERATOR(pg_catalog.||) cdc.context_config_id() OPERATOR(pg_catalog.||) E'\x1f')  -- one constant
       OPERATOR(pg_catalog.||) CURRENT_USER::pg_catalog.text
       OPERATOR(pg_catalog.||) cdc.context_extra_key()
$$;

-- The `cdc.context` message content. row_to_json() of this composite type writes the whole
-- object, keys included, in one call: the cheapest way to build it (json_build_object() costs
-- about a microsecond more per key).
DO $$
BEGIN
    CREATE TYPE cdc.context_message_t AS (
        request_id text, actor text, application_name text, db_user text, client_addr text,
        backend_pid integer, source text, extra json
    );
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;

CREATE OR REPLACE FUNCTION cdc.context_message(request_id text, source text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT pg_catalog.row_to_json(ROW(
           request_id,
           nullif(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.actor', true), ''),
           nullif(pg_catalog.current_setting('application_name'), ''),
           CURRENT_USER::pg_catalog.text,
           pg_catalog.host(pg_catalog.inet_client_addr()),
           pg_catalog.pg_backend_pid(),
           source,
           cdc.context_extra_json()
       )::cdc.context_message_t)::pg_catalog.text
$$;

-- Emit the message of a request and record its fingerprint in this transaction. Transactional:
-- the message belongs to the (sub)transaction, like the changes it describes.
CREATE OR REPLACE FUNCTION cdc.emit_setting_context() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT pg_catalog.pg_logical_emit_message(true, 'cdc.context', cdc.context_message(
           pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.request_id', true),
           'setting'))::pg_catalog.text
       OPERATOR(pg_catalog.||) pg_catalog.set_config('cdc._emitted', cdc.context_fingerprint(), true)
$$;

CREATE OR REPLACE FUNCTION cdc.emit_application_name_context() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT pg_catalog.pg_logical_emit_message(true, 'cdc.context', cdc.context_message(
           cdc.request_id_from_application_name(pg_catalog.current_setting('application_name')),
           'application_name'))::pg_catalog.text
       OPERATOR(pg_catalog.||) pg_catalog.set_config('cdc._emitted', cdc.context_fingerprint(), true)
$$;

-- A session without a request: record its fingerprint at session level, so that the fast path
-- holds in every later transaction until the request id or application_name change.
CREATE OR REPLACE FUNCTION cdc.context_quiet() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT pg_catalog.set_config('cdc._emitted', cdc.context_fingerprint(), false)
$$;

-- Emit the "none" message, built and cached in the session settings `cdc._cache_msg` and
-- `cdc._cache_key`, and make the session quiet.
CREATE OR REPLACE FUNCTION cdc.emit_and_cache_none() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT pg_catalog.pg_logical_emit_message(
           true, 'cdc.context', pg_catalog.set_config('cdc._cache_msg', cdc.context_message(NULL, 'none'), false)
       )::pg_catalog.text
       OPERATOR(pg_catalog.||) pg_catalog.set_config('cdc._cache_key', cdc.context_cache_key(), false)
       OPERATOR(pg_catalog.||) cdc.context_quiet()
$$;

-- Emit the cached "none" message (the caller checked that it is current).
CREATE OR REPLACE FUNCTION cdc.emit_cached_none() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT pg_catalog.pg_logical_emit_message(true, 'cdc.context', pg_catalog.current_setting('cdc._cache_msg', true))::pg_catalog.text
$$;

-- ---------------------------------------------------------------------------------------------
-- The trigger function. Statement-level: it runs once per statement, not per row. Returns NULL
-- (ignored for statement triggers). Each IF condition and assignment is one "simple expression".
--
-- `cdc._emitted` holds the fingerprint of the context emitted last: transaction-local for a
-- request; at session level for a session without a request (so such sessions write no state per
-- transaction). With emit_none, a transaction without a request gets its "none" message from the
-- first statement that runs while the transaction has no xid yet (the message gives it one): a
-- transaction that got its xid earlier (a row lock, a write to a table without the trigger,
-- txid_current()) goes without it. Requests are never missed.

CREATE OR REPLACE FUNCTION cdc.context_trigger() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
AS $fn$
DECLARE
    v_done pg_catalog.text;
BEGIN
    -- Fast path: the context was emitted already (or the session has no request).
    IF (NOT cdc.context_emit_none() OR pg_catalog.txid_current_if_assigned() IS NOT NULL)
       AND cdc.context_fingerprint() OPERATOR(pg_catalog.=) pg_catalog.current_setting('cdc._emitted', true) THEN
        RETURN NULL;
    END IF;
    -- A request id setting: tested first, the cheapest test. (The first evaluation of an
    -- expression in a transaction initializes its whole tree, short-circuited parts included:
    -- the order of these tests matters.)
    IF coalesce(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.request_id', true), '')
           OPERATOR(pg_catalog.<>) '' THEN
        v_done := cdc.emit_setting_context();
        RETURN NULL;
    END IF;
    -- emit_none, first statement of a transaction in a session known to have no request (folded
    -- away without emit_none).
    IF cdc.context_emit_none()
       AND cdc.context_fingerprint() OPERATOR(pg_catalog.=) pg_catalog.current_setting('cdc._emitted', true)
       AND cdc.context_cache_key() OPERATOR(pg_catalog.=) pg_catalog.current_setting('cdc._cache_key', true) THEN
        v_done := cdc.emit_cached_none();
        RETURN NULL;
    END IF;
    IF cdc.request_id_from_application_name(pg_catalog.current_setting('application_name')) IS NOT NULL THEN
        v_done := cdc.emit_application_name_context();
    ELSIF cdc.context_emit_none() THEN
        v_done := cdc.emit_and_cache_none();
    ELSE
        v_done := cdc.context_quiet();
    END IF;
    RETURN NULL;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Tables created later: an event trigger (installed only when `cdc setup` runs as superuser)
-- attaches `cdc_context` to every new permanent table or partition outside the excluded
-- schemas. A failure only warns: it never fails the user's DDL.

CREATE OR REPLACE FUNCTION cdc.context_attach_new_tables() RETURNS event_trigger
LANGUAGE plpgsql VOLATILE SECURITY INVOKER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT c.oid::regclass AS rel
          FROM pg_event_trigger_ddl_commands() AS d
          JOIN pg_class AS c ON c.oid = d.objid
          JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE d.classid = 'pg_catalog.pg_class'::regclass
           AND d.objsubid = 0
           AND c.relkind IN ('r', 'p')
           AND c.relpersistence = 'p'
           AND n.nspname <> ALL (cdc.context_excluded_schemas()
                                 || ARRAY['cdc', 'pg_catalog', 'information_schema', 'pg_toast'])
           AND NOT EXISTS (SELECT 1 FROM pg_trigger AS t
                            WHERE t.tgrelid = c.oid AND t.tgname = 'cdc_context')
    LOOP
        BEGIN
            EXECUTE format('CREATE TRIGGER cdc_context BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE'
                           ' ON %s FOR EACH STATEMENT EXECUTE FUNCTION cdc.context_trigger()', r.rel);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc: could not attach the request-context trigger to %: %', r.rel, SQLERRM;
        END;
    END LOOP;
END
$fn$;

-- The application's roles run the trigger (SECURITY INVOKER): they must reach these.
GRANT USAGE ON SCHEMA cdc TO PUBLIC;
GRANT USAGE ON TYPE cdc.context_message_t TO PUBLIC;
GRANT EXECUTE ON FUNCTION
    cdc.context_settings_prefix(),
    cdc.request_id_from_application_name(text),
    cdc.context_config_id(),
    cdc.context_emit_none(),
    cdc.context_extra_json(),
    cdc.context_extra_key(),
    cdc.context_fingerprint(),
    cdc.context_cache_key(),
    cdc.context_message(text, text),
    cdc.emit_setting_context(),
    cdc.emit_application_name_context(),
    cdc.context_quiet(),
    cdc.emit_and_cache_none(),
    cdc.emit_cached_none(),
    cdc.context_trigger()
TO PUBLIC;
