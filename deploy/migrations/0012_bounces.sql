-- Bounces that arrive after the 250, and the suppression list they feed.
--
-- tenants.bounces: where the tenant's bounces arrive (IMAP) and the VERP/DSN options;
-- tenants.suppression: the policy per document type (hold or send) for suppressed addresses.
ALTER TABLE tenants ADD COLUMN bounces jsonb;
ALTER TABLE tenants ADD COLUMN suppression jsonb;

-- One row per (report, job, recipient) applied: the same report ingested again changes nothing.
-- report_key: the report's Message-ID, or a digest of its bytes when it has none.
CREATE TABLE bounce_reports (
    report_key   text NOT NULL,
    job_id       uuid NOT NULL,
    address      text NOT NULL,
    tenant_id    text NOT NULL,
    action       text NOT NULL CHECK (action IN ('failed', 'delayed')),
    class        text NOT NULL,
    status       text,
    reply        text,
    matched_by   text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (report_key, job_id, address)
);

CREATE INDEX bounce_reports_job ON bounce_reports (job_id);
CREATE INDEX bounce_reports_received ON bounce_reports (received_at);

-- How far each IMAP folder was read: a message is looked at once, so unmatched mail is never
-- touched again (and never moved, flagged or deleted).
CREATE TABLE bounce_cursors (
    tenant_id    text NOT NULL,
    folder       text NOT NULL,
    uidvalidity  bigint NOT NULL,
    last_uid     bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, folder)
);

-- Addresses the tenant does not send to, with where the entry came from and until when.
-- address is the address key (domain lower-cased, see worker/job/addresses.py) lower-cased whole.
-- expires_at NULL: until removed.
CREATE TABLE suppressions (
    tenant_id   text NOT NULL,
    address     text NOT NULL,
    source      text NOT NULL CHECK (source IN ('bounce', 'refusal', 'manual', 'import')),
    class       text,
    reply       text,
    job_id      uuid,
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at  timestamptz,
    PRIMARY KEY (tenant_id, address)
);

-- The jobs held because of suppressed addresses: which ones, so removing an entry releases exactly
-- the jobs it held. released_at: an operator let the job go out despite its entries.
CREATE TABLE suppression_holds (
    job_id       uuid PRIMARY KEY,
    tenant_id    text NOT NULL,
    addresses    text[] NOT NULL,
    held_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    released_at  timestamptz
);

CREATE INDEX suppression_holds_tenant ON suppression_holds (tenant_id) WHERE released_at IS NULL;

-- A suppression entry, unless a manual or import entry is already there (those stay as the operator
-- made them); a later bounce replaces an earlier one, and keeps the longer expiry.
CREATE FUNCTION postbote_suppress(p_tenant text, p_address text, p_source text, p_class text,
                                  p_reply text, p_job uuid, p_expires timestamptz) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO suppressions AS s (tenant_id, address, source, class, reply, job_id, expires_at)
    VALUES (p_tenant, lower(p_address), p_source, p_class, p_reply, p_job, p_expires)
    ON CONFLICT (tenant_id, address) DO UPDATE SET
        source = EXCLUDED.source, class = EXCLUDED.class, reply = EXCLUDED.reply,
        job_id = EXCLUDED.job_id, created_at = EXCLUDED.created_at,
        expires_at = CASE WHEN s.expires_at IS NULL OR EXCLUDED.expires_at IS NULL THEN NULL
                          ELSE greatest(s.expires_at, EXCLUDED.expires_at) END
    WHERE s.source IN ('bounce', 'refusal');
$$;

-- A bounce report applied to one recipient of one job, in one transaction: the report's row (a
-- second ingest finds it and changes nothing), the recipient's state and reply, the job's status
-- derived again from its customer-facing recipients (as worker/job/outcome.py does), the event,
-- and for a permanent failure of a customer-facing address the suppression entry.
--
-- p: report_key, job_id, address, action (failed|delayed), class, status, code, reply (as reported),
-- text (the reply without its code and status), matched_by,
-- suppress_ms (absent: no entry; null: until removed).
-- Returns: duplicate, unknown (no such recipient), unchanged, delayed or bounced.
CREATE FUNCTION postbote_record_bounce(p jsonb) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := (p->>'job_id')::uuid;
    v_address text;
    v_role text;
    v_state text;
    v_tenant text;
    v_status text;
    v_customers integer;
    v_accepted integer;
