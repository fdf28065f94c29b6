-- One SMTP attempt recorded in one statement from the worker: the job's status, each recipient's
-- state and reply, the attempt's row in the history and its event, atomically and in one round
-- trip. Only the worker holding the claim records; false when it does not (any more).
CREATE FUNCTION postbote_record_attempt(p jsonb, p_message bytea) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := (p->>'job_id')::uuid;
BEGIN
    UPDATE deliveries SET status = p->>'status', reason = p->>'reason', detail = p->>'detail',
        smtp_reply = p->>'smtp_reply', sender = p->>'sender', message_id = p->>'message_id',
        message = p_message,
        next_attempt_at = clock_timestamp() + (p->>'next_attempt_ms')::bigint * interval '1 ms',
        claimed_by = NULL, claimed_until = NULL,
        sent_at = CASE WHEN (p->'delivered') ? (p->>'status') THEN clock_timestamp() ELSE sent_at END,
        updated_at = clock_timestamp()
    WHERE job_id = v_job AND claimed_by = p->>'worker';
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
    WHERE (r.state, r.reply_text, r.attempts) IS DISTINCT FROM (EXCLUDED.state, EXCLUDED.reply_text, EXCLUDED.attempts);
    INSERT INTO delivery_attempts (job_id, attempt, started_at, duration_ms, worker, outcome, reply, recipients)
    VALUES (v_job, (p->>'attempt')::integer, to_timestamp((p->>'started_at')::double precision),
            (p->>'duration_ms')::integer, p->>'worker', p->>'status', p->>'reply', p->'tried')
    ON CONFLICT (job_id, attempt) DO NOTHING;
    PERFORM postbote_emit_event(v_job, p->>'status');
    RETURN true;
END;
$$;
