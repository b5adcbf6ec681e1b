-- cdc: request context on the SOURCE database.
--
-- Installed (and updated) by `cdc setup` through cdc/source_context.py, which runs this file
-- and then replaces the configuration functions below with the configured values; idempotent.
-- Everything lives in schema `cdc`. Setting values are never stored in tables or logged: they
-- only go into the WAL, as logical decoding messages that the daemon reads from its slot.
--
-- Signed messages. The only writer of `cdc.context` and `cdc.error` messages is the SECURITY
-- DEFINER pair cdc.emit_context() / cdc.report_error() below, owned by the role that ran `cdc
-- setup`. They stamp from the server side, never from their arguments, what a caller must not
-- be able to claim (db_user = session_user, client_addr, backend_pid, application_name, the
-- transaction id) and append a MAC: HMAC-SHA256 under the secret of cdc.context_key, which
-- no application role can read. The daemon refuses every message whose MAC does not verify
-- (cdc/context.py), so a raw pg_logical_emit_message() claiming another user, address or
-- session attributes nothing. What a caller may claim: its request id, actor, extra settings
-- and the source label. docs/security.md has the trust model.
--
-- Message format (cdc/context.py verifies it byte for byte): the body is a compact JSON object
-- (row_to_json of a composite type), the MAC is appended as its last member:
--     <body without its closing brace> || ',"mac":"<64 hex digits>"}'
-- over  prefix || 0x00 || <body bytes, UTF-8>  (the prefix binds a body to its kind), with the
-- precomputed pads of the key: mac = sha256(opad || sha256(ipad || prefix || 0x00 || body)).
-- A verifier cuts the fixed 74-byte suffix, puts the brace back and recomputes: no JSON parse
-- before the MAC is checked. The builtin sha256(bytea) (PostgreSQL 11+) is all it needs.
--
-- `cdc.context` (transactional, written before the changes it describes):
--   {"request_id": str|null, "actor": str|null, "application_name": str|null, "db_user": str,
--    "client_addr": str|null, "backend_pid": int,
--    "source": "setting"|"application_name"|"client"|"none", "extra": {str: str}, "xid": int,
--    "session_level": bool|null}
-- "xid" is txid_current(): the daemon checks it against the transaction the message arrives
-- in, so a signed body copied out of the WAL cannot be replayed into another transaction.
-- "session_level" (source "setting" only): true when the request id was carried over from an
-- earlier transaction of the session, a session-level SET rather than SET LOCAL; null where that
-- cannot be told (below).
--
-- A statement-level trigger `cdc_context` (BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE,
-- FOR EACH STATEMENT) on every captured table writes a context message before the changes of
-- the first statement of a transaction, and again before the next statement whenever the
-- request id or application_name changed.
--
-- Where the context comes from, in priority order:
--   1. `SET LOCAL cdc.request_id = '...'` (with `cdc.actor`; the configured extra names
--      `cdc.<name>` go to "extra"): source "setting";
--   2. `application_name` matched against the configured pattern (default `req:<id>`):
--      source "application_name";
--   3. nothing: request_id null, source "none". With cdc.context_emit_none() (the default), one
--      message per transaction carrying db_user, pid, application_name (and actor and extras if
--      set); without it, no message at all.
-- The client helper (cdc/client.py) calls cdc.emit_context() itself (source "client") and
-- records the fingerprint below, so the trigger stays quiet for its transactions.
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
-- the dominant cost. So the SECURITY INVOKER part (the trigger and the small functions it calls)
-- is written as inlinable SQL functions folded into as few PL/pgSQL "simple expressions" with as
-- few function calls as possible: PERFORM (goes through the executor), local variables, loops, a
-- `SET search_path` clause (a GUC save/restore per call, ~2 us, and no inlining) and a
-- per-transaction set_config() are avoided on purpose. Instead of a SET search_path clause, every
-- name in them is schema-qualified (functions, operators, types), so they behave the same under
-- any search_path, a caller's temporary objects included; keep it so. The signing functions run
-- once per emitted message: they are SECURITY DEFINER with `SET search_path = pg_catalog,
-- pg_temp` (pg_temp last: a caller's temporary view or table never shadows what they read) and
-- qualified names as well. Measured figures: cdc/source_context.py.
--
-- Extra settings: PostgreSQL cannot list custom settings from SQL (pg_settings and SHOW ALL hide
-- placeholder variables), so the trigger reads a configured list of names.
--
-- SET or SET LOCAL? Nothing in SQL tells them apart inside a transaction: pg_settings hides
-- placeholder variables (and says source "session" for both on real ones), and the session's
-- value under a SET LOCAL shows only after the transaction ends (checked on 15 and 18). What can
-- be told: a request id in force at the first statement of a transaction was not set by a SET
-- LOCAL statement before it, and if it is also the request id of the session's previous such
-- emission (`cdc._setting_rid`, kept at session level), it was carried over from that
-- transaction: a session-level SET (or a connection or role setting), which tags every later
-- transaction of the connection, behind a pooler another client's. cdc.emit_context() flags such
-- a message "session_level"; the daemon logs and counts it. "The first statement" is
-- statement_timestamp() = transaction_timestamp(), which holds only for a statement sent with the
-- simple query protocol (no parameters: psql, scripts, autocommit writes of simple-query
-- drivers) that opens its transaction: the extended protocol sets statement_timestamp() again at
-- Bind and Execute, after the transaction began at Parse. So not seen: a carried-over id in a
-- parameterized statement, or in a transaction that began with BEGIN (or any statement before its
-- first write); seen wrongly: the same request id set locally in the very statement (or query
-- string) of the first write, in two transactions of a session in a row.
--
-- Nothing in the trigger can raise: current_setting(..., true) never fails, set_config() of the
-- `cdc._*` placeholders cannot fail, row_to_json() escapes everything, the pattern was compiled
-- once by install_context, and cdc.emit_context() emits nothing (rather than fail the
-- application's write) when the key is missing. There is no EXCEPTION block (that would start a
-- subtransaction on every statement).

CREATE SCHEMA IF NOT EXISTS cdc;
COMMENT ON SCHEMA cdc IS 'cdc change-data-capture: request-context trigger and helpers';
-- Nobody but the owner creates anything here (a function or table planted in this schema
-- would be found by the qualified names below).
REVOKE CREATE ON SCHEMA cdc FROM PUBLIC;

-- ---------------------------------------------------------------------------------------------
-- The signing key: one row, written by install_context() (secrets.token_bytes(32)) and rotated
-- by `cdc setup --rotate-context-key`, which keeps the previous key so that messages signed just
-- before the rotation still verify until the daemon's next session (docs/security.md). Only the
-- owner (the setup role, which the definer functions run as) and the daemon's role read it.
-- The pads are precomputed (key XOR 0x36 / 0x5c, 64 bytes): no XOR at run time.

CREATE TABLE IF NOT EXISTS cdc.context_key (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    key_id           text NOT NULL,        -- public name: 8 hex digits of HMAC(key, 'cdc key id')
    ipad             bytea NOT NULL,
    opad             bytea NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    previous_key_id  text,
    previous_ipad    bytea,
    previous_opad    bytea,
    emit_revoked     boolean NOT NULL DEFAULT false  -- setup revoked pg_logical_emit_message from PUBLIC
);
REVOKE ALL ON cdc.context_key FROM PUBLIC;
COMMENT ON TABLE cdc.context_key IS
    'cdc: the secret that signs context and error messages; never readable by application roles';

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

-- Schemas whose new tables the event trigger leaves alone (besides cdc and the system ones).
CREATE OR REPLACE FUNCTION cdc.context_excluded_schemas() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT '{}'::pg_catalog.text[] $$;

-- ---------------------------------------------------------------------------------------------
-- Signing: the only writers of `cdc.context` and `cdc.error` messages (see the top of the file).
-- SECURITY DEFINER because the key they sign with is readable only by their owner; EXECUTE stays
-- granted to PUBLIC on purpose: the context trigger calls cdc.emit_context() as whatever role the
-- application writes with, and the client helper calls both as that role. What a caller cannot
-- choose is stamped here.

DO $$
BEGIN
    CREATE TYPE cdc.context_body_t AS (
        request_id text, actor text, application_name text, db_user text, client_addr text,
        backend_pid integer, source text, extra json, xid bigint, session_level boolean
    );
EXCEPTION WHEN duplicate_object THEN
    -- installed by an earlier version: add what it lacks (a new member is ignored by older daemons)
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                    WHERE attrelid OPERATOR(pg_catalog.=) 'cdc.context_body_t'::pg_catalog.regclass
                      AND attname OPERATOR(pg_catalog.=) 'session_level' AND NOT attisdropped) THEN
        ALTER TYPE cdc.context_body_t ADD ATTRIBUTE session_level boolean;
    END IF;
