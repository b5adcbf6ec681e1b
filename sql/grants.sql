-- cdc: least-privilege roles, for the SOURCE database and for the history STORE database.
--
-- Run by an administrator (a superuser, or a role with CREATEROLE that owns the objects
-- involved), once on each side, choosing the side with the setting `cdc_grants.side`. The
-- file is plain SQL (no psql meta-commands): every parameter is a session setting read with
-- current_setting(), so it runs the same from psql, a migration tool or a driver.
--
--   # SOURCE (the captured application database)
--   PGOPTIONS="-c cdc_grants.side=source -c cdc_grants.tables=public.orders,public.users" \
--     psql -v ON_ERROR_STOP=1 -d appdb -f sql/grants.sql
--
--   # STORE (the database holding the history)
--   PGOPTIONS="-c cdc_grants.side=store -c cdc_grants.schema=cdc_history" \
--     psql -v ON_ERROR_STOP=1 -d historydb -f sql/grants.sql
--
-- or, in one session:  SET cdc_grants.side = 'store'; then the contents of this file.
--
-- Settings (all optional except side):
--   cdc_grants.side            'source' or 'store'
--   cdc_grants.capture_role    source: the role `cdc setup` and `cdc run` use   (cdc_capture)
--   cdc_grants.tables          source: the captured tables, schema-qualified, comma-separated
--   cdc_grants.read_all_stats  source: on (default) / off: grant pg_read_all_stats (see below)
--   cdc_grants.table_owner     source: the role owning those tables; cdc_capture becomes a member
--                              (needed only when `cdc setup` creates the publication itself,
--                              i.e. with `source.tables` configured: see below)
--   cdc_grants.publication     source: create this publication FOR TABLE <tables> now, as the
--                              administrator (the least-privilege way; `source.tables` then
--                              stays empty in the cdc configuration)
--   cdc_grants.schema          store: the history schema                        (cdc_history)
--   cdc_grants.writer_role     store: the daemon's role, owner of the schema    (cdc_writer)
--   cdc_grants.reader_role     store: CLI / API / page, read-only               (cdc_reader)
--
-- Roles are created with LOGIN and no password: set one afterwards (`\password cdc_capture`
-- in psql, or ALTER ROLE ... PASSWORD) and allow them in pg_hba.conf (cdc_capture needs a
-- `replication` line too: `host replication cdc_capture 10.0.0.0/8 scram-sha-256`).
-- Running the file again is harmless: it creates what is missing and grants again.
--
-- ============================================================================ SOURCE
--
-- What capture needs, and why (checked on PostgreSQL 15 and 18):
--   REPLICATION, LOGIN        the replication connection: CREATE_REPLICATION_SLOT and
--                             START_REPLICATION (pgoutput); pg_replication_slots is readable by all.
--   CONNECT, CREATE on the database
--                             CREATE SCHEMA cdc (the context trigger's functions) and
--                             CREATE PUBLICATION.
--   SELECT on each table      the baseline: `cdc setup` copies the rows present at the slot's
--                             snapshot.
--   TRIGGER on each table     the statement-level context trigger `cdc_context`.
--   USAGE on their schemas    to name them.
--   pg_read_all_stats         the walsender's position (pg_stat_replication.sent_lsn), which
--                             cdc.await_capture() reads: a failed request made through the client
--                             helper waits (bounded) until capture has decoded its attempted
--                             changes, before it rolls back (PostgreSQL 16+ drops the changes of a
--                             transaction it finds aborted). PostgreSQL shows sent_lsn only to
--                             superusers and pg_read_all_stats, not even to the walsender's own
--                             role; without it the wait returns at once (no stall) but those
--                             changes may be missing from the history. What else it shows: every
--                             session's activity and query text, and the statistics views; the
--                             capture role reads every row of the database through REPLICATION
--                             already. (On PostgreSQL 16+ an administrator without SUPERUSER needs
--                             ADMIN OPTION on pg_read_all_stats to grant it. Set
--                             cdc_grants.read_all_stats=off to leave it out.)
-- The publication:
--   FOR ALL TABLES (the default when source.tables is empty and no publication exists) and
--   FOR TABLES IN SCHEMA both need a SUPERUSER, on 15 as on 18 ("must be superuser to create
--   FOR ALL TABLES publication"). Without one, either
--   (a) least privilege: the administrator creates the publication FOR TABLE ... once
--       (cdc_grants.publication below does it) and cdc runs with source.tables empty: `cdc
--       setup` then uses the existing publication as it is; adding a table later is the
--       administrator's ALTER PUBLICATION ... ADD TABLE; or
--   (b) `cdc setup` with source.tables: it runs CREATE/ALTER PUBLICATION ... FOR TABLE, which
--       PostgreSQL allows only to the tables' OWNER ("must be owner of table"): make
--       cdc_capture a member of the owning role (cdc_grants.table_owner). Note that this lets
--       cdc_capture do whatever the owner may do on those tables.
-- Not granted, not needed: superuser, BYPASSRLS, write privileges on application tables.
-- Tables created later are not captured until added to the publication and given the trigger
-- (`cdc setup` again); only a superuser's `cdc setup` installs the event trigger that attaches it
-- automatically.

DO $grants$
DECLARE
    side    text := coalesce(nullif(current_setting('cdc_grants.side', true), ''), 'unset');
    capture text := coalesce(nullif(current_setting('cdc_grants.capture_role', true), ''), 'cdc_capture');
    tables  text := coalesce(current_setting('cdc_grants.tables', true), '');
    owner   text := nullif(current_setting('cdc_grants.table_owner', true), '');
    pub     text := nullif(current_setting('cdc_grants.publication', true), '');
    stats   text := lower(coalesce(nullif(current_setting('cdc_grants.read_all_stats', true), ''), 'on'));
    item    text;
    rel     regclass;
    targets text := '';
BEGIN
    IF side NOT IN ('source', 'store') THEN
        RAISE EXCEPTION 'set cdc_grants.side to ''source'' or ''store'' before running grants.sql (got %)', side
            USING HINT = 'PGOPTIONS="-c cdc_grants.side=source" psql -f sql/grants.sql';
    END IF;
    IF side <> 'source' THEN
        RETURN;
    END IF;

    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = capture) THEN
        EXECUTE format('CREATE ROLE %I LOGIN REPLICATION', capture);
    ELSE
        EXECUTE format('ALTER ROLE %I LOGIN REPLICATION', capture);
    END IF;
    EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO %I', current_database(), capture);
    IF stats NOT IN ('on', 'off', 'true', 'false') THEN
        RAISE EXCEPTION 'cdc_grants.read_all_stats must be on or off (got %)', stats;
    END IF;
    IF stats IN ('on', 'true') THEN
        EXECUTE format('GRANT pg_read_all_stats TO %I', capture);
    END IF;

    FOREACH item IN ARRAY string_to_array(tables, ',') LOOP
        item := btrim(item);
        CONTINUE WHEN item = '';
        rel := item::regclass;  -- fails clearly on a missing table
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I',
                       (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                        WHERE c.oid = rel), capture);
        EXECUTE format('GRANT SELECT, TRIGGER ON TABLE %s TO %I', rel, capture);
        targets := targets || CASE WHEN targets = '' THEN '' ELSE ', ' END || rel::text;
    END LOOP;

    IF owner IS NOT NULL THEN
        EXECUTE format('GRANT %I TO %I', owner, capture);
    END IF;

    IF pub IS NOT NULL THEN
        IF targets = '' THEN
            RAISE EXCEPTION 'cdc_grants.publication needs cdc_grants.tables (the tables to publish)';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = pub) THEN
            EXECUTE format('CREATE PUBLICATION %I FOR TABLE %s', pub, targets);
        END IF;
    END IF;
