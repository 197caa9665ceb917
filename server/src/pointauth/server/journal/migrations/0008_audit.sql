-- The audit trail (issue #12): every operator action and every call refused for its credentials
-- or permissions (ledger/codec.py, AuditRecord), copied by the write-behind from shard 0's stream.
-- Append-only: a trigger refuses UPDATE, DELETE and TRUNCATE from any role. In production, run
-- `migrate` as the tables' owner and the server and worker as a role granted only what they use
-- (README, "Security"): that role can neither change rows nor drop the trigger.
CREATE TABLE audit_log (
    stream     text NOT NULL,
    entry_id   text NOT NULL,
    at         timestamptz NOT NULL,
    method     text NOT NULL,
    actor      text NOT NULL,
    role       text NOT NULL,
    peer       text NOT NULL,
    code       text NOT NULL,
    reason     text NOT NULL,
    request    jsonb,
    suppressed integer NOT NULL DEFAULT 0,
    applied_at timestamptz NOT NULL DEFAULT now(),
    -- The stream entry it came from: a redelivered entry is written once.
    PRIMARY KEY (stream, entry_id)
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_actor ON audit_log (actor, at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only (% on audit_log)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
