-- Installed on the SOURCE by `cdc setup` (schema cdc). Used by the client helper on the
-- failure path of a request: before it rolls back, it waits (bounded) until the capture
-- daemon's walsender has decoded past the request's error message. PostgreSQL 16+ streams
-- a transaction's changes as they are decoded, but discards them instead if the
-- transaction has already aborted when the walsender reaches them; waiting makes a
-- failed request's attempted changes reliably visible as rolled-back mutations.
--
-- SECURITY DEFINER: reading a walsender's sent_lsn needs the walsender's role (the one
-- that ran setup) or pg_read_all_stats; the function reveals only a boolean. Its search_path
-- is pinned with pg_temp explicitly LAST and every name is qualified: left implicit, pg_temp is
-- searched first, and a caller's temporary view named pg_replication_slots or
-- pg_stat_replication would run the caller's code with the owner's rights.
-- EXECUTE stays granted to PUBLIC: the client helper calls it as the application's role.
-- {slot} is replaced by setup with the slot name, quoted as a literal.

CREATE OR REPLACE FUNCTION cdc.capture_slot() RETURNS name
LANGUAGE sql IMMUTABLE AS $$ SELECT {slot}::pg_catalog.name $$;

CREATE OR REPLACE FUNCTION cdc.await_capture(target pg_lsn, timeout_ms integer DEFAULT 2000)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    deadline pg_catalog.timestamptz := pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) pg_catalog.make_interval(
        secs => LEAST(timeout_ms, 30000) OPERATOR(pg_catalog./) 1000.0);
    sent pg_catalog.pg_lsn;
BEGIN
    LOOP
        SELECT r.sent_lsn INTO sent
          FROM pg_catalog.pg_replication_slots AS s
          JOIN pg_catalog.pg_stat_replication AS r ON r.pid OPERATOR(pg_catalog.=) s.active_pid
         WHERE s.slot_name OPERATOR(pg_catalog.=) cdc.capture_slot();
        IF NOT FOUND THEN
            RETURN false;          -- no daemon streaming: nothing to wait for
        END IF;
        IF sent IS NOT NULL AND sent OPERATOR(pg_catalog.>=) target THEN
            RETURN true;
        END IF;
        IF pg_catalog.clock_timestamp() OPERATOR(pg_catalog.>=) deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_catalog.pg_sleep(0.002);
    END LOOP;
END $$;

REVOKE EXECUTE ON FUNCTION cdc.capture_slot() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cdc.await_capture(pg_lsn, integer) TO PUBLIC;
