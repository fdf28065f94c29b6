-- Series rate limiter, server side (worker/ratelimit/postgres.py): acquiring
-- and releasing slots are one statement each, so a tenant's series_state row
-- is locked only while the server runs them, never across a client round trip.
--
-- series_try_acquire and series_release transcribe reap, decide and finish
-- from worker/ratelimit/series.py, which stays the rule's reference (and the
-- in-memory backend's implementation). tests/test_ratelimit_equivalence.py
-- drives both with the same random sequences of acquire, release and expiry
-- events and requires the same answers; change them together.
--
-- series_acquire reports called_at, the clock read when the call began, from
-- which the caller bounds the offset between its clock and this one;
-- series_release takes p_finished_at, the caller's upper bound of this clock
-- when it saw the SMTP server's last reply, and the lease finishes at the
-- earlier of it and clock_timestamp() (worker/ratelimit/series.py, "The
-- finish is the earlier of two times").
--
-- Time points come from clock_timestamp() read after the row lock was granted
-- (p_at replaces it in that test). Safe to apply more than once.

CREATE OR REPLACE FUNCTION series_try_acquire(
    p_tenant text,
    p_holder text,
    p_want integer,
    p_batch_size integer,
    p_pause_ms integer,
    p_lease_ms integer,
    p_priority boolean,
    p_waiter text,
    p_at timestamptz,
    OUT granted_lease bigint,      -- NULL when refused
    OUT in_series bigint,
    OUT granted_slots integer,     -- 0 when refused
    OUT next_ask_ms integer,       -- granted: pause_ms when the series is full for bulk callers
    OUT retry_at timestamptz,      -- refused: no slot before this (a lower bound)
    OUT clock_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    st series_state%ROWTYPE;
    pause interval := p_pause_ms * interval '1 millisecond';
    reaped timestamptz;
    live integer;
    waiters integer;
    room integer;
    kept integer;
BEGIN
    IF p_batch_size < 1 OR p_pause_ms < 0 OR p_want < 1 THEN
        RAISE EXCEPTION 'series_try_acquire: batch_size %, pause_ms %, want %', p_batch_size, p_pause_ms, p_want;
    END IF;
    INSERT INTO series_state (tenant_id) VALUES (p_tenant) ON CONFLICT DO NOTHING;
    SELECT * INTO STRICT st FROM series_state s WHERE s.tenant_id = p_tenant FOR UPDATE;
    clock_at := coalesce(p_at, clock_timestamp());

    -- reap(): expired leases count as finished at their expiry.
    WITH gone AS (
        DELETE FROM series_leases l
         WHERE l.tenant_id = p_tenant AND l.expires_at <= clock_at
     RETURNING l.expires_at)
    SELECT max(g.expires_at) INTO reaped FROM gone g;
    IF reaped IS NOT NULL THEN
        st.last_finish_at := greatest(st.last_finish_at, reaped);
    END IF;
    DELETE FROM series_priority_waiters w WHERE w.tenant_id = p_tenant AND w.expires_at <= clock_at;
    SELECT count(*) INTO live FROM series_leases l WHERE l.tenant_id = p_tenant;
    SELECT count(*) INTO waiters FROM series_priority_waiters w
     WHERE w.tenant_id = p_tenant AND w.waiter_id IS DISTINCT FROM p_waiter;

    -- decide()
    IF live = 0 AND st.last_finish_at IS NOT NULL AND clock_at >= st.last_finish_at + pause THEN
        st.series_no := st.series_no + 1;
        st.granted := 0;
        st.opened_at := NULL;
        st.last_finish_at := NULL;
    END IF;
    room := greatest(p_batch_size - st.granted, 0);
    kept := CASE WHEN p_priority THEN 0 ELSE least(room, waiters) END;
    granted_slots := least(p_want, room - kept);
    in_series := st.series_no;
    IF granted_slots > 0 THEN
        st.granted := st.granted + granted_slots;
        st.opened_at := coalesce(st.opened_at, clock_at);
        next_ask_ms := CASE WHEN NOT p_priority AND room - kept - granted_slots > 0 THEN 0 ELSE p_pause_ms END;
        IF p_waiter IS NOT NULL THEN
            DELETE FROM series_priority_waiters w WHERE w.tenant_id = p_tenant AND w.waiter_id = p_waiter;
        END IF;
        INSERT INTO series_leases (tenant_id, series_no, holder_id, slots, granted_at, expires_at)
        VALUES (p_tenant, st.series_no, p_holder, granted_slots, clock_at,
                clock_at + p_lease_ms * interval '1 millisecond')
        RETURNING lease_id INTO granted_lease;
    ELSE
        granted_slots := 0;
        -- A live lease finishes no earlier than now, so the next series opens
        -- no earlier than now + pause; likewise when all the room left is kept
        -- for priority waiters, who will fill it.
        retry_at := greatest(
            CASE WHEN live = 0 AND st.last_finish_at IS NOT NULL
                 THEN st.last_finish_at + pause ELSE clock_at + pause END,
            clock_at);
        IF p_priority THEN
            -- series.WAITER_GRACE_MS
            INSERT INTO series_priority_waiters (tenant_id, waiter_id, expires_at)
            VALUES (p_tenant, p_waiter, retry_at + interval '1000 milliseconds')
            ON CONFLICT (tenant_id, waiter_id) DO UPDATE SET expires_at = EXCLUDED.expires_at;
        END IF;
    END IF;
    UPDATE series_state s
       SET series_no = st.series_no, granted = st.granted,
           opened_at = st.opened_at, last_finish_at = st.last_finish_at
     WHERE s.tenant_id = p_tenant;
END
$$;

-- Ask once, and while refused with the next chance at most p_hold_ms after the
-- call began, sleep until then and ask again. The lock and the waiter
-- registration are committed before each sleep, so a held call blocks nobody;
-- waking on the server's clock spares the caller the wake-up and round trip
-- that would follow the retry time. CALL it outside a transaction block.
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

