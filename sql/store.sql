-- The history store. Applied by `cdc setup` inside the configured store schema
-- (search_path is set to it first), so names here are unqualified. Idempotent.
--
-- Ordering: every transaction has a `position`: its version (end LSN of the commit
-- record) when committed, or the LSN of its abort when it rolled back. Mutations are
-- ordered by (position, ordinal). A mutation's `version` is its transaction's
-- position when it is part of the committed state, NULL for a rolled-back attempt
-- (an aborted transaction or a rolled-back savepoint inside a committed one).

CREATE TABLE IF NOT EXISTS capture_state (
    slot_name        text PRIMARY KEY,
    source_system_id text,                 -- IDENTIFY_SYSTEM of the source: refuse another server
    source_database  text,
    acked_lsn        bigint NOT NULL DEFAULT 0,  -- every transaction with position <= this is stored
    baseline_lsn     bigint,               -- the slot's consistent point; version of SNAPSHOT rows
    baseline_done    boolean NOT NULL DEFAULT false,
    history_floor    bigint,               -- earliest version at which time travel is exact
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- What `cdc status` shows about the daemon (written by the active instance).
ALTER TABLE capture_state ADD COLUMN IF NOT EXISTS daemon_host text;
ALTER TABLE capture_state ADD COLUMN IF NOT EXISTS daemon_pid integer;
ALTER TABLE capture_state ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE capture_state ADD COLUMN IF NOT EXISTS last_error_at timestamptz;

-- Gaps: when a lost slot was re-created, changes between these positions were not captured.
CREATE TABLE IF NOT EXISTS gaps (
    slot_name        text NOT NULL,
    after_position   bigint NOT NULL,      -- last acknowledged position before the loss
    resumed_position bigint NOT NULL,      -- the new baseline
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, resumed_position)
);

