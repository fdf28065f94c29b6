-- Tenants (one SMTP account each), their employees, groups and sender grants,
-- and the delivery ledger with one row per job.

CREATE TABLE tenants (
    id                  text PRIMARY KEY,
    smtp                jsonb NOT NULL,
    batch_size          integer NOT NULL CHECK (batch_size > 0),
    pause_ms            integer NOT NULL CHECK (pause_ms >= 0),
    archive_bcc         text,
    sender_offer        text,
    sender_order        text,
    sender_invoice      text,
    sender_receipt      text,
    use_user_mail_data  boolean NOT NULL DEFAULT false,
    cc_clerk            boolean NOT NULL DEFAULT false,
    dkim                jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE employee_groups (
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          text NOT NULL,
    name        text,
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE employees (
    tenant_id       text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id              text NOT NULL,
    email           text NOT NULL,
    name            text,
    group_id        text,
    signature_text  text,
    signature_html  text,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, group_id) REFERENCES employee_groups (tenant_id, id)
);

CREATE TABLE group_senders (
    tenant_id   text NOT NULL,
    group_id    text NOT NULL,
    address     text NOT NULL,
    PRIMARY KEY (tenant_id, group_id, address),
    FOREIGN KEY (tenant_id, group_id) REFERENCES employee_groups (tenant_id, id) ON DELETE CASCADE
);

CREATE TABLE employee_senders (
    tenant_id   text NOT NULL,
    employee_id text NOT NULL,
    address     text NOT NULL,
    PRIMARY KEY (tenant_id, employee_id, address),
    FOREIGN KEY (tenant_id, employee_id) REFERENCES employees (tenant_id, id) ON DELETE CASCADE
);

-- status: sending (claimed, SMTP under way), sent, partial (some recipients
-- refused), failed (permanent error, dead-lettered), retrying (transient error,
-- a later attempt is scheduled).
CREATE TABLE deliveries (
    job_id          uuid PRIMARY KEY,
    tenant_id       text NOT NULL,
    doc_type        text NOT NULL,
    doc_number      text NOT NULL,
    payload_sha256  text NOT NULL,
    status          text NOT NULL CHECK (status IN ('sending', 'sent', 'partial', 'failed', 'retrying')),
    attempts        integer NOT NULL DEFAULT 0,
    sender          text,
    recipients      text[] NOT NULL DEFAULT '{}',
    refused         jsonb,
    message_id      text,
    smtp_reply      text,
    reason          text,
    detail          text,
    claimed_by      text,
    claimed_until   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz
);

CREATE INDEX deliveries_tenant_status ON deliveries (tenant_id, status);

-- Dead jobs stay here until an operator purges them (no broker TTL applies).
-- id is the job id, or the broker message id when the message had no readable job.
CREATE TABLE dead_letters (
    id          text PRIMARY KEY,
    job_id      uuid,
    tenant_id   text,
    doc_type    text,
    doc_number  text,
    reason      text NOT NULL,
    detail      text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    smtp_reply  text,
    queue_name  text NOT NULL,
    message     jsonb,
    raw_body    bytea,
    dead_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_dead_at ON dead_letters (dead_at);
