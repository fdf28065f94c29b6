-- The hot path in fewer steps. The directive look-up and the event writer are PL/pgSQL, so
-- their plans are kept across calls (an SQL function that is not inlined is planned anew at
-- each call). An event is
-- written from the ledger row its caller has just updated, so recording an attempt updates the
-- job's row once instead of twice.

CREATE OR REPLACE FUNCTION postbote_directive_for(p_job uuid, p_tenant text, p_doc_type text, p_published timestamptz)
RETURNS directives
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v directives;
BEGIN
    SELECT x.* INTO v FROM (
        SELECT d.* FROM directives d
        WHERE d.lifted_at IS NULL AND d.tenant_id = p_tenant AND d.job_ids IS NULL
          AND ((d.kind = 'cancel'
                AND (d.doc_types IS NULL OR p_doc_type = ANY (d.doc_types))
                AND (d.published_before IS NULL OR coalesce(p_published, '-infinity') < d.published_before))
            OR (d.kind = 'pause'
                AND (p_doc_type = ANY (d.doc_types) OR (d.doc_types IS NULL AND p_doc_type <> 'receipt'))))
        UNION ALL
        SELECT d.* FROM directives d
        WHERE d.lifted_at IS NULL AND d.kind = 'cancel' AND d.job_ids @> ARRAY[p_job]
    ) x
    ORDER BY x.kind = 'cancel' DESC, x.id
    LIMIT 1;
    RETURN v;
END;
$$;

-- The event of ledger row d, whose event_seq its caller has already counted up.
CREATE FUNCTION postbote_write_event(d deliveries, p_type text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (job_id, seq, type, tenant_id, doc_type, body)
    VALUES (d.job_id, d.event_seq, p_type, d.tenant_id, d.doc_type,
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
                '[]'::jsonb)));
END;
$$;

CREATE OR REPLACE FUNCTION postbote_emit_event(p_job uuid, p_type text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_row deliveries;
BEGIN
    UPDATE deliveries SET event_seq = event_seq + 1 WHERE job_id = p_job RETURNING * INTO v_row;
    IF FOUND THEN
        PERFORM postbote_write_event(v_row, p_type);
    END IF;
END;
$$;

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
    WHERE (r.state, r.reply_text, r.attempts) IS DISTINCT FROM (EXCLUDED.state, EXCLUDED.reply_text, EXCLUDED.attempts);
    INSERT INTO delivery_attempts (job_id, attempt, started_at, duration_ms, worker, outcome, reply, recipients)
    VALUES (v_job, (p->>'attempt')::integer, to_timestamp((p->>'started_at')::double precision),
            (p->>'duration_ms')::integer, p->>'worker', p->>'status', p->>'reply', p->'tried')
    ON CONFLICT (job_id, attempt) DO NOTHING;
    PERFORM postbote_write_event(v_row, p->>'status');
    RETURN true;
END;
$$;
