-- Member ranks and visits (CheckIn), and campaign budgets counted by the lines that drew on them:
-- what the write-behind copies so that rehydrate restores it and reconcile compares it
-- (ledger/codec.py: Event's rank/spend/period/qual/visits, TransactionRecord's qual/rp,
-- EarnLineEntry's budgeted, StoredAccount's rank_id/rank_spend/rank_period/visits).

-- The member's rank (the account hash's rk), qualifying spend (rs) and the rank period it is of
-- (rp), as the events set them: EARN and VISIT under a rank program (spend, period, and rank
-- when it rose), RANK_REVIEWED (the new period's rank, spend 0) and REFUNDED lowering the spend.
-- NULL rank_id: the member was never under a rank program. And each visit rule's limit: the day
-- (a local date's ordinal) it last gave points, by limit key "<rule>:<store or *>" (the hash's
-- v:<key> fields), set by VISIT and MERGED_IN.
ALTER TABLE accounts
    ADD COLUMN rank_id     text,
    ADD COLUMN rank_spend  bigint NOT NULL DEFAULT 0,
    ADD COLUMN rank_period bigint,
    ADD COLUMN visits      jsonb NOT NULL DEFAULT '{}';

-- A check-in's record is a VISIT (an earn of its visit rules' points). An earn (or visit) under a
-- rank program keeps its qualifying amount and the rank period it counted in (the record's qual
-- and rp), which a refund of it lowers the spend by, in that period only; NULL without one.
ALTER TABLE transactions
    DROP CONSTRAINT transactions_type_check,
    ADD CONSTRAINT transactions_type_check
        CHECK (type IN ('EARN', 'GRANT', 'HOLD', 'CAPTURE', 'REDEMPTION', 'REFUND', 'VISIT')),
    ADD COLUMN qual        bigint,
    ADD COLUMN rank_period bigint,
    ADD CONSTRAINT transactions_rank CHECK ((qual IS NULL) = (rank_period IS NULL));

-- What the new events say:
-- - rank_from, rank_to: EARN and VISIT that reached a higher rank, and RANK_REVIEWED (rank_from
--   '' for a member who had none; rank_to = rank_from when the review kept the rank);
-- - rank_spend: EARN and VISIT under a rank program and REFUNDED lowering it, the member's
--   qualifying spend after it; RANK_REVIEWED, the spend of the period that ended;
-- - rank_period: EARN and VISIT under a rank program, the period it counted in; RANK_REVIEWED,
--   the period that began;
-- - qualifying_amount: EARN and VISIT under a rank program, what it added to the spend;
-- - visits: VISIT and MERGED_IN, the limit keys they set {key: day}.
-- The lines (0004) now have a sixth element: budgeted, 1 when the line's points came from its
-- campaign's budget (a refund's share: went back to it).
ALTER TABLE journal
    ADD COLUMN rank_from         text,
    ADD COLUMN rank_to           text,
    ADD COLUMN rank_spend        bigint,
    ADD COLUMN rank_period       bigint,
    ADD COLUMN qualifying_amount bigint,
    ADD COLUMN visits            jsonb;

-- A campaign's budget count in Redis (Keyspace.budget) is the points of the earns' lines that
-- drew on its budget (budgeted, as the script says), less the refund shares given back to it:
-- budget_given and budget_refunded, beside given and refunded (all of the campaign's points).
-- Rows from before the lines said so count as budgeted where the campaign had a budget in the
-- row's rule set version (what budgets were inferred from until now).
ALTER TABLE campaign_points
    ADD COLUMN budget_given    bigint NOT NULL DEFAULT 0,
    ADD COLUMN budget_refunded bigint NOT NULL DEFAULT 0;
UPDATE campaign_points AS p
SET budget_given = p.given, budget_refunded = p.refunded
FROM (
    SELECT DISTINCT r.version, c ->> 'campaign_id' AS campaign_id
    FROM rule_sets AS r, jsonb_array_elements(r.rule_set -> 'campaigns') AS c
    WHERE coalesce((c ->> 'budget')::bigint, 0) > 0
) AS b
WHERE p.campaign_id = b.campaign_id AND p.rules_version = b.version;
