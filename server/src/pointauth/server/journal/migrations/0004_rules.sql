-- Earn rules (issue #10): what the rules engine gives and keeps, copied by the write-behind so
-- that rehydrate restores it and reconcile compares it (ledger/codec.py: "rule sets",
-- EarnLineEntry, Event's lines/rules/counts/first, StoredAccount.rule_counts/first_earn_ms).

-- Every published rule set, copied from the publication shard 0's stream carries
-- (codec.RuleSetPublished; journal/rules.py). A version's rule set never changes: a redelivered
-- publication changes nothing. `rule_set`: domain/earning.py's RuleSet as JSON (msgspec, sets
-- sorted), the version and publication time inside it too. The current version is the highest.
CREATE TABLE rule_sets (
    version      bigint PRIMARY KEY CHECK (version > 0),
    published_at timestamptz NOT NULL,
    rule_set     jsonb NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- What the events say of the rules:
-- - lines: EARN under the rules, each rule's part [rule, points, lot id, note, refunded]
--   (codec.EarnLineEntry, refunded 0 as the event carries it); REFUNDED of such an earn, the
--   shares it took back per rule [rule, points, lot id, "", 0];
-- - rules_version: EARN under the rules, the rule set version it used;
-- - rule_counts: EARN, REFUNDED, MERGED_IN, the capped rules' counts for the member after it
--   {rule: points} (the account hash's k:<rule> fields it set);
-- - first_earn: EARN, MERGED_IN, true when it made the member's first-earn mark (fe = its time).
ALTER TABLE journal
    ADD COLUMN lines         jsonb,
    ADD COLUMN rules_version bigint,
    ADD COLUMN rule_counts   jsonb,
    ADD COLUMN first_earn    boolean;

-- A record's lines as the script keeps them (TransactionRecord.lines): an earn's, each line's
-- refunded brought up to date by every refund of it (wherever it landed, see 0002's ref_account),
-- and a refund's shares; NULL when it has none. rules_version: an earn's (NULL without rules),
-- which says whether a line's campaign had a budget (campaign_points).
ALTER TABLE transactions
    ADD COLUMN lines         jsonb,
    ADD COLUMN rules_version bigint;

-- The member's rule counts (the account hash's k:<rule> fields: points each capped rule has
-- given the member, less refunds) and first earn (fe).
ALTER TABLE accounts
    ADD COLUMN rule_counts   jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN first_earn_at timestamptz;

-- Points each campaign gave under each rule set version: `given`, the points of its lines in the
-- earns made under that version; `refunded`, the shares refunds took back from them. Kept by the
-- write-behind beside the transactions (one upsert per campaign and version per batch). A
-- campaign's budget count in Redis (Keyspace.budget: the points it has given) is the sum of
-- given - refunded over the versions in which it had a budget (rule_sets), since only those
-- earns reserved from it: rehydrate restores it from here, reconcile compares it.
CREATE TABLE campaign_points (
    campaign_id   text NOT NULL,
    rules_version bigint NOT NULL,
    given         bigint NOT NULL DEFAULT 0,
    refunded      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, rules_version)
);
