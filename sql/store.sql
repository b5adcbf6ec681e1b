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

CREATE TABLE IF NOT EXISTS transactions (
    position         bigint NOT NULL,
    xid              bigint NOT NULL,
    version          bigint,               -- = position when committed
    commit_lsn       bigint,               -- start of the commit record (pgoutput's commit_lsn)
    status           text NOT NULL CHECK (status IN ('committed', 'rolled_back')),
    committed_at     timestamptz NOT NULL, -- commit or abort time
    origin           text,
    mutation_count   integer NOT NULL DEFAULT 0,
    request_ids      text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (position)
);
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
    op               text NOT NULL CHECK (op IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'SNAPSHOT')),
    key              jsonb,                -- {"col": value} naming the row; NULL for TRUNCATE
    old_key          jsonb,                -- the previous key when an UPDATE changed it
    before           jsonb,                -- row image before (NULL for INSERT/SNAPSHOT)
    after            jsonb,                -- row image after (NULL for DELETE)
    changed          text[],               -- columns whose value changed
    status           text NOT NULL CHECK (status IN ('committed', 'rolled_back')),
    request_id       text,
    context          jsonb,                -- application_name, actor, db_user, client_addr, backend_pid, extra
    schema_id        integer,
    actor            text,                 -- context actor, for per-actor order
    actor_seq        bigint,               -- monotonic per actor (a logical clock, gaps allowed)
    PRIMARY KEY (position, ordinal)
);
-- One index seek for "row R of table T at version V" and for a row's history.
CREATE INDEX IF NOT EXISTS mutations_row ON mutations (table_name, key, position DESC, ordinal DESC);
-- A key-changing UPDATE is also part of the old key's history (its end).
CREATE INDEX IF NOT EXISTS mutations_old_row ON mutations (table_name, old_key, position DESC)
    WHERE old_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS mutations_truncate ON mutations (table_name, position DESC)
    WHERE op = 'TRUNCATE';
CREATE INDEX IF NOT EXISTS mutations_request ON mutations (request_id text_pattern_ops) WHERE request_id IS NOT NULL;
-- Commit times grow with position: a BRIN index is tiny and cheap to maintain.
CREATE INDEX IF NOT EXISTS mutations_committed_at ON mutations USING brin (committed_at);
CREATE INDEX IF NOT EXISTS mutations_table_position ON mutations (table_name, position);
CREATE INDEX IF NOT EXISTS mutations_actor ON mutations (actor, actor_seq) WHERE actor IS NOT NULL;

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
-- `cdc why 550e8400` names a request by a prefix of its id.
CREATE INDEX IF NOT EXISTS requests_id_prefix ON requests (request_id text_pattern_ops);
CREATE INDEX IF NOT EXISTS table_schemas_table ON table_schemas (table_name, schema_id DESC);
