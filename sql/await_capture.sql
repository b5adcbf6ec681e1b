-- Installed on the SOURCE by `cdc setup` (schema cdc). Used by the client helper on the
-- failure path of a request: before it rolls back, it waits (bounded) until the capture
-- daemon's walsender has decoded past the request's error message. PostgreSQL 16+ streams
-- a transaction's changes as they are decoded, but discards them instead if the
-- transaction has already aborted when the walsender reaches them; waiting makes a
-- failed request's attempted changes reliably visible as rolled-back mutations, and lets the
-- daemon show that it saw every one of them (docs/store.md, MAYBE_INCOMPLETE).
--
-- It never waits for nothing: it returns false at once
--   * on PostgreSQL 15 and older, which stream a transaction in progress only past
--     logical_decoding_work_mem (waiting would not make a small failed request visible);
--   * when no daemon streams from the slot (stopped, restarting);
--   * when it cannot see the walsender's position: pg_stat_replication shows sent_lsn only to
--     superusers and members of pg_read_all_stats (not even to the walsender's own role), so
--     the owner (the role that ran `cdc setup`) needs one of them: sql/grants.sql grants
--     pg_read_all_stats to the capture role, and `cdc setup` warns when it is missing.
-- Otherwise it waits until the walsender has sent past `target`, at most timeout_ms (capped
-- at 30 s; the client helper's bound is client.configure(capture_wait_ms=...), 2 s by default).
--
-- SECURITY DEFINER: reading a walsender's sent_lsn needs the privileges above; the function
-- reveals only a boolean. Its search_path is pinned with pg_temp explicitly LAST and every name
-- is qualified: left implicit, pg_temp is searched first, and a caller's temporary view named
-- pg_replication_slots or pg_stat_replication would run the caller's code with the owner's
-- rights. EXECUTE stays granted to PUBLIC: the client helper calls it as the application's role.
-- {slot} is replaced by setup with the slot name, quoted as a literal.

CREATE OR REPLACE FUNCTION cdc.capture_slot() RETURNS name
LANGUAGE sql IMMUTABLE AS $$ SELECT {slot}::pg_catalog.name $$;

CREATE OR REPLACE FUNCTION cdc.await_capture(target pg_lsn, timeout_ms integer DEFAULT 2000)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deadline pg_catalog.timestamptz := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(
        secs => LEAST(timeout_ms, 30000) OPERATOR(pg_catalog./) 1000.0);
    walsender pg_catalog.int4;
    sent pg_catalog.pg_lsn;
BEGIN
    IF timeout_ms OPERATOR(pg_catalog.<=) 0
       OR pg_catalog.current_setting('server_version_num')::pg_catalog.int4 OPERATOR(pg_catalog.<) 160000 THEN
        RETURN false;
    END IF;
    LOOP
        SELECT s.active_pid, r.sent_lsn INTO walsender, sent
          FROM pg_catalog.pg_replication_slots AS s
          LEFT JOIN pg_catalog.pg_stat_replication AS r ON r.pid OPERATOR(pg_catalog.=) s.active_pid
         WHERE s.slot_name OPERATOR(pg_catalog.=) cdc.capture_slot();
        IF walsender IS NULL OR sent IS NULL THEN
            RETURN false;          -- no daemon streaming, or its position cannot be seen
        END IF;
        IF sent OPERATOR(pg_catalog.>=) target THEN
            RETURN true;
        END IF;
        IF pg_catalog.clock_timestamp() OPERATOR(pg_catalog.>=) deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_catalog.pg_sleep(0.001);
    END LOOP;
END $$;

-- Whether cdc.await_capture() can see the walsender's position (what `cdc setup` checks).
CREATE OR REPLACE FUNCTION cdc.await_capture_can_see() RETURNS boolean
LANGUAGE sql STABLE AS $$
SELECT r.rolsuper OR pg_catalog.pg_has_role(r.oid, 'pg_read_all_stats', 'USAGE')
  FROM pg_catalog.pg_proc AS p JOIN pg_catalog.pg_roles AS r ON r.oid OPERATOR(pg_catalog.=) p.proowner
 WHERE p.oid OPERATOR(pg_catalog.=) 'cdc.await_capture(pg_catalog.pg_lsn, pg_catalog.int4)'::pg_catalog.regprocedure
$$;

REVOKE EXECUTE ON FUNCTION cdc.capture_slot(), cdc.await_capture_can_see() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cdc.await_capture(pg_lsn, integer) TO PUBLIC;
