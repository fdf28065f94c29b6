"""The series rule as pure functions: no clock, no database."""

from __future__ import annotations

import pytest

from worker.job.ratelimit.series import (
    DRIFT_PPM,
    Granted,
    Refused,
    SeriesState,
    clock_bound_us,
    decide,
    finish,
    reap,
)

MS = 1000


def ask(state: SeriesState, now_ms: int, *, want: int = 1, live: int = 0, waiters: int = 0,
        priority: bool = False, batch: int = 3, pause_ms: int = 100) -> Granted | Refused:  # fmt: skip
    return decide(
        state,
        now_us=now_ms * MS,
        live_leases=live,
        priority_waiters=waiters,
        want=want,
        batch_size=batch,
        pause_ms=pause_ms,
        priority=priority,
    )


def test_the_first_caller_opens_a_series_and_gets_what_it_wants_up_to_the_batch() -> None:
    outcome = ask(SeriesState(), 0, want=5)
    assert isinstance(outcome, Granted)
    assert outcome.slots == 3
    assert outcome.state.granted == 3


def test_a_full_series_with_live_leases_refuses_until_at_least_a_pause_from_now() -> None:
    full = SeriesState(series_no=1, granted=3)
    outcome = ask(full, 50, live=2)
    assert isinstance(outcome, Refused)
    assert outcome.retry_at_us == 150 * MS


def test_a_full_series_whose_leases_finished_opens_the_next_one_a_pause_after_the_last_finish() -> None:
    done = SeriesState(series_no=1, granted=3, last_finish_us=40 * MS)
    early = ask(done, 139)
    assert isinstance(early, Refused)
    assert early.retry_at_us == 140 * MS
    on_time = ask(done, 140)
    assert isinstance(on_time, Granted)
    assert on_time.state.series_no == 2
    assert on_time.state.granted == 1


def test_a_partly_filled_series_may_be_joined_before_its_pause_is_over() -> None:
    partial = SeriesState(series_no=1, granted=1, last_finish_us=40 * MS)
    outcome = ask(partial, 60, want=5)
    assert isinstance(outcome, Granted)
    assert (outcome.state.series_no, outcome.slots) == (1, 2)


def test_a_partly_filled_series_whose_pause_is_over_gives_way_to_a_fresh_series() -> None:
    partial = SeriesState(series_no=1, granted=2, last_finish_us=40 * MS)
    outcome = ask(partial, 500, want=5)
    assert isinstance(outcome, Granted)
    assert (outcome.state.series_no, outcome.slots) == (2, 3)


def test_bulk_callers_leave_room_for_priority_waiters() -> None:
    outcome = ask(SeriesState(series_no=1, granted=0), 0, want=5, waiters=1)
    assert isinstance(outcome, Granted)
    assert outcome.slots == 2
    refused = ask(outcome.state, 1, waiters=1, live=1)
    assert isinstance(refused, Refused)


def test_a_priority_caller_takes_the_room_kept_for_it() -> None:
    outcome = ask(SeriesState(series_no=1, granted=2), 1, live=1, waiters=0, priority=True)
    assert isinstance(outcome, Granted)
    assert outcome.state.granted == 3


def test_an_expired_lease_counts_as_finished_at_its_expiry() -> None:
    state = reap(SeriesState(series_no=1, granted=3, last_finish_us=10 * MS), [70 * MS, 50 * MS])
    assert state.last_finish_us == 70 * MS


def test_finishing_hands_back_unused_slots_and_records_the_finish() -> None:
    state = finish(SeriesState(series_no=1, granted=3), now_us=80 * MS, lease_series_no=1, slots=3, unused=2)
    assert (state.granted, state.last_finish_us) == (1, 80 * MS)


def test_a_lease_returned_entirely_unused_does_not_move_the_finish() -> None:
    state = finish(SeriesState(series_no=1, granted=3), now_us=80 * MS, lease_series_no=1, slots=3, unused=3)
    assert (state.granted, state.last_finish_us) == (0, None)


def test_a_send_that_outlived_its_lease_still_pushes_the_finish_forward() -> None:
    state = SeriesState(series_no=2, granted=1, last_finish_us=10 * MS)
    state = finish(state, now_us=90 * MS, lease_series_no=None, slots=2, unused=1)
    assert (state.granted, state.last_finish_us) == (1, 90 * MS)


def test_the_holders_bound_of_the_finish_is_used_when_it_is_earlier() -> None:
    state = finish(
        SeriesState(series_no=1, granted=1),
        now_us=80 * MS,
        lease_series_no=1,
        slots=1,
        unused=0,
        finished_us=74 * MS,
    )
    assert state.last_finish_us == 74 * MS


def test_the_finish_is_never_later_than_the_backends_clock() -> None:
    state = finish(
        SeriesState(series_no=1, granted=1),
        now_us=80 * MS,
        lease_series_no=1,
        slots=1,
        unused=0,
        finished_us=85 * MS,
    )
    assert state.last_finish_us == 80 * MS


def test_an_earlier_bound_does_not_move_the_finish_back() -> None:
    state = SeriesState(series_no=1, granted=2, last_finish_us=78 * MS)
    state = finish(state, now_us=80 * MS, lease_series_no=1, slots=1, unused=0, finished_us=74 * MS)
    assert state.last_finish_us == 78 * MS


@pytest.mark.parametrize("drift_ppm", [-DRIFT_PPM, 0, DRIFT_PPM])
def test_the_clock_bound_is_never_below_the_backends_clock(drift_ppm: int) -> None:
    # The backend clock runs at (1 + drift) times the local one; the request took 3 ms to arrive.
    offset_us, asked_us = 5_000_000, 1_000_000

    def backend_at(local_us: int) -> float:
        return offset_us + asked_us + (local_us - asked_us) * (1 + drift_ppm / 1e6)

    clock_read = int(backend_at(asked_us + 3_000))
    for later_us in (asked_us + 3_000, asked_us + 40_000, asked_us + 45_000_000):
        bound = clock_bound_us(asked_us, clock_read, later_us)
        assert bound >= backend_at(later_us)
        assert bound - backend_at(later_us) <= 3_000 + (later_us - asked_us) * 2 * DRIFT_PPM / 1e6 + 1


def test_a_smaller_batch_size_from_the_settings_page_applies_at_once() -> None:
    outcome = ask(SeriesState(series_no=1, granted=3), 0, live=1, batch=2)
    assert isinstance(outcome, Refused)


@pytest.mark.parametrize(("batch", "pause_ms"), [(0, 100), (1, -1)])
def test_nonsense_limits_are_rejected(batch: int, pause_ms: int) -> None:
    with pytest.raises(ValueError):
        ask(SeriesState(), 0, batch=batch, pause_ms=pause_ms)
