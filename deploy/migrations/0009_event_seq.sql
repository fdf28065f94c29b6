-- An event's seq comes from a counter on the job's ledger row, so it keeps counting after
-- retention deleted the job's earlier events (a replay of an old job goes on at the next seq).
ALTER TABLE deliveries ADD COLUMN event_seq integer NOT NULL DEFAULT 0;

UPDATE deliveries d SET event_seq = e.last
FROM (SELECT job_id, max(seq) AS last FROM events GROUP BY job_id) e
WHERE e.job_id = d.job_id;

CREATE OR REPLACE FUNCTION postbote_emit_event(p_job uuid, p_type text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    next_seq integer;
BEGIN
    UPDATE deliveries SET event_seq = event_seq + 1 WHERE job_id = p_job RETURNING event_seq INTO next_seq;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    INSERT INTO events (job_id, seq, type, tenant_id, doc_type, body)
    SELECT d.job_id,
           next_seq,
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
