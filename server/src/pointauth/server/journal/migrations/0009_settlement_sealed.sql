-- A closed statement gets no new lines either: a line may be inserted only in the transaction
-- that inserts its statement (0007's triggers refuse UPDATE, DELETE and TRUNCATE already).
CREATE FUNCTION settlement_lines_sealed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM inserted i
        WHERE NOT EXISTS (
            SELECT 1 FROM settlement_statements s
            WHERE s.period = i.period AND s.xmin = pg_current_xact_id()::xid
        )
    ) THEN
        RAISE EXCEPTION 'settlement statements are immutable once closed (INSERT into %)', TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NULL;
END
$$;
DO $$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['settlement_issuers', 'settlement_pairs', 'settlement_stores', 'settlement_payments',
                             'settlement_adjustments'] LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %I REFERENCING NEW TABLE AS inserted
                        FOR EACH STATEMENT EXECUTE FUNCTION settlement_lines_sealed()', t || '_sealed', t);
    END LOOP;
END
$$;
