-- Installed on the SOURCE by `cdc setup` (schema cdc). Used by the client helper on the
-- failure path of a request: before it rolls back, it waits (bounded) until the capture
-- daemon's walsender has decoded past the request's error message. PostgreSQL 16+ streams
-- a transaction's changes as they are decoded, but discards them instead if the
-- transaction has already aborted when the walsender reaches them; waiting makes a
-- failed request's attempted changes reliably visible as rolled-back mutations.
--
-- SECURITY DEFINER: reading a walsender's sent_lsn needs the walsender's role (the one
-- that ran setup) or pg_read_all_stats; the function reveals only a boolean.
-- {slot} is replaced by setup with the slot name, quoted as a literal.

CREATE OR REPLACE FUNCTION cdc.capture_slot() RETURNS name
LANGUAGE sql IMMUTABLE AS $$ SELECT {slot}::name $$;

CREATE OR REPLACE FUNCTION cdc.await_capture(target pg_lsn, timeout_ms integer DEFAULT 2000)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => least(timeout_ms, 30000) / 1000.0);
    sent pg_lsn;
BEGIN
    LOOP
        SELECT r.sent_lsn INTO sent
          FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid
         WHERE s.slot_name = cdc.capture_slot();
        IF NOT FOUND THEN
            RETURN false;          -- no daemon streaming: nothing to wait for
        END IF;
        IF sent IS NOT NULL AND sent >= target THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.002);
    END LOOP;
END $$;
