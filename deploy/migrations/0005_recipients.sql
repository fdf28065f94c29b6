-- Every recipient's fate: one row per envelope recipient with its role and state,
-- one row per SMTP attempt, and when the next attempt is due.
--
-- role: to, cc, bcc (the job's own, customer-facing), clerk (cc_clerk), archive
-- (archive_bcc). state: pending (not yet accepted; a temporary refusal is retried),
-- accepted, refused (permanently, or out of attempts), bounced, suppressed.
CREATE TABLE delivery_recipients (
    job_id          uuid NOT NULL REFERENCES deliveries (job_id) ON DELETE CASCADE,
    address         text NOT NULL,
    position        smallint NOT NULL,
    role            text NOT NULL CHECK (role IN ('to', 'cc', 'bcc', 'clerk', 'archive')),
    state           text NOT NULL CHECK (state IN ('pending', 'accepted', 'refused', 'bounced', 'suppressed')),
    reply_code      integer,
    reply_enhanced  text,
    reply_text      text,
    attempts        integer NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, address)
);

-- One row per SMTP attempt: which recipients it carried and what the server said to each.
CREATE TABLE delivery_attempts (
    job_id       uuid NOT NULL REFERENCES deliveries (job_id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    duration_ms  integer NOT NULL,
    worker       text NOT NULL,
    outcome      text NOT NULL,
    reply        text,
    recipients   jsonb NOT NULL,
    PRIMARY KEY (job_id, attempt)
);

-- next_attempt_at: while retrying, when the next attempt is due.
-- message: the signed bytes, kept while some recipients have the mail and others
-- wait for a retry, so every recipient gets the same bytes; cleared when the job ends.
ALTER TABLE deliveries ADD COLUMN next_attempt_at timestamptz;
ALTER TABLE deliveries ADD COLUMN message bytea;

INSERT INTO delivery_recipients (job_id, address, position, role, state, reply_code, reply_enhanced,
                                 reply_text, attempts, updated_at)
SELECT d.job_id, r.address, r.position,
       CASE WHEN lower(r.address) = lower(t.archive_bcc) THEN 'archive' ELSE 'to' END,
       CASE WHEN d.refused ? r.address THEN 'refused'
            WHEN d.status IN ('sent', 'partial') THEN 'accepted'
            ELSE 'pending' END,
       substring(d.refused ->> r.address FROM '^(\d{3})')::integer,
       substring(d.refused ->> r.address FROM '^\d{3} ([245]\.\d{1,3}\.\d{1,3})'),
       d.refused ->> r.address,
       CASE WHEN d.status IN ('sent', 'partial') OR d.refused ? r.address THEN 1 ELSE 0 END,
       d.updated_at
FROM deliveries d
CROSS JOIN LATERAL unnest(d.recipients) WITH ORDINALITY AS r (address, position)
LEFT JOIN tenants t ON t.id = d.tenant_id
ON CONFLICT (job_id, address) DO NOTHING;

ALTER TABLE deliveries DROP COLUMN recipients;
ALTER TABLE deliveries DROP COLUMN refused;

-- "What happened to invoice RE-2026-0001?"
CREATE INDEX deliveries_document ON deliveries (doc_number, doc_type, tenant_id);
