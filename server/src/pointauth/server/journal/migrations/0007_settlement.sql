-- Settlement between group companies (issue #11): each company's point value, the point flows
-- settlement sums (one row per event and lot issuer, written by the write-behind in the same
-- transaction as the event's journal row), and the statements of closed periods.

-- What one of a company's points is worth when another company is paid for it: `point_value_yen`
-- yen per `point_value_points` points (1 or 100). 1 yen per point unless registered otherwise.
ALTER TABLE companies
    ADD COLUMN point_value_yen    integer NOT NULL DEFAULT 1 CHECK (point_value_yen >= 0),
    ADD COLUMN point_value_points integer NOT NULL DEFAULT 1 CHECK (point_value_points IN (1, 100));

-- Points that enter, leave or move between a member's lots, per event and lot issuer
-- (journal/flows.py defines each flow). `company_id`/`store_id`: where it happened; for a
-- refund, where the transaction it adjusts happened (the pair it corrects). `ref_*`: the
-- transaction a refund adjusts, and that transaction's time (a late refund names its period).
-- Never updated. Partitioned like the journal, so a period reads one or two partitions.
CREATE TABLE point_flows (
    event_time  timestamptz NOT NULL,
    account_id  text NOT NULL,
    seq         bigint NOT NULL,
    flow        text NOT NULL CHECK (flow IN ('ISSUED', 'ISSUE_REFUNDED', 'USED', 'USE_REFUNDED', 'EXPIRED',
                                              'FORFEITED', 'MERGED_OUT', 'MERGED_IN')),
    issuer_id   text NOT NULL,
    company_id  text,
    store_id    text,
    points      bigint NOT NULL CHECK (points > 0),
    ref_account text,
    ref_seq     bigint,
    ref_time    timestamptz,
    PRIMARY KEY (account_id, seq, flow, issuer_id, event_time)
) PARTITION BY RANGE (event_time);
-- Rows arrive in about time order: a block range index finds a period's edge in a partition at
-- almost no cost to the write-behind.
CREATE INDEX point_flows_time ON point_flows USING brin (event_time);

-- Partitions of the journal and of point_flows (replaces 0001's, which made the journal's only).
CREATE OR REPLACE FUNCTION journal_create_partitions(first timestamptz, months integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month   timestamp := date_trunc('month', first AT TIME ZONE 'UTC');
    parent  text;
    name    text;
    created integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pointauth.journal_partitions'));
    FOR i IN 1..months LOOP
        FOREACH parent IN ARRAY ARRAY['journal', 'point_flows'] LOOP
            name := parent || '_' || to_char(month, 'YYYY_MM');
            IF to_regclass(quote_ident(current_schema()) || '.' || name) IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                    name, parent, month AT TIME ZONE 'UTC', (month + interval '1 month') AT TIME ZONE 'UTC');
                created := created + 1;
            END IF;
        END LOOP;
        month := month + interval '1 month';
    END LOOP;
    RETURN created;
END
$$;

-- A point_flows partition for every month the journal has one.
DO $$
DECLARE
    bound record;
BEGIN
    FOR bound IN
        SELECT to_timestamp(substring(c.relname FROM 'journal_(\d{4}_\d{2})$'), 'YYYY_MM') AS month
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'journal' AND p.relnamespace = to_regnamespace(current_schema())
    LOOP
        PERFORM journal_create_partitions(bound.month, 1);
    END LOOP;
END
$$;

-- A closed period's statement (domain/settlement.py): never changed once written. The lines
-- are its sections; `tie_out` the journal's totals per flow it was checked against.
CREATE TABLE settlement_statements (
    period     text PRIMARY KEY CHECK (period ~ '^\d{4}-\d{2}$'),
    time_zone  text NOT NULL,
    starts_at  timestamptz NOT NULL,
    ends_at    timestamptz NOT NULL,
    closed_at  timestamptz NOT NULL,
    closed_by  text NOT NULL,
    flows      bigint NOT NULL,
    tie_out    jsonb NOT NULL
);

-- Per issuer: its point value when the period closed, and what its points did in the period.
CREATE TABLE settlement_issuers (
    period             text NOT NULL REFERENCES settlement_statements,
    issuer_id          text NOT NULL,
    point_value_yen    integer NOT NULL,
    point_value_points integer NOT NULL,
    issued             bigint NOT NULL,
    issue_refunded     bigint NOT NULL,
    used               bigint NOT NULL,
    use_refunded       bigint NOT NULL,
    expired            bigint NOT NULL,
    forfeited          bigint NOT NULL,
    merged_out         bigint NOT NULL,
    merged_in          bigint NOT NULL,
    PRIMARY KEY (period, issuer_id)
);

-- Per (issuer, using company), and per using store: points used and refunds of such uses.
CREATE TABLE settlement_pairs (
    period       text NOT NULL REFERENCES settlement_statements,
    issuer_id    text NOT NULL,
    company_id   text NOT NULL,
    used         bigint NOT NULL,
    use_refunded bigint NOT NULL,
    PRIMARY KEY (period, issuer_id, company_id)
);
CREATE TABLE settlement_stores (
    period       text NOT NULL REFERENCES settlement_statements,
    issuer_id    text NOT NULL,
    company_id   text NOT NULL,
    store_id     text NOT NULL,
    used         bigint NOT NULL,
    use_refunded bigint NOT NULL,
    PRIMARY KEY (period, issuer_id, company_id, store_id)
);

-- One payment per pair of companies that used each other's points: the net, in yen.
CREATE TABLE settlement_payments (
    period     text NOT NULL REFERENCES settlement_statements,
    payer_id   text NOT NULL,
    payee_id   text NOT NULL,
    yen        bigint NOT NULL CHECK (yen >= 0),
    PRIMARY KEY (period, payer_id, payee_id)
);

-- Refunds in the period of transactions of earlier periods: which transaction each adjusts.
CREATE TABLE settlement_adjustments (
    period      text NOT NULL REFERENCES settlement_statements,
    account_id  text NOT NULL,
    seq         bigint NOT NULL,
    flow        text NOT NULL,
    issuer_id   text NOT NULL,
    company_id  text,
    store_id    text,
    points      bigint NOT NULL,
    ref_account text NOT NULL,
    ref_seq     bigint NOT NULL,
    ref_period  text NOT NULL,
    PRIMARY KEY (period, account_id, seq, flow, issuer_id)
);

-- A closed statement is immutable: no update or delete, whoever asks.
CREATE FUNCTION settlement_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'settlement statements are immutable once closed (% on %)', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['settlement_statements', 'settlement_issuers', 'settlement_pairs',
                             'settlement_stores', 'settlement_payments', 'settlement_adjustments'] LOOP
        EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE OR DELETE OR TRUNCATE ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION settlement_immutable()', t || '_immutable', t);
    END LOOP;
END
$$;
