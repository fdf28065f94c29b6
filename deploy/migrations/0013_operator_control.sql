-- Operator control: pause and cancel directives, parked jobs, schedule and expiry.
--
-- A directive is checked in the same statement that claims a job and again just before DATA
-- (postbote_before_data). A cancel ends at once every matching job that waits (retrying, held,
-- scheduled); a claimed one is ended by its worker's check before DATA, or, if that check ran
-- before the cancel was committed, it is sent. So each job's race between a cancel and its
-- send has one answer, and the check before DATA writes nothing on the way to a send. A job
-- that must wait (paused, scheduled, series slot far away) is parked here with its message and
-- acknowledged; the releaser republishes it when due.

ALTER TABLE deliveries DROP CONSTRAINT deliveries_status_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_status_check CHECK (status IN (
    'sending', 'retrying', 'held', 'scheduled', 'sent', 'partial', 'failed', 'cancelled', 'expired'));

ALTER TABLE deliveries
    ADD COLUMN published_at timestamptz,
    ADD COLUMN not_before   timestamptz,
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN cancelled_by bigint;

CREATE TABLE directives (
    id               bigserial   PRIMARY KEY,
    kind             text        NOT NULL CHECK (kind IN ('pause', 'cancel')),
    tenant_id        text,
    doc_types        text[],
    job_ids          uuid[],
    published_before timestamptz,
    reason           text,
    created_by       text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    lifted_at        timestamptz,
    lifted_by        text,
    CHECK (tenant_id IS NOT NULL OR job_ids IS NOT NULL)
);

CREATE INDEX directives_active ON directives (tenant_id) WHERE lifted_at IS NULL;
CREATE INDEX directives_jobs ON directives USING gin (job_ids) WHERE lifted_at IS NULL;

ALTER TABLE deliveries ADD CONSTRAINT deliveries_cancelled_by_fkey
    FOREIGN KEY (cancelled_by) REFERENCES directives (id);

CREATE TABLE parked_jobs (
    job_id       uuid        PRIMARY KEY REFERENCES deliveries (job_id) ON DELETE CASCADE,
    tenant_id    text        NOT NULL,
    doc_type     text        NOT NULL,
    reason       text        NOT NULL,
    due_at       timestamptz,
    published_at timestamptz,
    position     bigserial,
    queue        text        NOT NULL,
    message      bytea       NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    released_at  timestamptz
);

CREATE INDEX parked_jobs_due ON parked_jobs (due_at) WHERE released_at IS NULL;

-- Per tenant: no series-parked job is released before this (the slot the last of them was told).
CREATE TABLE series_parked (
    tenant_id text        PRIMARY KEY,
    until     timestamptz NOT NULL
);
CREATE INDEX parked_jobs_tenant ON parked_jobs (tenant_id, reason, due_at);