END
$$;

DO $$
BEGIN
    CREATE TYPE cdc.error_body_t AS (
        request_id text, error_type text, message text, location text, actor text, at timestamptz,
        db_user text, client_addr text, backend_pid integer, xid bigint, reporter_pid integer
    );
EXCEPTION WHEN duplicate_object THEN
    NULL;
END
$$;

-- The proof, handed to the client helper, that a session wrote request_id's context: it lets
-- another connection of the same database user report that session's error as that session's
-- (cdc.report_error's session_token). HMAC over the JSON array [request_id, user, pid, xid].
CREATE OR REPLACE FUNCTION cdc.session_proof(request_id pg_catalog.text, db_user pg_catalog.text,
                                             pid pg_catalog.int4, xid pg_catalog.int8,
                                             ipad pg_catalog.bytea, opad pg_catalog.bytea)
RETURNS pg_catalog.text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
SELECT pg_catalog.encode(
           pg_catalog.sha256(opad OPERATOR(pg_catalog.||) pg_catalog.sha256(
               ipad OPERATOR(pg_catalog.||) pg_catalog.decode('6364632e73657373696f6e00', 'hex')  -- 'cdc.session' 0x00
               OPERATOR(pg_catalog.||) pg_catalog.convert_to(
                   pg_catalog.json_build_array(request_id, db_user, pid, xid)::pg_catalog.text, 'UTF8'))),
           'hex')
$$;

-- Write a `cdc.context` message (transactional). The caller claims request_id, actor, extra and
-- source; application_name, db_user (session_user), client_addr, backend_pid and the xid are
-- the server's, and so is session_level (source 'setting': see "SET or SET LOCAL?" above).
-- Returns, for source 'client', the session token of cdc.report_error() as
-- "<pid>.<xid>.<proof>"; '' otherwise. Emits nothing (and returns '') when there is no key,
-- rather than fail the application's write.
CREATE OR REPLACE FUNCTION cdc.emit_context(request_id text, actor text, extra json, source text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_ipad pg_catalog.bytea;
    v_opad pg_catalog.bytea;
    v_body pg_catalog.bytea;
    v_lsn pg_catalog.pg_lsn;
    v_session pg_catalog.bool;
    v_mark pg_catalog.text;
BEGIN
    -- Few statements on purpose: each PL/pgSQL expression is set up again in every transaction
    -- (and a helper SQL function would be planned again in every transaction; one query doing
    -- it all is planned again at every call: both measured slower).
    SELECT k.ipad, k.opad INTO v_ipad, v_opad FROM cdc.context_key AS k;
    IF v_ipad IS NULL THEN
        RETURN '';  -- no key: no message rather than a failed write
    END IF;
    IF emit_context.source OPERATOR(pg_catalog.=) 'setting'
       AND pg_catalog.statement_timestamp() OPERATOR(pg_catalog.=) pg_catalog.transaction_timestamp() THEN
        -- In force at the transaction's first statement, and the request id of the session's
        -- previous such emission: carried over by a session-level SET. Then remember it for the
        -- next transaction (at session level: it outlives this one). Only here: elsewhere the
        -- two cannot be told apart anyway, and every other emission stays as cheap as before.
        v_session := emit_context.request_id OPERATOR(pg_catalog.=) pg_catalog.current_setting('cdc._setting_rid', true);
        v_mark := pg_catalog.set_config('cdc._setting_rid', emit_context.request_id, false);
    END IF;
    -- The claims go in as given: the daemon truncates ids, refuses an unknown source and a
    -- body over 1 MiB (checks here would cost every transaction).
    v_body := pg_catalog.convert_to(pg_catalog.row_to_json(ROW(
        emit_context.request_id,
        emit_context.actor,
        nullif(pg_catalog.current_setting('application_name'), ''),
        SESSION_USER::pg_catalog.text,
        pg_catalog.host(pg_catalog.inet_client_addr()),
        pg_catalog.pg_backend_pid(),
        emit_context.source,
        emit_context.extra,
        pg_catalog.txid_current(),
        v_session
    )::cdc.context_body_t)::pg_catalog.text, 'UTF8');
    v_lsn := pg_catalog.pg_logical_emit_message(true, 'cdc.context',
        pg_catalog.substring(v_body, 1, pg_catalog.octet_length(v_body) OPERATOR(pg_catalog.-) 1)
        OPERATOR(pg_catalog.||) pg_catalog.convert_to(
            ',"mac":"' OPERATOR(pg_catalog.||) pg_catalog.encode(pg_catalog.sha256(v_opad OPERATOR(pg_catalog.||)
                pg_catalog.sha256(v_ipad OPERATOR(pg_catalog.||) pg_catalog.decode('6364632e636f6e7465787400', 'hex')  -- 'cdc.context' 0x00
                                  OPERATOR(pg_catalog.||) v_body)), 'hex')
            OPERATOR(pg_catalog.||) '"}', 'UTF8'));
    IF emit_context.source OPERATOR(pg_catalog.=) 'client' THEN
        RETURN pg_catalog.pg_backend_pid()::pg_catalog.text OPERATOR(pg_catalog.||) '.'
               OPERATOR(pg_catalog.||) pg_catalog.txid_current()::pg_catalog.text OPERATOR(pg_catalog.||) '.'
               OPERATOR(pg_catalog.||) cdc.session_proof(emit_context.request_id,
                   SESSION_USER::pg_catalog.text, pg_catalog.pg_backend_pid(), pg_catalog.txid_current(), v_ipad, v_opad);
    END IF;
    RETURN '';
END
$fn$;

-- Write a `cdc.error` message (NON-transactional: it survives the rollback it explains; flushed
-- on PostgreSQL 17+ so the walsender can reach it before the transaction ends). The caller
-- claims request_id, error_type, message, location and actor; db_user (session_user),
-- client_addr, backend_pid, the xid of the current transaction and the time are the server's.
-- With the session_token that cdc.emit_context() gave another session of the same database
-- user for this request id, backend_pid and xid are that session's (reporter_pid says who
-- wrote it): how the client helper reports the error of a transaction that failed in SQL from a
-- second connection. A token that does not verify is ignored. Returns the message's LSN.
CREATE OR REPLACE FUNCTION cdc.report_error(request_id text, error_type text, message text, location text,
                                            actor text DEFAULT NULL, session_token text DEFAULT NULL)
RETURNS pg_lsn
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_key record;
    v_pid pg_catalog.int4 := pg_catalog.pg_backend_pid();
    v_xid pg_catalog.int8 := pg_catalog.txid_current_if_assigned();
    v_reporter pg_catalog.int4;
    v_rid pg_catalog.text := report_error.request_id;
    v_parts pg_catalog.text[];
    v_body pg_catalog.bytea;
    v_content pg_catalog.bytea;
BEGIN
    SELECT k.ipad, k.opad, k.previous_ipad, k.previous_opad INTO v_key FROM cdc.context_key AS k;
    IF v_key.ipad IS NULL THEN
        RAISE EXCEPTION 'cdc: the source has no context key' USING HINT = 'run `cdc setup`';
    END IF;
    v_parts := pg_catalog.string_to_array(report_error.session_token, '.');
    IF pg_catalog.array_length(v_parts, 1) OPERATOR(pg_catalog.=) 3
       AND v_parts[1] OPERATOR(pg_catalog.~) '^[0-9]{1,9}$' AND v_parts[2] OPERATOR(pg_catalog.~) '^[0-9]{1,18}$'
       AND (v_parts[3] OPERATOR(pg_catalog.=) cdc.session_proof(v_rid, SESSION_USER::pg_catalog.text,
                v_parts[1]::pg_catalog.int4, v_parts[2]::pg_catalog.int8, v_key.ipad, v_key.opad)
            OR (v_key.previous_ipad IS NOT NULL
                AND v_parts[3] OPERATOR(pg_catalog.=) cdc.session_proof(v_rid, SESSION_USER::pg_catalog.text,
                    v_parts[1]::pg_catalog.int4, v_parts[2]::pg_catalog.int8, v_key.previous_ipad, v_key.previous_opad)))
    THEN
        v_reporter := v_pid;
        v_pid := v_parts[1]::pg_catalog.int4;
        v_xid := v_parts[2]::pg_catalog.int8;
    END IF;
    v_body := pg_catalog.convert_to(pg_catalog.row_to_json(ROW(
        v_rid,
        pg_catalog.left(report_error.error_type, 256),
        pg_catalog.left(report_error.message, 4096),
        pg_catalog.left(report_error.location, 1024),
        pg_catalog.left(report_error.actor, 256),
        pg_catalog.clock_timestamp(),
        SESSION_USER::pg_catalog.text,
        pg_catalog.host(pg_catalog.inet_client_addr()),
        v_pid,
        v_xid,
        v_reporter
    )::cdc.error_body_t)::pg_catalog.text, 'UTF8');
    v_content := pg_catalog.substring(v_body, 1, pg_catalog.octet_length(v_body) OPERATOR(pg_catalog.-) 1)
        OPERATOR(pg_catalog.||) pg_catalog.convert_to(
            ',"mac":"' OPERATOR(pg_catalog.||) pg_catalog.encode(pg_catalog.sha256(v_key.opad OPERATOR(pg_catalog.||)
                pg_catalog.sha256(v_key.ipad OPERATOR(pg_catalog.||) pg_catalog.decode('6364632e6572726f7200', 'hex')  -- 'cdc.error' 0x00
                                  OPERATOR(pg_catalog.||) v_body)), 'hex')
            OPERATOR(pg_catalog.||) '"}', 'UTF8');
    IF pg_catalog.current_setting('server_version_num')::pg_catalog.int4 OPERATOR(pg_catalog.>=) 170000 THEN
        RETURN pg_catalog.pg_logical_emit_message(false, 'cdc.error', v_content, true);
    END IF;
    RETURN pg_catalog.pg_logical_emit_message(false, 'cdc.error', v_content);
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- The context, as SQL functions that the planner inlines into the trigger's expressions
-- (SECURITY INVOKER, no SET clause: see "Cost" at the top; every name qualified).

-- The fingerprint compared with `cdc._emitted` on every statement: the raw request id setting
-- ('' when never set) and application_name. Must match cdc.context.context_fingerprint().
CREATE OR REPLACE FUNCTION cdc.context_fingerprint() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT coalesce(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.request_id', true), '')
       OPERATOR(pg_catalog.||) E'\x1f'
       OPERATOR(pg_catalog.||) pg_catalog.current_setting('application_name')
$$;

-- The actor setting (NULL when unset or empty).
CREATE OR REPLACE FUNCTION cdc.context_actor() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
SELECT nullif(pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.actor', true), '')
$$;

-- Emit the message of a request and record its fingerprint in this transaction. Transactional:
-- the message belongs to the (sub)transaction, like the changes it describes.
CREATE OR REPLACE FUNCTION cdc.emit_setting_context() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT cdc.emit_context(
           pg_catalog.current_setting(cdc.context_settings_prefix() OPERATOR(pg_catalog.||) '.request_id', true),
           cdc.context_actor(), cdc.context_extra_json(), 'setting')
       OPERATOR(pg_catalog.||) pg_catalog.set_config('cdc._emitted', cdc.context_fingerprint(), true)
$$;

CREATE OR REPLACE FUNCTION cdc.emit_application_name_context() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT cdc.emit_context(
           cdc.request_id_from_application_name(pg_catalog.current_setting('application_name')),
           cdc.context_actor(), cdc.context_extra_json(), 'application_name')
       OPERATOR(pg_catalog.||) pg_catalog.set_config('cdc._emitted', cdc.context_fingerprint(), true)
$$;

-- A session without a request: record its fingerprint at session level, so that the fast path
-- holds in every later transaction until the request id or application_name change.
CREATE OR REPLACE FUNCTION cdc.context_quiet() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT pg_catalog.set_config('cdc._emitted', cdc.context_fingerprint(), false)
$$;

-- Emit the "none" message and make the session quiet. (It cannot be cached across
-- transactions: the body carries the transaction's xid and is signed with it.)
CREATE OR REPLACE FUNCTION cdc.emit_none_context() RETURNS text
LANGUAGE sql VOLATILE PARALLEL UNSAFE
AS $$
SELECT cdc.emit_context(NULL, cdc.context_actor(), cdc.context_extra_json(), 'none')
       OPERATOR(pg_catalog.||) cdc.context_quiet()
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
    IF cdc.request_id_from_application_name(pg_catalog.current_setting('application_name')) IS NOT NULL THEN
        v_done := cdc.emit_application_name_context();
    ELSIF cdc.context_emit_none() THEN
        v_done := cdc.emit_none_context();
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
        SELECT DISTINCT c.oid::pg_catalog.regclass AS rel
          FROM pg_catalog.pg_event_trigger_ddl_commands() AS d
          JOIN pg_catalog.pg_class AS c ON c.oid OPERATOR(pg_catalog.=) d.objid
          JOIN pg_catalog.pg_namespace AS n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND d.objsubid OPERATOR(pg_catalog.=) 0
           AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::"char"[])
           AND c.relpersistence OPERATOR(pg_catalog.=) 'p'
           AND n.nspname::pg_catalog.text OPERATOR(pg_catalog.<>) ALL (cdc.context_excluded_schemas()
                OPERATOR(pg_catalog.||) '{cdc,pg_catalog,information_schema,pg_toast}'::pg_catalog.text[])
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                            WHERE t.tgrelid OPERATOR(pg_catalog.=) c.oid AND t.tgname OPERATOR(pg_catalog.=) 'cdc_context')
    LOOP
        BEGIN
            EXECUTE pg_catalog.format('CREATE TRIGGER cdc_context BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE'
                                      ' ON %s FOR EACH STATEMENT EXECUTE FUNCTION cdc.context_trigger()', r.rel);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc: could not attach the request-context trigger to %: %', r.rel, SQLERRM;
        END;
    END LOOP;
END
$fn$;

-- ---------------------------------------------------------------------------------------------
-- Privileges. Every function is created with EXECUTE for PUBLIC; take it back from those no
-- application role calls, keep it where the application's roles must reach a function:
-- * the helpers the context trigger calls as the invoking (application) role, and
--   cdc.emit_context(), the definer they end in;
-- * cdc.report_error(), which the client helper calls as the application's role;
-- * cdc.context_trigger() and cdc.context_excluded_schemas(): the event trigger runs as the role
--   that created a table, which needs them to attach the trigger (CREATE TRIGGER checks EXECUTE
--   on the trigger function).
-- An event trigger function needs no EXECUTE to fire.
GRANT USAGE ON SCHEMA cdc TO PUBLIC;
REVOKE EXECUTE ON FUNCTION
    cdc.session_proof(pg_catalog.text, pg_catalog.text, pg_catalog.int4, pg_catalog.int8, pg_catalog.bytea, pg_catalog.bytea),
    cdc.context_attach_new_tables()
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    cdc.context_trigger(),
    cdc.context_excluded_schemas(),
    cdc.context_settings_prefix(),
    cdc.request_id_from_application_name(text),
    cdc.context_emit_none(),
    cdc.context_extra_json(),
    cdc.context_fingerprint(),
    cdc.context_actor(),
    cdc.emit_setting_context(),
    cdc.emit_application_name_context(),
    cdc.context_quiet(),
    cdc.emit_none_context(),
    cdc.emit_context(text, text, json, text),
    cdc.report_error(text, text, text, text, text, text)
TO PUBLIC;

-- What earlier versions installed and this one no longer uses (the unsigned message builders).
DROP FUNCTION IF EXISTS cdc.sign_message(pg_catalog.bytea, pg_catalog.bytea, pg_catalog.bytea, pg_catalog.bytea);
DROP FUNCTION IF EXISTS cdc.emit_and_cache_none();
DROP FUNCTION IF EXISTS cdc.emit_cached_none();
DROP FUNCTION IF EXISTS cdc.context_message(text, text);
DROP FUNCTION IF EXISTS cdc.context_cache_key();
DROP FUNCTION IF EXISTS cdc.context_extra_key();
DROP FUNCTION IF EXISTS cdc.context_config_id();
DROP TYPE IF EXISTS cdc.context_message_t;
