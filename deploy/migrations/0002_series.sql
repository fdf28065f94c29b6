-- Series rate limiter (worker/ratelimit): per-tenant series state, leases and
-- priority waiters. Safe to apply more than once, inside a transaction.
-- Independent of 0001_init.sql: tenants are referenced by their id text only.

CREATE TABLE IF NOT EXISTS series_state (
    tenant_id      text        PRIMARY KEY,
    series_no      bigint      NOT NULL DEFAULT 1,
    granted        integer     NOT NULL DEFAULT 0 CHECK (granted >= 0),
    opened_at      timestamptz,             -- first grant of the current series
    last_finish_at timestamptz              -- latest finish/expiry of its leases
);

CREATE TABLE IF NOT EXISTS series_leases (
    lease_id   bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id  text        NOT NULL REFERENCES series_state (tenant_id) ON DELETE CASCADE,
    series_no  bigint      NOT NULL,
    holder_id  text        NOT NULL,        -- host:pid of the worker process
    slots      integer     NOT NULL CHECK (slots > 0),
    granted_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL
);

CREATE INDEX IF NOT EXISTS series_leases_tenant_expires_idx
    ON series_leases (tenant_id, expires_at);

CREATE TABLE IF NOT EXISTS series_priority_waiters (
    tenant_id  text        NOT NULL REFERENCES series_state (tenant_id) ON DELETE CASCADE,
    waiter_id  text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, waiter_id)
);