END
$grants$;

-- ============================================================================ STORE
--
--   cdc_writer   the daemon (`cdc run`), `cdc setup` (store side), `cdc prune`, `cdc erase`:
--                OWNS the history schema and everything in it, so partitions it creates
--                later are its own; CREATE on the database because `cdc setup` runs
--                CREATE SCHEMA IF NOT EXISTS, which PostgreSQL checks even when the schema exists.
--   cdc_reader   `cdc state`, `cdc why`, `cdc status`, `cdc serve` (API, page), the Python
--                History API: USAGE on the schema, SELECT on its tables, and DEFAULT
--                PRIVILEGES so that every table the writer creates later (new partitions of
--                mutations and transactions) is readable too without running this again.
--                No INSERT, UPDATE, DELETE, TRUNCATE: every write attempt fails with
--                insufficient_privilege (SQLSTATE 42501).
-- Selecting through a partitioned table needs the privilege on the parent only; the default
-- privileges also cover reading a partition directly.

DO $grants$
DECLARE
    side   text := coalesce(nullif(current_setting('cdc_grants.side', true), ''), 'unset');
    schema text := coalesce(nullif(current_setting('cdc_grants.schema', true), ''), 'cdc_history');
    writer text := coalesce(nullif(current_setting('cdc_grants.writer_role', true), ''), 'cdc_writer');
    reader text := coalesce(nullif(current_setting('cdc_grants.reader_role', true), ''), 'cdc_reader');
    obj    record;
BEGIN
    IF side <> 'store' THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = writer) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', writer);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = reader) THEN
        EXECUTE format('CREATE ROLE %I LOGIN', reader);
    END IF;
    EXECUTE format('GRANT CONNECT, CREATE ON DATABASE %I TO %I', current_database(), writer);
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), reader);

    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = schema) THEN
        EXECUTE format('CREATE SCHEMA %I AUTHORIZATION %I', schema, writer);
    ELSE
        EXECUTE format('ALTER SCHEMA %I OWNER TO %I', schema, writer);
        -- A history created earlier by another role (e.g. a superuser's `cdc setup`): hand it over.
        FOR obj IN
            SELECT c.oid::regclass AS name, c.relkind FROM pg_class c
            WHERE c.relnamespace = schema::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
              -- serial and identity sequences follow their table (partitions do not: listed)
              AND (c.relkind <> 'S' OR NOT EXISTS (SELECT 1 FROM pg_depend d
                   WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
        LOOP
            EXECUTE format('ALTER %s %s OWNER TO %I',
                           CASE obj.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                                WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                                ELSE 'TABLE' END,
                           obj.name, writer);
        END LOOP;
        FOR obj IN
            SELECT p.oid::regprocedure AS name, p.prokind FROM pg_proc p
            WHERE p.pronamespace = schema::regnamespace
        LOOP
            EXECUTE format('ALTER %s %s OWNER TO %I',
                           CASE obj.prokind WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END, obj.name, writer);
        END LOOP;
    END IF;
    EXECUTE format('REVOKE ALL ON SCHEMA %I FROM PUBLIC', schema);

    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', schema, reader);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA %I TO %I', schema, reader);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT SELECT ON TABLES TO %I',
                   writer, schema, reader);
    -- Nothing else for the reader: make sure no earlier grant left it a write privilege.
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN SCHEMA %I '
                   'FROM %I', schema, reader);
END
$grants$;