-- Every schema version of every captured table, as announced by pgoutput Relation messages.
CREATE TABLE IF NOT EXISTS table_schemas (
    schema_id        serial PRIMARY KEY,
    table_name       text NOT NULL,        -- "schema.name"
    relation_oid     bigint NOT NULL,
    replica_identity text NOT NULL,        -- d n f i
    key_columns      text[] NOT NULL,      -- the columns that name a row (empty: whole row)
    columns          jsonb NOT NULL,       -- [{"name","type_oid","type_modifier","key"}...]
    fingerprint      text NOT NULL UNIQUE, -- hash of the above: one row per distinct schema
    first_position   bigint NOT NULL,
    first_seen_at    timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------------
-- Partitioning and retention (docs/retention.md).
--
-- `transactions` and `mutations` are partitioned by RANGE (committed_at), one partition per
-- retention.partition_interval (a day by default), named <table>_pYYYYMMDD[_HHMM[SS]]. The
-- daemon creates partitions ahead of time and for any past interval a batch needs
-- (cdc/store/retention.py: ensure_partitions); pruning drops whole partitions, never a DELETE
-- over a day of rows. A DEFAULT partition catches rows written before their partition exists
-- (writers other than the daemon, a partition that could not be created under a lock
-- timeout); ensure_partitions moves such rows into the partition it creates for them.
--
-- committed_at is part of every primary key (PostgreSQL requires the partition key in unique
-- constraints). It is deterministic for a committed transaction (its commit time from the
-- WAL), so a replayed mutation still collides on (position, ordinal, committed_at). A
-- rolled-back transaction carries its abort time on PG16+, else the daemon's clock when the
-- abort arrived: a replay of one may differ in committed_at, so the writer also checks
-- (position, ordinal) alone for rolled-back rows (cdc/store/writer.py).

-- One row: how partitions are cut, and where pruning left the store.
CREATE TABLE IF NOT EXISTS retention_state (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partition_interval interval NOT NULL DEFAULT '1 day',   -- for partitions created from now on
    horizon            timestamptz,      -- partitions below this were dropped
    last_prune_at      timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO retention_state DEFAULT VALUES ON CONFLICT DO NOTHING;

-- A store created before partitioning: its plain tables become the first (large) partition
-- of the partitioned ones below, without copying a row (their indexes are renamed away
-- first; the partitioned indexes then adopt them, and only the new primary key is built).
-- Run `cdc setup` with the daemon stopped: it locks both tables while it converts them.
DO $migrate$
DECLARE
    t text;
    idx record;
BEGIN
    FOREACH t IN ARRAY ARRAY['transactions', 'mutations'] LOOP
        IF EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = to_regclass(quote_ident(t)) AND c.relkind = 'r') THEN
            EXECUTE format('ALTER TABLE %I RENAME TO %I', t, t || '_legacy');
            -- its primary key lacks committed_at: the partitioned one replaces it
            EXECUTE format('ALTER TABLE %I DROP CONSTRAINT %I', t || '_legacy', t || '_pkey');
            FOR idx IN SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                       WHERE x.indrelid = to_regclass(quote_ident(t || '_legacy')) AND NOT x.indisprimary LOOP
                EXECUTE format('ALTER INDEX %I RENAME TO %I', idx.relname, left('legacy_' || idx.relname, 63));
            END LOOP;
        END IF;
    END LOOP;
END
$migrate$;

-- (CHECK constraints are named as PostgreSQL would name them: a migrated table attaches only
-- when its constraints carry the same names.)
CREATE TABLE IF NOT EXISTS transactions (
    position         bigint NOT NULL,
    xid              bigint NOT NULL,
    version          bigint,               -- = position when committed
    commit_lsn       bigint,               -- start of the commit record (pgoutput's commit_lsn)
    status           text NOT NULL
                     CONSTRAINT transactions_status_check CHECK (status IN ('committed', 'rolled_back')),
    committed_at     timestamptz NOT NULL, -- commit or abort time
    origin           text,
    mutation_count   integer NOT NULL DEFAULT 0,
    request_ids      text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (position, committed_at)
) PARTITION BY RANGE (committed_at);
CREATE INDEX IF NOT EXISTS transactions_committed_at ON transactions (committed_at);
CREATE INDEX IF NOT EXISTS transactions_xid ON transactions (xid);

CREATE TABLE IF NOT EXISTS mutations (
    position         bigint NOT NULL,
    ordinal          integer NOT NULL,     -- order inside the transaction
    version          bigint,               -- NULL for rolled-back attempts
    lsn              bigint NOT NULL,      -- WAL position of the change itself
    xid              bigint NOT NULL,      -- (sub)transaction that made the change
    committed_at     timestamptz NOT NULL,
    table_name       text NOT NULL,        -- "schema.name"
    op               text NOT NULL
                     CONSTRAINT mutations_op_check CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'SNAPSHOT')),
    key              jsonb,                -- {"col": value} naming the row; NULL for TRUNCATE
    old_key          jsonb,                -- the previous key when an UPDATE changed it
    before           jsonb,                -- row image before (NULL for INSERT/SNAPSHOT)
    after            jsonb,                -- row image after (NULL for DELETE)
    changed          text[],               -- columns whose value changed
    status           text NOT NULL
                     CONSTRAINT mutations_status_check CHECK (status IN ('committed', 'rolled_back')),
    request_id       text,
    context          jsonb,                -- application_name, actor, db_user, client_addr, backend_pid, extra
    schema_id        integer,
    actor            text,                 -- context actor, for per-actor order
    actor_seq        bigint,               -- monotonic per actor (a logical clock, gaps allowed)
    PRIMARY KEY (position, ordinal, committed_at)
) PARTITION BY RANGE (committed_at);
-- Indexes are declared on the parent: every partition gets its own copy. A lookup that does
-- not name a time (row at version, row history, request) seeks each partition's index once.
-- One index seek per partition for "row R of table T at version V" and for a row's history.
CREATE INDEX IF NOT EXISTS mutations_row ON mutations (table_name, key, position DESC, ordinal DESC);
-- A key-changing UPDATE is also part of the old key's history (its end).
CREATE INDEX IF NOT EXISTS mutations_old_row ON mutations (table_name, old_key, position DESC)
    WHERE old_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS mutations_truncate ON mutations (table_name, position DESC)
    WHERE op = 'TRUNCATE';
CREATE INDEX IF NOT EXISTS mutations_request ON mutations (request_id text_pattern_ops) WHERE request_id IS NOT NULL;
-- Partition bounds already skip whole days; inside a partition, commit times grow with
-- position, so a BRIN index (tiny, cheap to maintain) narrows windows shorter than a day.
CREATE INDEX IF NOT EXISTS mutations_committed_at ON mutations USING brin (committed_at);
CREATE INDEX IF NOT EXISTS mutations_table_position ON mutations (table_name, position);
CREATE INDEX IF NOT EXISTS mutations_actor ON mutations (actor, actor_seq) WHERE actor IS NOT NULL;

-- The pre-partitioning tables (see the migration above) become one partition each.
DO $attach$
DECLARE
    t text;
    lo timestamptz;
    hi timestamptz;
