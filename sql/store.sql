-- The history store, format 2 (docs/store.md is the reference: read it before changing this).
-- Applied by `cdc setup` inside the configured store schema (search_path is set to it first), so
-- names here are unqualified. Idempotent. A store of format 1 (the `mutations` table) is migrated
-- by `cdc setup` (cdc/store/migrate.py) before this file runs.
--
-- Ordering: every transaction has a `position`: its version (end LSN of the commit record) when
-- committed, the LSN of its abort when it rolled back. Changes are ordered by (position, ordinal).
-- Tables are known by identity (`tables`, one row per source relation), never by a dotted name;
-- rows by a 64-bit hash of their key (`key_hash`, computed here from `key_text`), rechecked on
-- read. Each change stores one image (the row after it; the key or the old row for a DELETE):
-- the before image and the changed columns are derived on read from the row's previous image.

CREATE TABLE IF NOT EXISTS store_meta (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    format_version   integer NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
INSERT INTO store_meta (format_version) VALUES (2)
    ON CONFLICT (singleton) DO UPDATE SET format_version = greatest(store_meta.format_version, 2), updated_at = now();

-- One row per slot: where capture stands. `acked_lsn` has one writer: the store writer, in the
-- same transaction as the batch it acknowledges (cdc/capture/ack.py documents the protocol).
CREATE TABLE IF NOT EXISTS capture_state (
    slot_name        text PRIMARY KEY,
    source_system_id text,                 -- IDENTIFY_SYSTEM of the source: refuse another server
    source_database  text,
    acked_lsn        bigint NOT NULL DEFAULT 0,  -- every transaction with position <= this is stored
    baseline_lsn     bigint,               -- the slot's consistent point; position of baseline SNAPSHOTs
    baseline_done    boolean NOT NULL DEFAULT false,
    history_floor    bigint,               -- earliest version at which time travel is exact
    daemon_host      text,                 -- the active daemon, for `cdc status`
    daemon_pid       integer,
    last_error       text,                 -- never row values (cdc.errors.error_text)
    last_error_at    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Gaps: changes between these positions were not captured (a lost slot re-created, a failover
-- to a server without the slot).
CREATE TABLE IF NOT EXISTS gaps (
    slot_name        text NOT NULL,
    after_position   bigint NOT NULL,      -- last acknowledged position before the loss
    resumed_position bigint NOT NULL,      -- where capture resumed (a new baseline)
    reason           text,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, resumed_position)
);

-- ---------------------------------------------------------------------------------------------
-- Table identity. A captured table is one source relation (its oid) for as long as it exists;
-- a table dropped and created again under the same name is a new table. Names are kept apart
-- (schema, name), exact as PostgreSQL stores them (no folding, no quoting), with the position
-- from which each name holds: the current name reads the table's whole history, an old name
-- the versions before the rename (docs/store.md "Naming a table").
CREATE TABLE IF NOT EXISTS tables (
    table_id         serial PRIMARY KEY,
    relation_oid     bigint NOT NULL,
    first_position   bigint NOT NULL,      -- first seen (a Relation message's LSN, or the baseline)
    dropped_position bigint,               -- dropped on the source (NULL: exists)
    created_at       timestamptz NOT NULL DEFAULT now()
);
-- At most one live table per relation oid (an oid is reused only after its table was dropped).
CREATE UNIQUE INDEX IF NOT EXISTS tables_live_oid ON tables (relation_oid) WHERE dropped_position IS NULL;

CREATE TABLE IF NOT EXISTS table_names (
    table_id         integer NOT NULL REFERENCES tables,
    schema_name      text NOT NULL,
    table_name       text NOT NULL,
    from_position    bigint NOT NULL,      -- the name holds from here until the next row's
    PRIMARY KEY (table_id, from_position)
);
CREATE INDEX IF NOT EXISTS table_names_name ON table_names (schema_name, table_name, from_position DESC);

-- Every schema version of every captured table, as announced by pgoutput Relation messages
-- (or read from the catalog for a baseline). One row per distinct shape.
CREATE TABLE IF NOT EXISTS table_schemas (
    schema_id        serial PRIMARY KEY,
    table_id         integer NOT NULL REFERENCES tables,
    replica_identity "char" NOT NULL,      -- d n f i
    key_columns      text[] NOT NULL,      -- the columns that name a row (empty: the whole row)
    columns          jsonb NOT NULL,       -- [{"name","type_oid","type_modifier","key","policy"?}...]
    fingerprint      text NOT NULL UNIQUE, -- hash of table_id and the above
    first_position   bigint NOT NULL,
    first_seen_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS table_schemas_table ON table_schemas (table_id, first_position DESC);

-- Schema changes (docs/ddl.md), from the source's `cdc.ddl` messages: one row per change of one
-- table. `(position, ordinal)`: the DDL transaction's version and the ordinal of its next change
-- (an image at an earlier (position, ordinal) is older than the DDL; rows the DDL rewrote are
-- SNAPSHOT changes from this ordinal on). `details`: what readers apply to older images
-- (`renamed` {old: new}, `added` {column: value existing rows got}, `dropped` [columns]), and
-- `name`, `renamed_from`, `retyped`, `rewritten`, `reset`, `inexact`, `created`, `detached`.
-- Written by the capture side only (cdc/capture/ddl.py), idempotent.
CREATE TABLE IF NOT EXISTS ddl_events (
    position         bigint NOT NULL,
    ordinal          integer NOT NULL,
    seq              integer NOT NULL,     -- order of the events at the same (position, ordinal)
    table_id         integer NOT NULL REFERENCES tables,
    command          text NOT NULL,        -- the command tag: ALTER TABLE, DROP TABLE, CREATE TABLE, ...
    details          jsonb NOT NULL,
    committed_at     timestamptz,
    request_id       text,
    context          text,                 -- the DDL session's context (JSON text)
    resolved_position bigint,              -- an inexact rewrite: the backfill that made history exact again
    PRIMARY KEY (position, ordinal, seq)
);
CREATE INDEX IF NOT EXISTS ddl_events_table ON ddl_events (table_id, position, ordinal);

-- ---------------------------------------------------------------------------------------------
-- Partitioning and retention (docs/retention.md): `transactions`, `context_changes` and
-- `changes` are partitioned by RANGE (committed_at), one partition per
-- retention.partition_interval (a day by default), named <table>_pYYYYMMDD[_HHMM[SS]]; the
-- writer creates them ahead (cdc/store/partitions.py), pruning drops whole partitions. A DEFAULT
-- partition catches rows written before their partition exists. committed_at is part of every
-- primary key (PostgreSQL requires the partition key in unique constraints); it is the commit
-- (or abort) time from the WAL, the same when a transaction is written again after a crash.

CREATE TABLE IF NOT EXISTS retention_state (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    partition_interval interval NOT NULL DEFAULT '1 day',   -- for partitions created from now on
    horizon            timestamptz,      -- partitions below this were dropped
    last_prune_at      timestamptz,
    staged             jsonb,            -- a keyframe staging's identity (cdc/store/retention.py)
    updated_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO retention_state DEFAULT VALUES ON CONFLICT DO NOTHING;

-- One row per transaction (committed or rolled back), with the request context in force at its
-- first change. A transaction whose context changes before a later change has one
-- `context_changes` row per change of context (docs/store.md "Context").
CREATE TABLE IF NOT EXISTS transactions (
    position         bigint NOT NULL,
    committed_at     timestamptz NOT NULL, -- commit or abort time
    xid              bigint NOT NULL,
    commit_lsn       bigint,               -- start of the commit record (pgoutput's commit_lsn)
    status           "char" NOT NULL CONSTRAINT transactions_status_check CHECK (status IN ('c', 'r')),
    flags            smallint NOT NULL DEFAULT 0,  -- docs/store.md "Transaction flags"
    origin           text,
    change_count     integer NOT NULL DEFAULT 0,
    request_id       text,
    actor            text,
    actor_seq        bigint,               -- the actor's sequence number of the first change
    context          text,                 -- the verified context document (JSON text)
    PRIMARY KEY (position, committed_at)
) PARTITION BY RANGE (committed_at);
CREATE INDEX IF NOT EXISTS transactions_committed_at ON transactions (committed_at);
CREATE INDEX IF NOT EXISTS transactions_request ON transactions (request_id text_pattern_ops)
    WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS transactions_actor ON transactions (actor, actor_seq) WHERE actor IS NOT NULL;

CREATE TABLE IF NOT EXISTS context_changes (
    position         bigint NOT NULL,
    committed_at     timestamptz NOT NULL,
    from_ordinal     integer NOT NULL,     -- the context holds for changes from this ordinal on
    request_id       text,
    actor            text,
    actor_seq        bigint,
    context          text,
    PRIMARY KEY (position, from_ordinal, committed_at)
) PARTITION BY RANGE (committed_at);
CREATE INDEX IF NOT EXISTS context_changes_request ON context_changes (request_id text_pattern_ops)
    WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS context_changes_actor ON context_changes (actor, actor_seq) WHERE actor IS NOT NULL;

-- One row per changed row (or per TRUNCATEd table). The writer sends every column but the two
-- generated hashes (docs/store.md "COPY format"). No index holds an unbounded value: the row
-- index holds the key's hash; readers compare key_text to rule out collisions.
CREATE TABLE IF NOT EXISTS changes (
    position         bigint NOT NULL,
    ordinal          integer NOT NULL,     -- order inside the transaction
    committed_at     timestamptz NOT NULL,
    table_id         integer NOT NULL,
    schema_id        integer,              -- the table's schema version the image follows
    op               "char" NOT NULL CONSTRAINT changes_op_check CHECK (op IN ('I', 'U', 'D', 'T', 'S')),
    flags            smallint NOT NULL DEFAULT 0,  -- docs/store.md "Change flags"
    lsn              bigint NOT NULL,      -- WAL position of the change itself
    xid              bigint,               -- subtransaction that made it, when not the top one
    key_text         text,                 -- canonical key: jsonb text of the array of key values
    image            text,                 -- JSON object: the row after (I U S), the key or old row (D)
    before           text,                 -- JSON object: the old row, only when the WAL sent it whole
    old_key_text     text,                 -- a key-changing UPDATE: the key the row had
    pending          text[],               -- columns sent unchanged (TOAST) the writer fills in
    key_hash         bigint GENERATED ALWAYS AS (hashtextextended(key_text COLLATE "C", 0)) STORED,
    old_key_hash     bigint GENERATED ALWAYS AS (hashtextextended(old_key_text COLLATE "C", 0)) STORED,
    PRIMARY KEY (position, ordinal, committed_at)
) PARTITION BY RANGE (committed_at);
-- Row R of table T at version V, and R's history: one seek per partition.
CREATE INDEX IF NOT EXISTS changes_row ON changes (table_id, key_hash, position DESC, ordinal DESC);
-- A key-changing UPDATE ends the old key's history (rare: a partial index).
CREATE INDEX IF NOT EXISTS changes_old_row ON changes (table_id, old_key_hash, position DESC)
    WHERE old_key_text IS NOT NULL;
CREATE INDEX IF NOT EXISTS changes_truncate ON changes (table_id, position DESC) WHERE op = 'T';

CREATE TABLE IF NOT EXISTS transactions_default PARTITION OF transactions DEFAULT;
CREATE TABLE IF NOT EXISTS context_changes_default PARTITION OF context_changes DEFAULT;
CREATE TABLE IF NOT EXISTS changes_default PARTITION OF changes DEFAULT;

-- Errors reported by requests (`cdc.error` messages whose MAC verified): never row values (the
-- client helper sends the primary message and SQLSTATE only). Who reported it is as the source
-- stamped it (cdc.report_error, never as the application claimed it). Attributed to the request on
-- read (docs/security.md "Request attribution") only when a verified context of that request came
-- from the same database user and backend, or the reporter proved with the session token that
-- cdc.emit_context() gave it that it is such a session (`reporter_pid` set). NULL db_user: recorded
-- before messages were signed (format 1).
CREATE TABLE IF NOT EXISTS request_errors (
    lsn              bigint PRIMARY KEY,   -- of the message
    request_id       text NOT NULL,
    reported_at      timestamptz NOT NULL,
    error_type       text,
    message          text,
    location         text,
    db_user          text,                 -- stamped by the source: session_user
    backend_pid      integer,              -- the session the error belongs to
    client_addr      text,
    xid              bigint,               -- that session's transaction (txid_current_if_assigned)
    reporter_pid     integer               -- proven by the session token: the reporting connection
);
-- (stores created before the session token was recorded)
ALTER TABLE request_errors ADD COLUMN IF NOT EXISTS reporter_pid integer;
CREATE INDEX IF NOT EXISTS request_errors_request ON request_errors (request_id text_pattern_ops);
CREATE INDEX IF NOT EXISTS request_errors_time ON request_errors (reported_at);

-- Per-actor logical clocks: the last sequence number handed out (gaps allowed).
CREATE TABLE IF NOT EXISTS actor_sequences (
    actor            text PRIMARY KEY,
    last_seq         bigint NOT NULL
);

-- ---------------------------------------------------------------------------------------------
-- What pruning keeps beyond the partitions it drops (not partitioned, never dropped whole):
-- * keyframes (flags bit 256): the image, at the history floor, of each row that still existed
--   there and whose last change was in a dropped partition. op 'S', position = the floor,
--   committed_at = the horizon, ordinals from 1e9 up;
-- * the changes of tables whose retention (retention.tables) is longer than the default, copied
--   unchanged from the partitions being dropped, until their own retention ends;
-- * the transactions those rows belong to (`transactions_keep`).
CREATE TABLE IF NOT EXISTS changes_keep (
    LIKE changes INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED,
    PRIMARY KEY (position, ordinal)
);
CREATE INDEX IF NOT EXISTS changes_keep_row ON changes_keep (table_id, key_hash, position DESC, ordinal DESC);
CREATE INDEX IF NOT EXISTS changes_keep_old_row ON changes_keep (table_id, old_key_hash, position DESC)
    WHERE old_key_text IS NOT NULL;
CREATE INDEX IF NOT EXISTS changes_keep_truncate ON changes_keep (table_id, position DESC) WHERE op = 'T';
CREATE INDEX IF NOT EXISTS changes_keep_table_time ON changes_keep (table_id, committed_at)
    WHERE flags & 256 = 0;

CREATE TABLE IF NOT EXISTS transactions_keep (
    LIKE transactions INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (position)
);
CREATE INDEX IF NOT EXISTS transactions_keep_request ON transactions_keep (request_id text_pattern_ops)
    WHERE request_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS context_changes_keep (
    LIKE context_changes INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    PRIMARY KEY (position, from_ordinal)
);

-- Keyframes are computed ahead of a prune ("staged") at the floor F the prune will move to; a
-- keyframe above the visible floor is pending and invisible to every reader. The older keyframes
-- the prune deletes when it publishes the staged ones are listed here.
CREATE TABLE IF NOT EXISTS keyframes_retire (
    position         bigint NOT NULL,
    ordinal          integer NOT NULL,
    PRIMARY KEY (position, ordinal)
);

-- Every stored change, what readers (cdc/query.py) and the writer's fill read. A plain UNION ALL
-- (the planner pushes each query's conditions into both sides and merges their index scans);
-- pending keyframes are left out by the outer WHERE, outside the UNION ALL on purpose.
CREATE OR REPLACE VIEW changes_all AS
    SELECT position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, image,
           before, old_key_text, pending, key_hash, old_key_hash
    FROM (
        SELECT position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, image,
               before, old_key_text, pending, key_hash, old_key_hash
        FROM changes
        UNION ALL
        SELECT position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, image,
               before, old_key_text, pending, key_hash, old_key_hash
        FROM changes_keep
    ) c
    WHERE c.flags & 256 = 0 OR c.position <= (SELECT max(history_floor) FROM capture_state);

CREATE OR REPLACE VIEW transactions_all AS
    SELECT * FROM transactions
    UNION ALL
    SELECT * FROM transactions_keep;

CREATE OR REPLACE VIEW context_changes_all AS
    SELECT * FROM context_changes
    UNION ALL
    SELECT * FROM context_changes_keep;

-- Each prune: what went, where the floor moved (cdc prune prints the same).
CREATE TABLE IF NOT EXISTS prunes (
    pruned_at        timestamptz NOT NULL DEFAULT clock_timestamp() PRIMARY KEY,
    horizon          timestamptz,
    floor            bigint,
    partitions       text[] NOT NULL,
    keyframes        bigint NOT NULL,
    kept_rows        bigint NOT NULL,
    removed_rows     bigint NOT NULL,
    seconds          double precision NOT NULL
);

-- `cdc erase`: that a row's images were removed, by whom and when. Never the row's data: the
-- keys are kept only as SHA-256 digests.
CREATE TABLE IF NOT EXISTS erasures (
    erasure_id       bigserial PRIMARY KEY,
    erased_at        timestamptz NOT NULL DEFAULT now(),
    actor            text NOT NULL,
    table_id         integer NOT NULL,
    key_sha256       text NOT NULL,        -- hex SHA-256 of the key_text named by the operator
    key_columns      text[] NOT NULL,
    earlier_keys     integer NOT NULL DEFAULT 0,   -- other keys the row had (followed through key changes)
    from_time        timestamptz,
    until_time       timestamptz,
    mutations_removed bigint NOT NULL,
    keyframes_removed bigint NOT NULL,
    source_check     text NOT NULL CHECK (source_check IN ('absent', 'live', 'unreachable', 'not_checked')),
    forced           boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS erasures_key ON erasures (table_id, key_sha256);

-- The source servers capture read from (cdc/capture/failover.py, docs/reliability.md "Source
-- failover"): a row when capture first streams from a server or timeline, and when it finds it
-- cannot resume there without losing changes (a gap) or with changes the server never had (a
-- fork). A gap or fork stops the daemon until `cdc setup --recreate-slot` resolves it: a new
-- baseline, a `gaps` row with this reason, and resolved_position set.
CREATE TABLE IF NOT EXISTS source_switches (
    switch_id          bigserial PRIMARY KEY,
    slot_name          text NOT NULL,
    switched_at        timestamptz NOT NULL DEFAULT now(),
    host               text NOT NULL,        -- host:port the daemon connected to
    timeline           integer NOT NULL,     -- its timeline (IDENTIFY_SYSTEM)
    previous_host      text,
    previous_timeline  integer,
    acked_lsn          bigint NOT NULL,      -- the store's acknowledged position then
    slot_confirmed_lsn bigint,               -- the slot's confirmed_flush_lsn there (NULL: no slot)
    slot_synced        boolean,              -- PostgreSQL 17+: synchronized from the old primary
    fork_lsn           bigint,               -- where the previous timeline ends in this server's history
    outcome            text NOT NULL CHECK (outcome IN ('first', 'resumed', 'gap', 'fork')),
    reason             text,
    resolved_position  bigint                -- a gap or fork: where capture started again
);
CREATE INDEX IF NOT EXISTS source_switches_slot ON source_switches (slot_name, switch_id);
-- ---------------------------------------------------------------------------------------------
-- Baselines and backfills (docs/baseline.md): the rows a table already had when its capture
-- began. `cdc setup` records every published table at the slot's consistent point (kind 'b');
-- a table that joins capture later is backfilled while the daemon runs (kind 'f': chunks read
-- between two watermark messages, written at the high watermark's position). Readers refuse to
-- answer for a table at a version before `complete_from` (NULL: at any version): its history is
-- incomplete there; `cdc status` lists the tables not 'done' and exits non-zero. A table with no
-- row here needs none (created while captured, or captured before baselines were recorded).
CREATE TABLE IF NOT EXISTS baselines (
    table_id         integer PRIMARY KEY REFERENCES tables,
    kind             "char" NOT NULL CONSTRAINT baselines_kind_check CHECK (kind IN ('b', 'f')),
    state            text NOT NULL CONSTRAINT baselines_state_check
                         CHECK (state IN ('pending', 'running', 'done', 'failed')),
    position         bigint,               -- 'b': the consistent point; 'f': the last chunk's high watermark
    complete_from    bigint,               -- the table's history is complete from this version on (NULL: not yet)
    rows             bigint NOT NULL DEFAULT 0,
    estimated_rows   bigint,               -- pg_class.reltuples when it started
    chunks_total     integer,              -- 'b': the ranges the table was split into; 'f': NULL
    chunks_done      integer NOT NULL DEFAULT 0,
    keyed            boolean,              -- 'f': chunked by key ranges (else one window over the table)
    resume_after     text,                 -- 'f': JSON array of the last chunk's last key (COPY text values)
    error            text,                 -- why it failed (never row values)
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A backfill chunk: read by `cdc backfill` between its low and high watermark messages, staged in
-- `backfill_rows`, moved into `changes` by the store writer in the transaction that acknowledges
-- the high watermark (minus the rows whose key a captured change touched between the watermarks).
CREATE TABLE IF NOT EXISTS backfill_chunks (
    chunk_id         bigserial PRIMARY KEY,
    table_id         integer NOT NULL REFERENCES tables,
    state            "char" NOT NULL CONSTRAINT backfill_chunks_state_check
                         CHECK (state IN ('r', 's', 'd', 'x')),  -- reading, staged, done, discarded (read again)
    range_after      text,                 -- JSON array of the key the chunk starts after (NULL: the start)
    range_last       text,                 -- JSON array of the chunk's last key (NULL: empty)
    last_chunk       boolean NOT NULL DEFAULT false,  -- the table ends with this chunk
    rows             bigint NOT NULL DEFAULT 0,      -- rows read
    kept             bigint,               -- rows written (the rest were newer in the stream)
    position         bigint,               -- the high watermark's position, once written
    reason           text,                 -- why it was discarded
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX IF NOT EXISTS backfill_chunks_table ON backfill_chunks (table_id, chunk_id DESC);

-- Staged rows of backfill chunks, in the `changes` COPY format (position = the chunk id,
-- ordinal = the row's number in the chunk). Not partitioned, no index but the key: rows live
-- here only between a chunk's read and its high watermark.
CREATE TABLE IF NOT EXISTS backfill_rows (
    position         bigint NOT NULL,
    ordinal          integer NOT NULL,
    committed_at     timestamptz NOT NULL,
    table_id         integer NOT NULL,
    schema_id        integer,
    op               "char" NOT NULL,
    flags            smallint NOT NULL DEFAULT 0,
    lsn              bigint NOT NULL,
    xid              bigint,
    key_text         text,
    image            text,
    before           text,
    old_key_text     text,
    pending          text[],
    PRIMARY KEY (position, ordinal)
);

-- Publications the daemon streams from (besides source.publication): `usable_from` is the WAL
-- position from which the slot can decode with it (0: it existed before the slot); the daemon
-- adds it once the slot's restart_lsn has passed that point (docs/baseline.md "Keyless tables").
CREATE TABLE IF NOT EXISTS capture_publications (
    slot_name        text NOT NULL,
    publication      text NOT NULL,
    usable_from      bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot_name, publication)
);
