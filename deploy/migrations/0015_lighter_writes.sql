-- Less work for PostgreSQL per mail, with the same rows and the same refusals.
--
-- * The vocabulary columns become domains. A table's CHECK constraint is read and prepared
--   anew by every statement that writes the table; a domain's check is prepared once per
--   connection. Changing the column types rewrites deliveries and delivery_recipients once,
--   while the migration holds them.
-- * delivery_recipients and delivery_attempts lose their foreign keys to deliveries. Their only
--   writers are the ledger functions, which write them right after updating the job's row in the
--   same statement, and ledger rows are redacted, never deleted; the keys checked on every row
--   what cannot happen, at a cost of a lookup and a trigger per row.
-- * Recording an attempt takes the event's recipients from its caller, who sends the same fates
--   it has this statement write, instead of reading them back and building them again; a caller
--   that sends none gets them read back as before.
-- * Updating a job's row changes no indexed column: the tenant index is on (tenant_id,
--   published_at) instead of (tenant_id, status), retention's index on created_at instead of
--   updated_at, and pages keep room (fillfactor 85). The updates of a mail (claim renewed,
--   attempt recorded) then stay on the row's page without new index entries (HOT updates).

DROP TRIGGER delivery_recipients_suppress_refused ON delivery_recipients;

CREATE DOMAIN delivery_status AS text CHECK (VALUE IN (
    'sending', 'retrying', 'held', 'scheduled', 'sent', 'partial', 'failed', 'cancelled', 'expired'));
CREATE DOMAIN recipient_role AS text CHECK (VALUE IN ('to', 'cc', 'bcc', 'clerk', 'archive'));
CREATE DOMAIN recipient_state AS text CHECK (VALUE IN ('pending', 'accepted', 'refused', 'bounced', 'suppressed'));

ALTER TABLE deliveries
    DROP CONSTRAINT deliveries_status_check,
    ALTER COLUMN status TYPE delivery_status;
ALTER TABLE delivery_recipients
    DROP CONSTRAINT delivery_recipients_role_check,
    DROP CONSTRAINT delivery_recipients_state_check,
    DROP CONSTRAINT delivery_recipients_job_id_fkey,
    ALTER COLUMN role TYPE recipient_role,
    ALTER COLUMN state TYPE recipient_state;
ALTER TABLE delivery_attempts DROP CONSTRAINT delivery_attempts_job_id_fkey;

ALTER TABLE deliveries SET (fillfactor = 85);
DROP INDEX deliveries_tenant_status;
CREATE INDEX deliveries_tenant ON deliveries (tenant_id, published_at);
DROP INDEX deliveries_unredacted;
CREATE INDEX deliveries_unredacted ON deliveries (created_at) WHERE redacted_at IS NULL;

CREATE TRIGGER delivery_recipients_suppress_refused
AFTER INSERT OR UPDATE OF state ON delivery_recipients
FOR EACH ROW EXECUTE FUNCTION postbote_suppress_refused();

-- The event body of ledger row d with p_recipients, the recipients as the body lists them (an
-- SQL function, so it is written into its caller's statement).
CREATE FUNCTION postbote_event_body(d deliveries, p_recipients jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'job_id', d.job_id,
        'tenant', d.tenant_id,
        'document', jsonb_build_object('type', d.doc_type, 'number', d.doc_number),
        'status', d.status,
        'reason', d.reason,
        'message_id', d.message_id,
        'smtp_reply', d.smtp_reply,
        'attempt', d.attempts,
        'next_attempt_at', d.next_attempt_at,
        'recipients', p_recipients)
$$;

-- A job's recipients as an event lists them, read from delivery_recipients.
CREATE FUNCTION postbote_event_recipients(p_job uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN COALESCE(
        (SELECT jsonb_agg(jsonb_build_object(
                    'address', r.address, 'role', r.role, 'state', r.state,
                    'reply', NULLIF(concat_ws(' ', NULLIF(r.reply_code, 0)::text,
                                              r.reply_enhanced, r.reply_text), ''))
                ORDER BY r.position)
         FROM delivery_recipients r WHERE r.job_id = p_job),
        '[]'::jsonb);
END;
$$;

CREATE OR REPLACE FUNCTION postbote_write_event(d deliveries, p_type text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (job_id, seq, type, tenant_id, doc_type, body)
    VALUES (d.job_id, d.event_seq, p_type, d.tenant_id, d.doc_type,
            postbote_event_body(d, postbote_event_recipients(d.job_id)));
END;
$$;

-- p->'event_recipients' (optional): the fates of p->'fates' as the event lists them.
CREATE OR REPLACE FUNCTION postbote_record_attempt(p jsonb, p_message bytea) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := (p->>'job_id')::uuid;
    v_row deliveries;
BEGIN
    UPDATE deliveries SET status = p->>'status', reason = p->>'reason', detail = p->>'detail',
        smtp_reply = p->>'smtp_reply', sender = p->>'sender', message_id = p->>'message_id',
        message = p_message,
        next_attempt_at = clock_timestamp() + (p->>'next_attempt_ms')::bigint * interval '1 ms',
        claimed_by = NULL, claimed_until = NULL,
        sent_at = CASE WHEN (p->'delivered') ? (p->>'status') THEN clock_timestamp() ELSE sent_at END,
        updated_at = clock_timestamp(), event_seq = event_seq + 1
    WHERE job_id = v_job AND claimed_by = p->>'worker'
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO delivery_recipients AS r (job_id, address, position, role, state, reply_code,
                                          reply_enhanced, reply_text, attempts, updated_at)
    SELECT v_job, f.address, f.position, f.role, f.state, f.code, f.enhanced, f.text, f.attempts,
           clock_timestamp()
    FROM jsonb_to_recordset(p->'fates') AS f (address text, position smallint, role text, state text,
                                             code integer, enhanced text, text text, attempts integer)
    ON CONFLICT (job_id, address) DO UPDATE SET state = EXCLUDED.state, reply_code = EXCLUDED.reply_code,
        reply_enhanced = EXCLUDED.reply_enhanced, reply_text = EXCLUDED.reply_text,
        attempts = EXCLUDED.attempts, updated_at = EXCLUDED.updated_at
    WHERE (r.state, r.reply_code, r.reply_enhanced, r.reply_text, r.attempts)
          IS DISTINCT FROM (EXCLUDED.state, EXCLUDED.reply_code, EXCLUDED.reply_enhanced,
                            EXCLUDED.reply_text, EXCLUDED.attempts);
    INSERT INTO delivery_attempts (job_id, attempt, started_at, duration_ms, worker, outcome, reply, recipients)
    VALUES (v_job, (p->>'attempt')::integer, to_timestamp((p->>'started_at')::double precision),
            (p->>'duration_ms')::integer, p->>'worker', p->>'status', p->>'reply', p->'tried')
    ON CONFLICT (job_id, attempt) DO NOTHING;
    INSERT INTO events (job_id, seq, type, tenant_id, doc_type, body)
    VALUES (v_job, v_row.event_seq, p->>'status', v_row.tenant_id, v_row.doc_type,
            postbote_event_body(v_row, COALESCE(p->'event_recipients', postbote_event_recipients(v_job))));
    RETURN true;
END;
$$;