BEGIN
    FOREACH t IN ARRAY ARRAY['transactions', 'mutations'] LOOP
        CONTINUE WHEN to_regclass(quote_ident(t || '_legacy')) IS NULL
            OR EXISTS (SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(quote_ident(t || '_legacy')));
        EXECUTE format('SELECT min(committed_at), max(committed_at) FROM %I', t || '_legacy') INTO lo, hi;
        IF lo IS NULL THEN
            EXECUTE format('DROP TABLE %I', t || '_legacy');
            CONTINUE;
        END IF;
        lo := date_trunc('day', lo, 'UTC');
        hi := date_trunc('day', hi, 'UTC') + interval '1 day';
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (committed_at >= %L AND committed_at < %L)',
                       t || '_legacy', t || '_legacy_bound', lo, hi);
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                       t, t || '_legacy', lo, hi);
    END LOOP;
END
$attach$;

CREATE TABLE IF NOT EXISTS transactions_default PARTITION OF transactions DEFAULT;
CREATE TABLE IF NOT EXISTS mutations_default PARTITION OF mutations DEFAULT;

-- What pruning keeps beyond the partitions it drops (not partitioned, never dropped whole):
-- * keyframes (keyframe = true): the image, at the history floor, of each row that still
--   existed there and whose last change was in a dropped partition. op SNAPSHOT, position and
--   version = the floor, committed_at = the horizon, context {"keyframe": true}, request_id
--   NULL, ordinals from 1e9 up (after any real mutation at that position). A row has at most
--   one set of keyframes (N for N identical rows of a keyless table); the next prune that
--   removes a later change of the row replaces them.
-- * the mutations of tables whose retention (retention.tables) is longer than the default,
--   copied here unchanged from the partitions being dropped, until their own retention ends.
CREATE TABLE IF NOT EXISTS mutations_keep (
    LIKE mutations INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    keyframe         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (position, ordinal)
);
CREATE INDEX IF NOT EXISTS mutations_keep_row ON mutations_keep (table_name, key, position DESC, ordinal DESC);
CREATE INDEX IF NOT EXISTS mutations_keep_old_row ON mutations_keep (table_name, old_key, position DESC)
    WHERE old_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS mutations_keep_truncate ON mutations_keep (table_name, position DESC)
    WHERE op = 'TRUNCATE';
CREATE INDEX IF NOT EXISTS mutations_keep_request ON mutations_keep (request_id text_pattern_ops)
    WHERE request_id IS NOT NULL;
-- Kept rows (not keyframes) by table and time: their own retention, and which tables have any.
CREATE INDEX IF NOT EXISTS mutations_keep_table_time ON mutations_keep (table_name, committed_at) WHERE NOT keyframe;
CREATE INDEX IF NOT EXISTS mutations_keep_time ON mutations_keep (committed_at) WHERE NOT keyframe;
CREATE INDEX IF NOT EXISTS mutations_keep_actor ON mutations_keep (actor, actor_seq) WHERE actor IS NOT NULL;

-- Keyframes are computed ahead of a prune, outside its locked transaction ("staged"), and
-- written at the floor F the prune will move to: such a keyframe is *pending*, invisible to every
-- reader, until the prune's transaction moves capture_state.history_floor to F (the same commit
-- that drops the partitions it replaces). So a keyframe is visible only at or below the floor;
-- with no floor at all (never pruned) none is. The older keyframes the prune will delete when it
-- publishes the staged ones are listed here, and the staging's identity is
-- retention_state.staged (cdc/store/retention.py).
CREATE TABLE IF NOT EXISTS keyframes_retire (
    position         bigint NOT NULL,
    ordinal          integer NOT NULL,
    PRIMARY KEY (position, ordinal)
);
ALTER TABLE retention_state ADD COLUMN IF NOT EXISTS staged jsonb;

