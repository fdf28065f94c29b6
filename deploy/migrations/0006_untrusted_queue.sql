-- The queue is not trusted.
-- worker_keys: secrets only workers hold (publishers reach RabbitMQ, not PostgreSQL), such as
-- the key that seals the options a worker puts on a message it requeues.
CREATE TABLE worker_keys (
    name        text PRIMARY KEY,
    key         bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- publishers: the RabbitMQ users allowed to publish jobs for the tenant (checked against the
-- message's user_id property, which RabbitMQ validates); NULL allows any.
ALTER TABLE tenants ADD COLUMN publishers text[];
