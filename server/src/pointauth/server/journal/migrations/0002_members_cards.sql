-- Members and their cards: what the account hash keeps of them (ledger/codec.py: StoredAccount,
-- CardLink, MemberProfile), projected from the events ACCOUNT_OPENED (the first card's kind, the
-- profile), CARD_LINKED, CARD_UNLINKED, CARD_BLOCKED, CARD_UNBLOCKED, CARD_REISSUED,
-- PROFILE_UPDATED and ACCOUNT_CLOSED, so that rehydrate restores the account hash exactly; and
-- account merges (MERGED_OUT, MERGED_IN, and refunds of a merged account's transactions).
-- Times are the events' (whole ms, which timestamptz keeps exactly).

ALTER TABLE accounts
    -- 'A' active, 'C' closed (at closed_at: the ACCOUNT_CLOSED event's time), 'M' merged into
    -- merged_into by merge merge_id at merged_at (the MERGED_OUT event's time; the account hash's
    -- mt, mi and mg).
    ADD COLUMN status      char(1) NOT NULL DEFAULT 'A' CHECK (status IN ('A', 'C', 'M')),
    ADD COLUMN closed_at   timestamptz,
    -- The member's profile as the events carry it (codec.MemberProfile): "bd" birthday "MMDD",
    -- "jt" joined (Unix ms), "hc" home company, "attrs" {name: value}; a field the member does
    -- not have is absent ({}: no profile, as seeded accounts and those opened before profiles).
    ADD COLUMN profile     jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN merged_into text,
    ADD COLUMN merge_id    text,
    ADD COLUMN merged_at   timestamptz,
    ADD CONSTRAINT accounts_closed_at CHECK ((status = 'C') = (closed_at IS NOT NULL)),
    ADD CONSTRAINT accounts_merged CHECK (
        (status = 'M') = (merged_into IS NOT NULL) AND (status = 'M') = (merge_id IS NOT NULL)
        AND (status = 'M') = (merged_at IS NOT NULL));

-- A row per card an account has (its `c:` field), under the account that has it now: an unlinked
-- card has no row; a replaced card keeps its row (state 'R', naming its replacement) and its
-- card index entry.
ALTER TABLE cards
    -- 'P' physical card, 'A' app member ID.
    ADD COLUMN kind        char(1) NOT NULL DEFAULT 'P' CHECK (kind IN ('P', 'A')),
    -- 'A' active, 'B' blocked, 'R' replaced (by replaced_by).
    ADD COLUMN state       char(1) NOT NULL DEFAULT 'A' CHECK (state IN ('A', 'B', 'R')),
    -- The time of the card's last block, unblock or reissue; NULL if it never had one.
    ADD COLUMN state_at    timestamptz,
    ADD COLUMN replaced_by text,
    ADD CONSTRAINT cards_replaced_by CHECK ((state = 'R') = (replaced_by IS NOT NULL)),
    -- The time of the event that linked the card (ACCOUNT_OPENED, CARD_LINKED, CARD_REISSUED);
    -- NULL for a card that has none in Redis: seeded, or linked before cards had states.
    ALTER COLUMN linked_at DROP NOT NULL,
    ALTER COLUMN linked_at DROP DEFAULT,
    -- The time of the MERGED_IN that brought the card to this account with its link unchanged;
    -- NULL if it was linked here. Not in Redis: it orders the card's rows of two accounts whose
    -- streams are applied in either order (a link of the same time moved on by a merge is the
    -- later), see writer.py, _write_cards.
    ADD COLUMN moved_at    timestamptz;
-- What linked_at held until now was when the worker wrote the row, not a link time: the cards it
-- describes have none in Redis (their field is "1").
UPDATE cards SET linked_at = NULL;

-- What the new events say beyond the columns the journal had: the card's kind (ACCOUNT_OPENED,
-- CARD_LINKED, CARD_REISSUED's new card), a reissue's new card, and the profile (ACCOUNT_OPENED,
-- PROFILE_UPDATED: the whole profile after the event).
ALTER TABLE journal
    ADD COLUMN card_kind char(1),
    ADD COLUMN new_card  text,
    ADD COLUMN profile   jsonb;

-- A REFUND of a transaction of an account merged into this one names that account (the record's
-- racct; ref_seq is then its seq). The original's row, under its own account, says everything
-- refunded of it wherever that was (refunded, alloc's returned): the account the refunds now
-- land on keeps the same in its account hash's field f:<account>.<seq> (rehydrate and reconcile
-- read it from here, see writer.py, FOREIGN_REFUNDS).
ALTER TABLE transactions ADD COLUMN ref_account text;
CREATE INDEX transactions_foreign_refunds ON transactions (ref_account, ref_seq) WHERE ref_account IS NOT NULL;

ALTER TABLE journal
    -- MERGED_OUT: the merge's id and target; MERGED_IN: its id and source.
    ADD COLUMN merge_id      text,
    ADD COLUMN other_account text,
    -- REFUNDED of a transaction of an account merged into this one: that account (ref_seq: its seq).
    ADD COLUMN ref_account   text;

-- One row per merge (MergeAccounts, ポイント口座統合), written from both of its events, which come in
-- the two accounts' streams in either order: the source's MERGED_OUT (step 1: who, why, what
-- left the source) and the MERGED_IN of the account the move landed on (step 2: the target, or
-- the account the target had been merged into since). A row without landed_on is a merge whose
-- step 2 has not run (or not yet reached PostgreSQL): rehydrate gives the source back its move
-- record and its place in the shard's list of unfinished merges.
CREATE TABLE merges (
    merge_id        text PRIMARY KEY,
    source_id       text NOT NULL,
    -- From MERGED_OUT (NULL until it is applied):
    target_id       text,
    merged_at       timestamptz,
    actor           text,
    reason          text,
    -- The lots as they left the source (codec.LotEntry, the source's ids), its cards
    -- {card: CardLink text} and its refund states {transaction id: "<refunded>|<returned,...>"}:
    -- the move record (codec.MergeMove) step 2 applies.
    lots            jsonb,
    cards           jsonb,
    foreign_refunds jsonb,
    -- From MERGED_IN: the account the move landed on and when (its account hash's
    -- mh:<merge id> = "<source_id>|<landed_at ms>").
    landed_on       text,
    landed_at       timestamptz,
    CHECK ((landed_on IS NULL) = (landed_at IS NULL))
);
CREATE INDEX merges_source ON merges (source_id);
CREATE INDEX merges_landed_on ON merges (landed_on) WHERE landed_on IS NOT NULL;