-- Every stored mutation: what readers (cdc/query.py) and the writer's before-image fill read.
-- A plain UNION ALL: the planner pushes each query's conditions into both sides and merges
-- their index scans. Pending keyframes (above the history floor, see keyframes_retire) are left
-- out by the outer WHERE: one InitPlan per query, a filter on mutations_keep's index scans only
-- (folded away on the partitions' side, where keyframe is the constant false). The condition is
-- outside the UNION ALL on purpose: a WHERE inside one of its branches would keep the planner
-- from flattening it (no merged index scans, every table read sorted whole).
CREATE OR REPLACE VIEW mutations_all AS
    SELECT position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, before, after,
           changed, status, request_id, context, schema_id, actor, actor_seq
    FROM (
        SELECT position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, before,
               after, changed, status, request_id, context, schema_id, actor, actor_seq, false AS keyframe
        FROM mutations
        UNION ALL
        SELECT position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, before,
               after, changed, status, request_id, context, schema_id, actor, actor_seq, keyframe
        FROM mutations_keep
    ) m
    WHERE NOT m.keyframe OR m.position <= (SELECT max(history_floor) FROM capture_state);

-- Each prune: what went, where the floor moved (cdc prune prints the same).
CREATE TABLE IF NOT EXISTS prunes (
    pruned_at        timestamptz NOT NULL DEFAULT clock_timestamp() PRIMARY KEY,
    horizon          timestamptz,          -- partitions below it were dropped
    floor            bigint,               -- the history floor after the prune
    partitions       text[] NOT NULL,      -- dropped partitions
    keyframes        bigint NOT NULL,      -- keyframes written
    kept_rows        bigint NOT NULL,      -- rows of longer-retention tables copied to mutations_keep
    removed_rows     bigint NOT NULL,      -- rows deleted outside the dropped partitions (see docs)
    seconds          double precision NOT NULL
);

-- `cdc erase`: that a row's images were removed, by whom and when. Never the row's data:
-- the key is kept only as a SHA-256 of its canonical JSON (docs/retention.md).
CREATE TABLE IF NOT EXISTS erasures (
    erasure_id       bigserial PRIMARY KEY,
    erased_at        timestamptz NOT NULL DEFAULT now(),
    actor            text NOT NULL,
    table_name       text NOT NULL,
    key_sha256       text NOT NULL,        -- hex SHA-256 of the canonical key JSON
    key_columns      text[] NOT NULL,      -- the names of the columns that name the row (no values)
    from_time        timestamptz,          -- --between: only images committed in [from, until)
    until_time       timestamptz,
    mutations_removed bigint NOT NULL,
    keyframes_removed bigint NOT NULL,
    source_check     text NOT NULL CHECK (source_check IN ('absent', 'live', 'unreachable', 'not_checked')),
    forced           boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS erasures_key ON erasures (table_name, key_sha256);
-- Every key the erased row had (followed through key-changing UPDATEs), as its SHA-256, with
-- the images removed under it: [{"key_sha256": hex, "removed": n}]. Counts only, never a key.
ALTER TABLE erasures ADD COLUMN IF NOT EXISTS keys jsonb;

CREATE TABLE IF NOT EXISTS actor_sequences (
    actor            text PRIMARY KEY,
    last_seq         bigint NOT NULL
);

-- Requests as records: outcome and reported error, filled from context and error messages.
CREATE TABLE IF NOT EXISTS requests (
    request_id       text PRIMARY KEY,
    actor            text,
    context          jsonb,
    first_seen_at    timestamptz NOT NULL,
    last_seen_at     timestamptz NOT NULL,
    committed_count  integer NOT NULL DEFAULT 0,   -- transactions committed
    rolled_back_count integer NOT NULL DEFAULT 0,  -- transactions (or savepoints) rolled back
    error_type       text,
    error_message    text,
    error_location   text,
    error_at         timestamptz
);
-- Attribution (docs/security.md). Who reported the error, as the source stamped it in the signed
-- cdc.error message (never as the application claimed it): the error is the request's own only
-- when one of the request's sessions, [db_user, backend_pid] pairs of its verified contexts
-- (`sessions`), reported it, or the reporter proved it is one (`error_proven`). NULL reporter:
-- recorded before messages were signed.
ALTER TABLE requests ADD COLUMN IF NOT EXISTS error_db_user text;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS error_backend_pid integer;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS error_client_addr text;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS error_xid bigint;
-- The reporter proved (with the session token cdc.emit_context() gave it) that it wrote a context
-- of this request: the error is the request's own even when none of its contexts was captured.
ALTER TABLE requests ADD COLUMN IF NOT EXISTS error_proven boolean NOT NULL DEFAULT false;
ALTER TABLE requests ADD COLUMN IF NOT EXISTS sessions jsonb NOT NULL DEFAULT '[]';
-- `cdc why 550e8400` names a request by a prefix of its id.
CREATE INDEX IF NOT EXISTS requests_id_prefix ON requests (request_id text_pattern_ops);
-- Pruning removes the records of requests last seen before the horizon.
CREATE INDEX IF NOT EXISTS requests_last_seen ON requests (last_seen_at);
CREATE INDEX IF NOT EXISTS table_schemas_table ON table_schemas (table_name, schema_id DESC);