BEGIN
    SELECT d.tenant_id, d.status INTO v_tenant, v_status FROM deliveries d WHERE d.job_id = v_job FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    SELECT r.address, r.role, r.state INTO v_address, v_role, v_state
    FROM delivery_recipients r
    WHERE r.job_id = v_job AND lower(r.address) = lower(p->>'address')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'unknown';
    END IF;
    INSERT INTO bounce_reports (report_key, job_id, address, tenant_id, action, class, status, reply, matched_by)
    VALUES (p->>'report_key', v_job, v_address, v_tenant, p->>'action', p->>'class', p->>'status',
            p->>'reply', p->>'matched_by')
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN 'duplicate';
    END IF;
    IF p->>'action' = 'delayed' THEN
        IF v_state <> 'accepted' THEN
            RETURN 'unchanged';
        END IF;
        UPDATE delivery_recipients SET reply_code = (p->>'code')::integer, reply_enhanced = p->>'status',
            reply_text = 'delayed: ' || (p->>'text'), updated_at = clock_timestamp()
        WHERE job_id = v_job AND address = v_address;
        PERFORM postbote_emit_event(v_job, 'delayed');
        RETURN 'delayed';
    END IF;
    IF v_state NOT IN ('accepted', 'pending') THEN
        RETURN 'unchanged';
    END IF;
    UPDATE delivery_recipients SET state = 'bounced', reply_code = (p->>'code')::integer,
        reply_enhanced = p->>'status', reply_text = p->>'text', updated_at = clock_timestamp()
    WHERE job_id = v_job AND address = v_address;
    IF v_status IN ('sent', 'partial', 'failed') THEN
        SELECT count(*), count(*) FILTER (WHERE r.state = 'accepted') INTO v_customers, v_accepted
        FROM delivery_recipients r WHERE r.job_id = v_job AND r.role IN ('to', 'cc', 'bcc');
        IF v_accepted = 0 THEN
            UPDATE deliveries SET status = 'failed', reason = 'bounced',
                detail = 'bounced after acceptance: ' || v_address || ' (' || (p->>'reply') || ')',
                smtp_reply = p->>'reply', updated_at = clock_timestamp()
            WHERE job_id = v_job;
        ELSIF v_accepted < v_customers THEN
            UPDATE deliveries SET status = 'partial', reason = 'bounced',
                detail = 'bounced after acceptance: ' || v_address || ' (' || (p->>'reply') || ')',
                updated_at = clock_timestamp()
            WHERE job_id = v_job;
        END IF;
    END IF;
    IF p ? 'suppress_ms' AND v_role IN ('to', 'cc', 'bcc') THEN
        PERFORM postbote_suppress(v_tenant, v_address, 'bounce', p->>'class', p->>'reply', v_job,
                                  clock_timestamp() + (p->>'suppress_ms')::bigint * interval '1 ms');
    END IF;
    PERFORM postbote_emit_event(v_job, 'bounced');
    RETURN 'bounced';
END;
$$;

-- A customer-facing address refused for good at RCPT as unknown (5.1.x) is suppressed like a hard
-- bounce, whichever code path recorded the refusal.
CREATE FUNCTION postbote_suppress_refused() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'refused' AND NEW.role IN ('to', 'cc', 'bcc') AND NEW.reply_enhanced LIKE '5.1.%'
       AND (TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM 'refused') THEN
        PERFORM postbote_suppress(d.tenant_id, NEW.address, 'refusal', 'invalid_recipient',
                                  NULLIF(concat_ws(' ', NEW.reply_code, NEW.reply_enhanced, NEW.reply_text), ''),
                                  NEW.job_id, NULL)
        FROM deliveries d WHERE d.job_id = NEW.job_id;
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER delivery_recipients_suppress_refused
AFTER INSERT OR UPDATE OF state ON delivery_recipients
FOR EACH ROW EXECUTE FUNCTION postbote_suppress_refused();
