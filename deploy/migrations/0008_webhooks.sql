-- Webhooks: a tenant's delivery events over HTTP (Standard Webhooks), per webhook in the order
-- they were written. The tenant file's `webhooks` list is stored with the tenant; each webhook
-- has a cursor (the last event it was handed, delivered or given up) and the events given up
-- after the retry window are kept, with their payload, for `postbote events webhooks --resend`.

ALTER TABLE tenants ADD COLUMN webhooks jsonb NOT NULL DEFAULT '[]'::jsonb;

-- One row per configured webhook, written by `postbote tenants apply` (a new webhook starts after
-- the newest event stored then; one removed from the file loses its row). The head event is the
-- tenant's first event after last_event_id that the webhook wants; while it fails, attempts,
-- failing_since and next_attempt_at say how often, since when and when it is tried again.
CREATE TABLE webhook_cursors (
    tenant_id          text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    url                text NOT NULL,
    last_event_id      bigint NOT NULL,
    attempts           integer NOT NULL DEFAULT 0,
    failing_since      timestamptz,
    next_attempt_at    timestamptz,
    last_error         text,
    last_delivered_at  timestamptz,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, url)
);

-- Events a webhook refused for the whole retry window: the cursor moved past them. status
-- `failed` until an operator's resend was accepted (`resent`). The payload is the event JSON
-- exactly as it was signed and posted, so a resend needs neither the outbox row nor its retention.
CREATE TABLE webhook_deliveries (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id          text NOT NULL,
    url                text NOT NULL,
    event_id           bigint NOT NULL,
    event_uuid         uuid NOT NULL,
    event_type         text NOT NULL,
    job_id             uuid NOT NULL,
    payload            text NOT NULL,
    status             text NOT NULL DEFAULT 'failed' CHECK (status IN ('failed', 'resent')),
    attempts           integer NOT NULL,
    last_error         text,
    first_attempt_at   timestamptz NOT NULL,
    last_attempt_at    timestamptz NOT NULL,
    resent_at          timestamptz,
    UNIQUE (tenant_id, url, event_id)
);

CREATE INDEX webhook_deliveries_failed ON webhook_deliveries (tenant_id, id) WHERE status = 'failed';
