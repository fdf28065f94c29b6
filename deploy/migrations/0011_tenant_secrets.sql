-- Tenant settings are one tenant administrator's input; the data of ended jobs is kept only as
-- long as needed; a wrong SMTP password stops after one try instead of one try per job.

-- Least privilege: two group roles (NOLOGIN). Give each login role one of them:
--   GRANT postbote_worker TO mailer_worker;      (postbote worker)
--   GRANT postbote_operator TO mailer_admin;     (tenants apply, secrets rotate, dlq, retention ...)
-- Migrations run as the owner of the tables. The worker role reads the tenants and writes the
-- ledger, the dead letters and its own tables, but cannot change a tenant's settings.
-- Roles belong to the whole PostgreSQL cluster and several databases may be migrated at once:
-- a role another migration created in the meantime is fine, and a migrating user that may not
-- create roles leaves them to the administrator (`postbote check` says which role it runs as).
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['postbote_worker', 'postbote_operator'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;
                WHEN insufficient_privilege THEN
                    RAISE NOTICE 'role % not created (no CREATEROLE): create it as an administrator and run the grants of 0012_tenant_secrets.sql', r;
            END;
        END IF;
    END LOOP;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'postbote_worker') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO postbote_worker', current_database());
        GRANT USAGE ON SCHEMA public TO postbote_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO postbote_worker;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON tenants, employee_groups, employees, group_senders,
            employee_senders, schema_migrations FROM postbote_worker;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO postbote_worker;
        GRANT EXECUTE ON ALL ROUTINES IN SCHEMA public TO postbote_worker;
        -- Tables of later migrations are the worker's to write unless that migration revokes it.
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO postbote_worker;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO postbote_worker;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'postbote_operator') THEN
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO postbote_operator', current_database());
        GRANT USAGE ON SCHEMA public TO postbote_operator;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO postbote_operator;
        REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON schema_migrations FROM postbote_operator;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO postbote_operator;
        GRANT EXECUTE ON ALL ROUTINES IN SCHEMA public TO postbote_operator;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO postbote_operator;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO postbote_operator;
    END IF;
END
$$;

-- token_command is no tenant-file key any more (a shell on every worker host for whoever edits
-- one tenant's settings): stored ones are dropped, never run. Such a tenant fails with a
-- configuration error until its file names a token_helper the operator configured.
UPDATE tenants SET smtp = smtp - 'token_command' WHERE smtp ? 'token_command';

-- The login circuit breaker (worker/job/breaker.py): one row per tenant whose last login, or
-- the server certificate's verification, failed. Its jobs wait until retry_at; then one probes.
CREATE TABLE login_breakers (
    tenant_id      text PRIMARY KEY,
    reason         text NOT NULL,
    detail         text NOT NULL,
    failures       integer NOT NULL,
    failing_since  timestamptz NOT NULL,
    retry_at       timestamptz NOT NULL,
    probe_until    timestamptz
);

-- Retention (worker/runtime/retention.py): when the addresses, bodies and replies of an ended job,
-- a dead letter or a failed webhook delivery were removed. The metadata stays.
ALTER TABLE deliveries ADD COLUMN redacted_at timestamptz;
ALTER TABLE dead_letters ADD COLUMN redacted_at timestamptz;
ALTER TABLE webhook_deliveries ADD COLUMN redacted_at timestamptz;
ALTER TABLE events ADD COLUMN redacted_at timestamptz;
CREATE INDEX deliveries_unredacted ON deliveries (updated_at) WHERE redacted_at IS NULL;
CREATE INDEX dead_letters_unredacted ON dead_letters (dead_at) WHERE redacted_at IS NULL;
