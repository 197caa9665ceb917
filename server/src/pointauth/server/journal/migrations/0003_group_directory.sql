-- The group directory: companies, their stores and the stores' terminals, copied by the
-- write-behind from the changes the servers append to shard 0's stream (Redis holds the live
-- directory; `pointauth rehydrate` restores it from here). Each row is the entry as of the
-- directory change `version` that last wrote it: a change is applied only over an older one,
-- so a redelivered or late change never undoes a newer one. No foreign keys: every entry was
-- checked in Redis when registered, and rows arrive in whatever order the stream is replayed.

CREATE TABLE companies (
    company_id   text PRIMARY KEY,
    display_name text NOT NULL,
    version      bigint NOT NULL CHECK (version > 0),
    updated_at   timestamptz NOT NULL
);

CREATE TABLE stores (
    store_id     text PRIMARY KEY,
    company_id   text NOT NULL,
    region_id    text NOT NULL,
    display_name text NOT NULL,
    version      bigint NOT NULL CHECK (version > 0),
    updated_at   timestamptz NOT NULL
);
CREATE INDEX stores_company ON stores (company_id, store_id);

CREATE TABLE terminals (
    store_id     text NOT NULL,
    terminal_id  text NOT NULL,
    display_name text NOT NULL,
    version      bigint NOT NULL CHECK (version > 0),
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (store_id, terminal_id)
);
