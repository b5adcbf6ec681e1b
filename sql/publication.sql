-- cdc: keeping the publications right on the SOURCE database (docs/baseline.md "Keyless tables").
--
-- Installed (and updated) by `cdc setup` through cdc/publications.py; idempotent. PostgreSQL
-- refuses an UPDATE or DELETE on a table that a publication publishes for UPDATE/DELETE when the
-- table has no replica identity (no primary key, no REPLICA IDENTITY FULL or USING INDEX): cdc
-- must never make the application's writes fail. `cdc.publication_sync_config` says, per
-- publication cdc streams from, what to do with such tables (source.keyless_tables):
--   full          REPLICA IDENTITY FULL is set on them (the operator chose it);
--   inserts_only  they go to the second publication (`<publication>_inserts`, publish = 'insert,
--                 truncate') and never to the first;
--   skip          they are in neither.
-- When cdc manages the first publication as a list of every table (`managed`: source.tables
-- empty), tables created later join it here too. The event trigger `cdc_a_publication_sync`
-- (ddl_command_end of CREATE TABLE, CREATE TABLE AS, SELECT INTO, ALTER TABLE; installed only by
-- a superuser's `cdc setup`) does it inside the DDL's own transaction, so no write to a new table
-- (or to one whose key was just dropped) can ever fail for want of a replica identity. It never
-- fails the DDL: a problem is a WARNING (and the daemon's periodic check reports and repairs it).
-- The configuration is a function (`cdc.publication_sync_config()`), its body written by setup.

CREATE SCHEMA IF NOT EXISTS cdc;

-- The configuration: `cdc setup` replaces this function's body with one row per publication cdc
-- streams from on this database (a function, not a table: a FOR ALL TABLES publication would
-- publish a table in schema cdc too). Nothing secret: `cdc status` reads it.
CREATE OR REPLACE FUNCTION cdc.publication_sync_config(
    OUT publication text,          -- source.publication
    OUT inserts_publication text,  -- its keyless tables' INSERTs and TRUNCATEs
    OUT keyless text,              -- full | inserts_only | skip
    OUT managed boolean,           -- the publication is cdc's list of every table
    OUT excluded_schemas text[])   -- never published (the store's, when it shares the database)
RETURNS SETOF record
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $fn$ SELECT NULL::text, NULL::text, NULL::text, NULL::boolean, NULL::text[] WHERE false $fn$;

-- Whether UPDATE and DELETE on the table can be published: it has a replica identity.
CREATE OR REPLACE FUNCTION cdc.has_replica_identity(p_rel oid) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $fn$
    SELECT CASE c.relreplident
             WHEN 'f' THEN true
             WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
                                    WHERE i.indrelid = c.oid AND i.indisprimary)
             WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
                                    WHERE i.indrelid = c.oid AND i.indisreplident)
             ELSE false
           END
      FROM pg_catalog.pg_class AS c
     WHERE c.oid = p_rel
$fn$;

-- Make the table a member of the (list) publication, or not; a FOR ALL TABLES publication, or
-- one that does not exist, is left alone.
CREATE OR REPLACE FUNCTION cdc.publication_member(p_publication text, p_rel oid, p_member boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_pub pg_catalog.pg_publication%ROWTYPE;
    v_is boolean;
BEGIN
    SELECT * INTO v_pub FROM pg_catalog.pg_publication AS p WHERE p.pubname = p_publication;
    IF NOT FOUND OR v_pub.puballtables THEN
        RETURN;
    END IF;
    v_is := EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel AS r
                     WHERE r.prpubid = v_pub.oid AND r.prrelid = p_rel);
    IF p_member AND NOT v_is THEN
        EXECUTE pg_catalog.format('ALTER PUBLICATION %I ADD TABLE %s', p_publication, p_rel::pg_catalog.regclass);
    ELSIF v_is AND NOT p_member THEN
        EXECUTE pg_catalog.format('ALTER PUBLICATION %I DROP TABLE %s', p_publication, p_rel::pg_catalog.regclass);
    END IF;
END
$fn$;

-- One table, by every configuration: identity first (full), then the memberships (managed).
CREATE OR REPLACE FUNCTION cdc.publication_sync_table(p_rel oid) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_cfg record;
    v_keyed boolean;
    v_partition boolean;
    v_schema text;
BEGIN
    SELECT c.relispartition, n.nspname INTO v_partition, v_schema
      FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace
     WHERE c.oid = p_rel AND c.relkind IN ('r', 'p') AND c.relpersistence = 'p';
    IF NOT FOUND OR v_schema = ANY (ARRAY['cdc', 'pg_catalog', 'information_schema', 'pg_toast']) THEN
        RETURN;
    END IF;
    FOR v_cfg IN SELECT * FROM cdc.publication_sync_config() AS s WHERE v_schema <> ALL (s.excluded_schemas) LOOP
        v_keyed := cdc.has_replica_identity(p_rel);
        IF NOT v_keyed AND v_cfg.keyless = 'full' THEN
            EXECUTE pg_catalog.format('ALTER TABLE %s REPLICA IDENTITY FULL', p_rel::pg_catalog.regclass);
            v_keyed := true;
        END IF;
        IF v_cfg.managed AND NOT v_partition THEN
            -- Leave the publication that would publish UPDATE/DELETE without an identity first.
            PERFORM cdc.publication_member(v_cfg.inserts_publication, p_rel,
                                           NOT v_keyed AND v_cfg.keyless = 'inserts_only');
            PERFORM cdc.publication_member(v_cfg.publication, p_rel, v_keyed);
        ELSIF NOT v_keyed AND NOT v_partition AND v_cfg.keyless = 'inserts_only' THEN
            -- A list cdc does not manage (source.tables): a member that lost its key moves over.
            IF EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel AS r
                         JOIN pg_catalog.pg_publication AS p ON p.oid = r.prpubid
                        WHERE p.pubname = v_cfg.publication AND r.prrelid = p_rel) THEN
                PERFORM cdc.publication_member(v_cfg.publication, p_rel, false);
                PERFORM cdc.publication_member(v_cfg.inserts_publication, p_rel, true);
            END IF;
        ELSIF NOT v_keyed AND NOT v_partition AND v_cfg.keyless = 'skip' THEN
            PERFORM cdc.publication_member(v_cfg.publication, p_rel, false);
        END IF;
    END LOOP;
END
$fn$;

CREATE OR REPLACE FUNCTION cdc.publication_sync() RETURNS event_trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT d.objid
          FROM pg_catalog.pg_event_trigger_ddl_commands() AS d
         WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objsubid = 0
        UNION
        -- DETACH PARTITION names the parent only: a detached partition is a table of its own
        -- now, in no publication yet. Any table in none, when a partitioned table was altered.
        SELECT c.oid
          FROM pg_catalog.pg_class AS c
         WHERE c.relkind = 'r' AND NOT c.relispartition AND c.relpersistence = 'p'
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel AS pr WHERE pr.prrelid = c.oid)
           AND EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() AS d
                         JOIN pg_catalog.pg_class AS p ON p.oid = d.objid
                        WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND p.relkind = 'p')
    LOOP
        BEGIN
            PERFORM cdc.publication_sync_table(r.objid);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc: could not keep the publications right for %: %',
                r.objid::pg_catalog.regclass, SQLERRM;
        END;
    END LOOP;
END
$fn$;
REVOKE ALL ON FUNCTION cdc.publication_sync() FROM PUBLIC;
-- publication_sync_config() and has_replica_identity() stay executable by PUBLIC: they say what
-- is published and whether a table has an identity (nothing secret), and the daemon's periodic
-- check and `cdc status` read them as whatever role they run as.
REVOKE ALL ON FUNCTION cdc.publication_sync_table(oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc.publication_member(text, oid, boolean) FROM PUBLIC;
