-- Delivery events: the outbox. Every change of a job's state in the ledger writes its event in
-- the same transaction (postbote_emit_event); a relay publishes unpublished rows to RabbitMQ.
CREATE TABLE events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    job_id        uuid NOT NULL,
    seq           integer NOT NULL,
    type          text NOT NULL,
    tenant_id     text NOT NULL,
    doc_type      text NOT NULL,
    body          jsonb NOT NULL,
    occurred_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at  timestamptz,
    UNIQUE (job_id, seq)
);

CREATE INDEX events_unpublished ON events (id) WHERE published_at IS NULL;
CREATE INDEX events_tenant ON events (tenant_id, id);
CREATE INDEX events_occurred ON events (occurred_at);

-- The event of the job's state as the ledger holds it now (after the change in this
-- transaction): status, reason, reply, attempt, next attempt, each recipient. Nothing for a
-- job the ledger does not know. seq counts 1, 2, 3 ... per job.
CREATE FUNCTION postbote_emit_event(p_job uuid, p_type text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM deliveries WHERE job_id = p_job FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO events (job_id, seq, type, tenant_id, doc_type, body)
    SELECT d.job_id,
           COALESCE((SELECT max(e.seq) FROM events e WHERE e.job_id = d.job_id), 0) + 1,
           p_type,
           d.tenant_id,
           d.doc_type,
           jsonb_build_object(
               'job_id', d.job_id,
               'tenant', d.tenant_id,
               'document', jsonb_build_object('type', d.doc_type, 'number', d.doc_number),
               'status', d.status,
               'reason', d.reason,
               'message_id', d.message_id,
               'smtp_reply', d.smtp_reply,
               'attempt', d.attempts,
               'next_attempt_at', d.next_attempt_at,
               'recipients', COALESCE(
                   (SELECT jsonb_agg(jsonb_build_object(
                               'address', r.address, 'role', r.role, 'state', r.state,
                               'reply', NULLIF(concat_ws(' ', NULLIF(r.reply_code, 0)::text,
                                                         r.reply_enhanced, r.reply_text), ''))
                           ORDER BY r.position)
                    FROM delivery_recipients r WHERE r.job_id = d.job_id),
                   '[]'::jsonb))
    FROM deliveries d
    WHERE d.job_id = p_job;
END;
$$;
