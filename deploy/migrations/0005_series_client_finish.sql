-- Series rate limiter: the holder's own bound of the finish time
-- (worker/ratelimit/series.py, "The finish is the earlier of two times").
--
-- series_acquire gains an INOUT called_at: the clock read when the call
-- began, after the request arrived, from which the caller bounds the offset
-- between its clock and this one. series_release gains p_finished_at: the
-- caller's upper bound of this clock when it saw the SMTP server's last
-- reply; the lease finishes at the earlier of it and clock_timestamp().
-- The signatures of 0004 stay, for workers of the previous version during a
-- rolling upgrade; its series_release now runs the new one. Safe to apply
-- more than once.

CREATE OR REPLACE PROCEDURE series_acquire(
    p_tenant text,
    p_holder text,
    p_want integer,
    p_batch_size integer,
    p_pause_ms integer,
    p_lease_ms integer,
    p_priority boolean,
    p_waiter text,
    p_hold_ms integer,
    p_at timestamptz,
    INOUT granted_lease bigint,
    INOUT in_series bigint,
    INOUT granted_slots integer,
    INOUT next_ask_ms integer,
    INOUT retry_in_ms integer,
    INOUT called_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    hold_until timestamptz;
    r record;
BEGIN
    called_at := coalesce(p_at, clock_timestamp());
    hold_until := called_at + greatest(p_hold_ms, 0) * interval '1 millisecond';
    LOOP
        SELECT * INTO r FROM series_try_acquire(
            p_tenant, p_holder, p_want, p_batch_size, p_pause_ms, p_lease_ms, p_priority, p_waiter, p_at);
        EXIT WHEN r.granted_lease IS NOT NULL OR p_at IS NOT NULL
               OR r.retry_at > hold_until OR r.retry_at <= r.clock_at;
        COMMIT;
        PERFORM pg_sleep(greatest(extract(epoch FROM r.retry_at - clock_timestamp()), 0));
    END LOOP;
    granted_lease := r.granted_lease;
    in_series := r.in_series;
    granted_slots := r.granted_slots;
    next_ask_ms := r.next_ask_ms;
    -- series.ceil_ms(): a wait never ends early.
    retry_in_ms := CASE WHEN r.granted_lease IS NULL
                        THEN ceil(extract(epoch FROM r.retry_at - r.clock_at) * 1000)::integer END;
END
$$;

CREATE OR REPLACE FUNCTION series_release(
    p_tenant text,
    p_lease_id bigint,
    p_slots integer,
    p_unused integer,
    p_at timestamptz,
    p_finished_at timestamptz)
RETURNS boolean                    -- false: the lease had expired and been reaped
LANGUAGE plpgsql AS $$
DECLARE
    st series_state%ROWTYPE;
    now_at timestamptz;
    lease_series bigint;
    current boolean;
BEGIN
    IF p_unused < 0 OR p_unused > p_slots THEN
        RAISE EXCEPTION 'series_release: unused % of % slots', p_unused, p_slots;
    END IF;
    INSERT INTO series_state (tenant_id) VALUES (p_tenant) ON CONFLICT DO NOTHING;
    SELECT * INTO STRICT st FROM series_state s WHERE s.tenant_id = p_tenant FOR UPDATE;
    -- Read after the lock was granted, which is after the SMTP server accepted the mail.
    now_at := coalesce(p_at, clock_timestamp());
    DELETE FROM series_leases l WHERE l.lease_id = p_lease_id RETURNING l.series_no INTO lease_series;

    -- finish()
    current := coalesce(lease_series = st.series_no, false);
    IF current THEN
        st.granted := greatest(st.granted - p_unused, 0);
    END IF;
    IF p_unused < p_slots AND (current OR lease_series IS NULL) THEN
        -- least() ignores a NULL p_finished_at.
        st.last_finish_at := greatest(st.last_finish_at, least(now_at, p_finished_at));
    END IF;
    UPDATE series_state s
       SET granted = st.granted, last_finish_at = st.last_finish_at
     WHERE s.tenant_id = p_tenant;
    RETURN lease_series IS NOT NULL;
END
$$;

CREATE OR REPLACE FUNCTION series_release(
    p_tenant text,
    p_lease_id bigint,
    p_slots integer,
    p_unused integer,
    p_at timestamptz)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT series_release(p_tenant, p_lease_id, p_slots, p_unused, p_at, NULL::timestamptz)
$$;
