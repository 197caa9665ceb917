-- The durable ledger: an append-only journal of every event the hot ledger (Redis) committed,
-- and projections of it (accounts, cards, lots, transactions) kept in the same transaction as
-- the journal rows, so reconcile and rehydrate read a state that is exactly "journal up to
-- accounts.last_seq".

CREATE TABLE accounts (
    account_id  text PRIMARY KEY,
    shard       integer NOT NULL,
    card_number text,
    -- Sequence of the last applied event: the journal holds 1..last_seq, gap-free.
    last_seq    bigint NOT NULL CHECK (last_seq > 0),
    opened_at   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cards (
    card_number text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts,
    linked_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cards_account ON cards (account_id);

-- Unheld points per lot, as in the Redis account hash: a lot at zero is removed (and may be
-- recreated with the same id by a later refund or release).
CREATE TABLE lots (
    account_id text NOT NULL REFERENCES accounts,
    lot_id     bigint NOT NULL,
    points     bigint NOT NULL CHECK (points > 0),
    expire_ms  bigint NOT NULL,
    kind       char(1) NOT NULL CHECK (kind IN ('R', 'L')),
    issuer_id  text NOT NULL,
    PRIMARY KEY (account_id, lot_id)
);

-- Transaction records (the Redis `x` hash): what holds, captures and refunds need. Kept for
-- good here; rehydrate restores open holds and those within the refund window.
CREATE TABLE transactions (
    account_id  text NOT NULL REFERENCES accounts,
    seq         bigint NOT NULL,
    type        text NOT NULL CHECK (type IN ('EARN', 'GRANT', 'HOLD', 'CAPTURE', 'REDEMPTION', 'REFUND')),
    time_ms     bigint NOT NULL,
    points      bigint NOT NULL,
    refunded    bigint NOT NULL DEFAULT 0,
    available   bigint NOT NULL,
    held        bigint NOT NULL,
    pos         jsonb,
    lots        jsonb NOT NULL,
    alloc       jsonb,
    ref_seq     bigint,
    state       text,
    expire_ms   bigint,
    captured    bigint,
    released    bigint,
    capture_seq bigint,
    amount      bigint,
    PRIMARY KEY (account_id, seq)
);
CREATE INDEX transactions_open_holds ON transactions (account_id, seq) WHERE type = 'HOLD' AND state = 'HELD';

CREATE VIEW holds AS
SELECT account_id, seq AS hold_seq, points, expire_ms, state, captured, released, capture_seq, pos, alloc
FROM transactions
WHERE type = 'HOLD';

-- One row per event, never updated. Partitioned by the event's time (monthly, created ahead by
-- journal_create_partitions); the primary key must contain the partition key, and an event's
-- time never changes, so (account_id, seq, event_time) is as unique as the event id.
CREATE TABLE journal (
    event_id       text NOT NULL CHECK (event_id = account_id || '.' || seq),
    account_id     text NOT NULL,
    seq            bigint NOT NULL CHECK (seq > 0),
    type           text NOT NULL,
    points         bigint NOT NULL,
    lots           jsonb NOT NULL,
    issuer_id      text,
    company_id     text,
    store_id       text,
    terminal_id    text,
    channel        smallint,
    request_id     text,
    event_time     timestamptz NOT NULL,
    ref_seq        bigint,
    released       bigint,
    amount         bigint,
    purchase_time  timestamptz,
    hold_expire_ms bigint,
    card_number    text,
    stream         text NOT NULL,
    entry_id       text NOT NULL,
    applied_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, seq, event_time)
) PARTITION BY RANGE (event_time);
CREATE INDEX journal_time ON journal (event_time);

-- Request ids remembered by the hot ledger: fingerprint + packed result, byte for byte.
CREATE TABLE idempotency_records (
    account_id text NOT NULL,
    request_id text NOT NULL,
    record     bytea NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, request_id)
);
CREATE INDEX idempotency_records_expiry ON idempotency_records (expires_at);

-- Highest stream entry applied per shard stream; trimming never passes it.
CREATE TABLE stream_positions (
    stream         text PRIMARY KEY,
    applied_ms     bigint NOT NULL,
    applied_seq    bigint NOT NULL,
    applied_events bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Entries the worker gave up on (undecodable, or failed too many deliveries): acknowledged in
-- Redis only once they are here, so nothing leaves the stream without a trace.
CREATE TABLE dead_letters (
    stream     text NOT NULL,
    entry_id   text NOT NULL,
    account_id text,
    seq        bigint,
    deliveries integer NOT NULL,
    reason     text NOT NULL,
    payload    bytea,
    dead_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

-- Each worker's throughput and lag, written about once a second (read by `pointauth status`).
CREATE TABLE worker_heartbeats (
    consumer          text PRIMARY KEY,
    shards            integer[] NOT NULL,
    applied_total     bigint NOT NULL,
    events_per_second double precision NOT NULL,
    lag_ms            bigint NOT NULL,
    last_seen         timestamptz NOT NULL DEFAULT now()
);

-- Monthly journal partitions (UTC) from the month of `first` on; returns how many it created.
CREATE FUNCTION journal_create_partitions(first timestamptz, months integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month   timestamp := date_trunc('month', first AT TIME ZONE 'UTC');
    name    text;
    created integer := 0;
BEGIN
    -- Workers and migrate may race to create the same partition.
    PERFORM pg_advisory_xact_lock(hashtext('pointauth.journal_partitions'));
    FOR i IN 1..months LOOP
        name := 'journal_' || to_char(month, 'YYYY_MM');
        IF to_regclass(quote_ident(current_schema()) || '.' || name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF journal FOR VALUES FROM (%L) TO (%L)',
                name, month AT TIME ZONE 'UTC', (month + interval '1 month') AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END
$$;