-- The directive that applies to a job now: a cancel before a pause, the oldest first. Both
-- halves use an index, so directives that pile up over the years cost the claim nothing.
CREATE FUNCTION postbote_directive_for(p_job uuid, p_tenant text, p_doc_type text, p_published timestamptz)
RETURNS directives
LANGUAGE sql STABLE AS $$
    SELECT x.* FROM (
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
    LIMIT 1
$$;

-- End a job that has not passed its last check before DATA: cancelled by a directive, or
-- expired. Its claim (if any) is dropped, its parked message forgotten, and an event written.
CREATE FUNCTION postbote_end_unsent(p_job uuid, p_status text, p_detail text, p_directive bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE deliveries SET status = p_status, reason = p_status, detail = p_detail, cancelled_by = p_directive,
        attempts = CASE WHEN status = 'sending' THEN greatest(attempts - 1, 0) ELSE attempts END,
        claimed_by = NULL, claimed_until = NULL, next_attempt_at = NULL, message = NULL,
        updated_at = clock_timestamp()
    WHERE job_id = p_job;
    DELETE FROM parked_jobs WHERE job_id = p_job;
    PERFORM postbote_emit_event(p_job, p_status);
END;
$$;

-- Claim a job for a send, in one statement: the stale-claim rule of the ledger, then the
-- directives, the job's expiry and its schedule. Returns {"claim", "attempts", ...}:
--   claimed / taken_over: this delivery may send;
--   done / conflict / busy / crash_loop: as the ledger says;
--   cancelled / expired: ended here, with its event;
--   park: the job must wait ("reason", "status", "wait_ms"); postbote_park stores it;
--   parked: the same, stored here, when the caller gave the message (p_message). With
--   p->'series_wait_ms', a job nothing else stops is parked for its series slot.
-- A claimed job says "suppressed" when one of p->'customers' is on the tenant's suppression
-- list (worker.job.suppression then decides), so a job to no such address costs no query more.
CREATE FUNCTION postbote_claim(p jsonb, p_message bytea DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := (p->>'job_id')::uuid;
    v_holder text := p->>'holder';
    v_now timestamptz := clock_timestamp();
    -- When it was published: the message's timestamp, else when it was first seen.
    v_published timestamptz := coalesce(to_timestamp((p->>'published_ms')::double precision / 1000), v_now);
    v_row deliveries;
    v_attempts integer;
    v_claim text := 'claimed';
    v_takeovers integer := 0;
    v_directive directives;
    v_wait jsonb;
BEGIN
    INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status, attempts,
                            claimed_by, claimed_until, published_at, not_before, expires_at)
    VALUES (v_job, p->>'tenant', p->>'doc_type', p->>'doc_number', p->>'sha256', 'sending', 1,
            v_holder, v_now + (p->>'claim_ms')::bigint * interval '1 ms', v_published,
            (p->>'not_before')::timestamptz, (p->>'expires_at')::timestamptz)
    ON CONFLICT (job_id) DO NOTHING
    RETURNING attempts INTO v_attempts;
    IF NOT FOUND THEN
        SELECT * INTO v_row FROM deliveries WHERE job_id = v_job FOR UPDATE;
        IF v_row.payload_sha256 <> p->>'sha256' THEN
            RETURN jsonb_build_object('claim', 'conflict', 'attempts', v_row.attempts, 'status', v_row.status);
        END IF;
        IF v_row.status IN ('sent', 'partial', 'failed', 'cancelled', 'expired') THEN
            RETURN jsonb_build_object('claim', 'done', 'attempts', v_row.attempts, 'status', v_row.status);
        END IF;
        IF v_row.status = 'sending' AND v_row.claimed_until >= v_now THEN
            RETURN jsonb_build_object('claim', 'busy', 'attempts', v_row.attempts, 'status', v_row.status,
                'remaining_ms', greatest(0, (extract(epoch FROM v_row.claimed_until - v_now) * 1000)::bigint));
        END IF;
        IF v_row.status = 'sending' THEN
            v_claim := 'taken_over';
            v_takeovers := 1;
            IF v_row.takeovers + 1 >= (p->>'crash_loop_after')::integer THEN
                RETURN jsonb_build_object('claim', 'crash_loop', 'attempts', v_row.attempts,
                    'status', v_row.status, 'takeovers', v_row.takeovers + 1);
            END IF;
        END IF;
        UPDATE deliveries SET status = 'sending', attempts = attempts + 1, takeovers = takeovers + v_takeovers,
            claimed_by = v_holder, claimed_until = v_now + (p->>'claim_ms')::bigint * interval '1 ms',
            updated_at = v_now
        WHERE job_id = v_job
        RETURNING attempts INTO v_attempts;
        DELETE FROM parked_jobs WHERE job_id = v_job;
        v_published := coalesce(v_row.published_at, v_published);
    END IF;
    v_directive := postbote_directive_for(v_job, p->>'tenant', p->>'doc_type', v_published);
    IF v_directive.kind = 'cancel' THEN
        PERFORM postbote_end_unsent(v_job, 'cancelled',
            concat_ws(': ', 'cancelled by ' || v_directive.created_by, v_directive.reason), v_directive.id);
        RETURN jsonb_build_object('claim', 'cancelled', 'attempts', v_attempts - 1);
    END IF;
    IF (p->>'expires_at')::timestamptz <= v_now THEN
        PERFORM postbote_end_unsent(v_job, 'expired', 'not sent by its expires_at', NULL);
        RETURN jsonb_build_object('claim', 'expired', 'attempts', v_attempts - 1);
    END IF;
    IF v_directive.kind = 'pause' THEN
        v_wait := jsonb_build_object('reason', 'paused', 'status', 'held',
            'detail', concat_ws(': ', 'paused by ' || v_directive.created_by, v_directive.reason));
    ELSIF (p->>'not_before')::timestamptz > v_now THEN
        v_wait := jsonb_build_object('reason', 'scheduled', 'status', 'scheduled',
            'detail', 'not before ' || (p->>'not_before'),
            'wait_ms', ceil(extract(epoch FROM (p->>'not_before')::timestamptz - v_now) * 1000)::bigint);
    ELSIF (p->>'series_wait_ms')::bigint IS NOT NULL THEN
        v_wait := jsonb_build_object('reason', 'series', 'status', 'retrying',
            'detail', 'waiting for a series slot', 'wait_ms', (p->>'series_wait_ms')::bigint);
    END IF;
    IF v_wait IS NOT NULL AND p_message IS NOT NULL THEN
        PERFORM postbote_park(v_wait || jsonb_build_object('job_id', v_job, 'holder', v_holder,
            'queue', p->>'queue'), p_message);
        RETURN v_wait || jsonb_build_object('claim', 'parked', 'attempts', v_attempts - 1);
    END IF;
    IF v_wait IS NOT NULL AND v_wait->>'reason' <> 'series' THEN
        RETURN v_wait || jsonb_build_object('claim', 'park', 'attempts', v_attempts);
    END IF;
    RETURN jsonb_build_object('claim', v_claim, 'attempts', v_attempts,
        'status', coalesce(v_row.status, 'sending'), 'takeovers', coalesce(v_row.takeovers, 0) + v_takeovers,
        'suppressed', EXISTS (
            SELECT 1 FROM suppressions s
            WHERE s.tenant_id = p->>'tenant'
              AND s.address IN (SELECT jsonb_array_elements_text(p->'customers'))
              AND (s.expires_at IS NULL OR s.expires_at > v_now)));
END;
$$;

-- Park a job its holder claimed: the claim is given back (no attempt used), the message kept
-- with its reason and due time, and an event written when the job's waiting reason changed.
-- A series wait also moves the tenant's series_parked time, before which none of its
-- series-parked jobs is released, so a closed series is not asked again by each of them.
-- False when the claim is lost.
CREATE FUNCTION postbote_park(p jsonb, p_message bytea) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_job uuid := (p->>'job_id')::uuid;
    v_due timestamptz := clock_timestamp() + (p->>'wait_ms')::bigint * interval '1 ms';
    v_row deliveries;
    v_before parked_jobs;
BEGIN
    UPDATE deliveries SET status = p->>'status', reason = p->>'reason', detail = p->>'detail',
        attempts = greatest(attempts - 1, 0), claimed_by = NULL, claimed_until = NULL,
        next_attempt_at = v_due, updated_at = clock_timestamp()
    WHERE job_id = v_job AND claimed_by = p->>'holder' AND status = 'sending'
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    SELECT * INTO v_before FROM parked_jobs WHERE job_id = v_job;
    INSERT INTO parked_jobs (job_id, tenant_id, doc_type, reason, due_at, published_at, queue, message)
    VALUES (v_job, v_row.tenant_id, v_row.doc_type, p->>'reason', v_due, v_row.published_at, p->>'queue', p_message)
    ON CONFLICT (job_id) DO UPDATE SET reason = EXCLUDED.reason, due_at = EXCLUDED.due_at,
        queue = EXCLUDED.queue, message = EXCLUDED.message, parked_at = clock_timestamp(), released_at = NULL;
    IF p->>'reason' = 'series' AND v_due IS NOT NULL THEN
        INSERT INTO series_parked AS s (tenant_id, until) VALUES (v_row.tenant_id, v_due)
        ON CONFLICT (tenant_id) DO UPDATE SET until = EXCLUDED.until
        WHERE s.until < EXCLUDED.until - interval '200 ms';
    END IF;
    IF v_before.job_id IS NULL OR v_before.reason IS DISTINCT FROM p->>'reason' THEN
        PERFORM postbote_emit_event(v_job,
            CASE p->>'status' WHEN 'held' THEN 'held' WHEN 'scheduled' THEN 'scheduled' ELSE 'retrying' END);
    END IF;
    RETURN true;
END;
$$;

-- The last check before DATA, made by the claim holder after its series slot: 'go' (a cancel
-- committed after this read is too late for the job), 'cancelled' or 'expired' (ended here),
-- 'paused' (park it), or 'lost' (the claim is no longer this holder's). Reads only, unless it
-- ends the job.
CREATE FUNCTION postbote_before_data(p_job uuid, p_holder text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_row deliveries;
    v_directive directives;
BEGIN
    SELECT * INTO v_row FROM deliveries WHERE job_id = p_job;
    IF NOT FOUND OR v_row.status <> 'sending' OR v_row.claimed_by IS DISTINCT FROM p_holder THEN
        RETURN 'lost';
    END IF;
    v_directive := postbote_directive_for(p_job, v_row.tenant_id, v_row.doc_type, v_row.published_at);
    IF v_directive.kind = 'cancel' THEN
        PERFORM postbote_end_unsent(p_job, 'cancelled',
            concat_ws(': ', 'cancelled by ' || v_directive.created_by, v_directive.reason), v_directive.id);
        RETURN 'cancelled';
    END IF;
    IF v_row.expires_at <= clock_timestamp() THEN
        PERFORM postbote_end_unsent(p_job, 'expired', 'not sent by its expires_at', NULL);
        RETURN 'expired';
    END IF;
    IF v_directive.kind = 'pause' THEN
        RETURN 'paused';
    END IF;
    RETURN 'go';
END;
$$;

-- Carry out a cancel directive on the jobs the ledger knows: every matching job that waits
-- ends cancelled (a claimed one is left to its worker's check before DATA). Returns how many.
CREATE FUNCTION postbote_apply_cancel(p_directive bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_directive directives;
    v_job uuid;
    v_count integer := 0;
BEGIN
    SELECT * INTO v_directive FROM directives WHERE id = p_directive;
    FOR v_job IN
        SELECT d.job_id FROM deliveries d
        WHERE d.status IN ('retrying', 'held', 'scheduled')
          AND (d.job_id = ANY (v_directive.job_ids)
               OR (v_directive.job_ids IS NULL AND d.tenant_id = v_directive.tenant_id
                   AND (v_directive.doc_types IS NULL OR d.doc_type = ANY (v_directive.doc_types))
                   AND (v_directive.published_before IS NULL
                        OR coalesce(d.published_at, '-infinity') < v_directive.published_before)))
        ORDER BY d.job_id
        FOR UPDATE OF d
    LOOP
        -- Locked rows are read again as they are now: one may have been claimed meanwhile.
        IF EXISTS (SELECT 1 FROM deliveries WHERE job_id = v_job
                   AND status IN ('retrying', 'held', 'scheduled')) THEN
            PERFORM postbote_end_unsent(v_job, 'cancelled',
                concat_ws(': ', 'cancelled by ' || v_directive.created_by, v_directive.reason), p_directive);
            v_count := v_count + 1;
        END IF;
    END LOOP;
    RETURN v_count;
END;
$$;
