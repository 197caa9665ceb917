-- Coupons (issue #10): what the write-behind copies so that rehydrate restores them and reconcile
-- compares them (ledger/codec.py: CouponEntry, Event's coupons, StoredAccount's coupons,
-- MergeMove's coupons).

-- Each coupon of a member's, as the account hash keeps it (q:<coupon_id> = "<campaign_id>|<issued
-- ms>|<valid-before ms>|<used ms>"): issued by an earn's coupon campaign line (EARN, VISIT), used
-- once (COUPON_USED sets used_at; NULL: not yet). A merge moves the source's coupons to the
-- account it lands on (MERGED_OUT deletes the source's rows, MERGED_IN adds the target's, under
-- the id each landed with: the ledger gives a coupon a new id where the target's could collide).
-- Expired coupons stay (expire_at says so), as they do in Redis.
CREATE TABLE coupons (
    account_id  text NOT NULL REFERENCES accounts,
    coupon_id   text NOT NULL,
    campaign_id text NOT NULL,
    issued_at   timestamptz NOT NULL,
    expire_at   timestamptz NOT NULL,
    used_at     timestamptz,
    PRIMARY KEY (account_id, coupon_id)
);
CREATE INDEX coupons_campaign ON coupons (campaign_id);

-- What the events say of coupons (codec.CouponEntry each, [id, campaign, issued ms, valid-before
-- ms, used ms]): EARN and VISIT the coupons they issued; COUPON_USED the coupon as used;
-- MERGED_OUT the coupons that left with the move; MERGED_IN the same as they landed.
ALTER TABLE journal
    ADD COLUMN coupons jsonb;

-- The move record's coupons {coupon id: q: field value} as they left the source (from
-- MERGED_OUT), which rehydrate gives back to an unfinished merge's move record.
ALTER TABLE merges
    ADD COLUMN coupons jsonb;
