"""The series rule as pure functions over one tenant's state.

This module is the rule's reference: the in-memory backend calls these
functions under a ``threading.Lock``; PostgreSQL runs a line-by-line
transcription of :func:`reap`, :func:`decide` and :func:`finish` in PL/pgSQL
(``deploy/migrations/0004_series_functions.sql``) with the tenant's row locked,
so a call is one statement and the lock never spans a client round trip.
``tests/test_ratelimit_equivalence.py`` drives both with the same random
sequences of acquire, release and expiry events and requires identical answers
and state; change both together.

The rule (settings "Serienmail Anzahl pro Serie" = ``batch_size``,
"Serienmail Pause" = ``pause_ms``): a *series* is numbered; slots are granted
into the current series while ``granted < batch_size``; each grant is a
*lease* that is *finished* at a time on the backend's clock no earlier than
the SMTP server's acceptance of the last mail sent under it, or *expires*
``lease_ms`` after it was granted and then counts as finished at its expiry
time. The next series may
open when no lease of the current one is live and the backend's clock is at
least ``last_finish + pause_ms``.

Why this satisfies the invariant measured at the SMTP server (sort the
arrival times, split wherever the gap is ``>= pause_ms``, no chunk holds more
than ``batch_size`` mails):

* A mail's arrival lies between its grant (taken before it was sent) and its
  lease's finish (no earlier than the server's acceptance), both on one clock.
* The finish is the earlier of two times, each no earlier than the last
  acceptance, so it is no earlier either: the backend's clock when the
  release arrives (read after the holder saw the server's final reply), and
  the holder's estimate of the backend's clock at the moment it saw that
  reply (``finished_us``, see :meth:`~worker.job.ratelimit.backend.Lease.backend_time_us`).
  The estimate is an upper bound: the holder noted its monotonic time ``S``
  before asking for the lease, the backend read its clock ``C`` after the
  question arrived, so ``C - S`` is at least the true offset between the
  clocks at ``S``; adding the local time elapsed since ``S`` plus the most
  the two clocks can drift apart (``DRIFT_PPM``) bounds the backend's clock
  at the reply from above. The estimate spares the pause the reply's and
  the release's way to the backend, and is never later than the backend's
  own reading.
* So every arrival of series *n+1* is at least ``pause_ms`` after every
  arrival of series *n* and before: a series boundary is always a chunk
  boundary, every chunk lies inside one series, and a series holds at most
  ``batch_size`` mails.
* Joining a partly filled series whose leases are all finished, before
  ``last_finish + pause_ms``, is safe: the joiner is counted in that series,
  and its arrival is either less than ``pause_ms`` after the series' earlier
  arrivals (one chunk, still at most ``batch_size``) or at least ``pause_ms``
  after them (a chunk boundary; the chunks are then smaller still). Once
  ``last_finish + pause_ms`` has passed, a fresh series opens instead, which
  never grants less.
* An expired lease counts as finished at its expiry. That is only true if
  the holder really stopped sending by then: a holder must finish its SMTP
  transaction well within ``lease_ms`` (the limiter hands out slots only from
  leases with at least half their time left). A late release still moves
  ``last_finish`` forward, so the damage of a too-slow send is bounded.

Priority lane: a priority caller that is refused registers as a waiter; bulk
grants leave ``min(room, waiters)`` slots of every series free for them.

Time points are integer microseconds on the backend's clock (PostgreSQL's
``timestamptz`` resolution; milliseconds would round a finish time down and
open the next series early). Durations are milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

US_PER_MS = 1000

# How fast two NTP-disciplined clocks may drift apart (each slews at most 500 ppm).
DRIFT_PPM = 1000

# A refused priority waiter keeps its room this long past the retry time it
# was given, so a waiter that died stops holding room back soon.
WAITER_GRACE_MS = 1000


@dataclass(frozen=True, slots=True)
class SeriesState:
    """One tenant's series: its number, slots granted in it, and its timeline.

    ``granted`` counts slots handed out in this series minus slots handed back
    unused; ``last_finish_us`` is the latest finish (or expiry) of a lease of
    this series, ``None`` while none has finished.
    """

    series_no: int = 1
    granted: int = 0
    opened_us: int | None = None
    last_finish_us: int | None = None


@dataclass(frozen=True, slots=True)
class Granted:
    """``slots`` slots (at least one) in series ``state.series_no``.

    ``room_left`` is what bulk callers may still get in this series; at 0 the
    next bulk slot comes no sooner than ``pause_ms`` from now.
    """

    slots: int
    state: SeriesState
    room_left: int


@dataclass(frozen=True, slots=True)
class Refused:
    """No slot now; none can be had before ``retry_at_us`` (a lower bound)."""

    retry_at_us: int
    state: SeriesState


def check_limits(batch_size: int, pause_ms: int) -> None:
    """Raise ``ValueError`` unless ``batch_size >= 1`` and ``pause_ms >= 0``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if pause_ms < 0:
        raise ValueError(f"pause_ms must not be negative, got {pause_ms}")


def reap(state: SeriesState, expired_at_us: Iterable[int]) -> SeriesState:
    """Count expired leases as finished at their expiry times."""
    latest = max(expired_at_us, default=None)
    if latest is None:
        return state
    return replace(state, last_finish_us=_latest(state.last_finish_us, latest))


def decide(
    state: SeriesState,
    *,
    now_us: int,
    live_leases: int,
    priority_waiters: int,
    want: int,
    batch_size: int,
    pause_ms: int,
    priority: bool,
) -> Granted | Refused:
    """Grant up to ``want`` slots now, or say when to ask again.

    Parameters:
      state: the tenant's state after :func:`reap`.
      now_us: the backend's clock.
      live_leases: unexpired, unfinished leases (all belong to ``state``'s series).
      priority_waiters: registered priority callers other than this one.
      want: slots wanted (at least 1).
      priority: a priority caller may use the room kept for waiters.
    """
    check_limits(batch_size, pause_ms)
    if want < 1:
        raise ValueError(f"want must be at least 1, got {want}")
    pause_us = pause_ms * US_PER_MS
    if live_leases == 0 and state.last_finish_us is not None and now_us >= state.last_finish_us + pause_us:
        state = SeriesState(series_no=state.series_no + 1)
    room = max(batch_size - state.granted, 0)
    kept = 0 if priority else min(room, priority_waiters)
    slots = min(want, room - kept)
    if slots > 0:
        opened = state.opened_us if state.opened_us is not None else now_us
        state = replace(state, granted=state.granted + slots, opened_us=opened)
        return Granted(slots, state, room_left=max(room - kept - slots, 0) if not priority else 0)
    if live_leases == 0 and state.last_finish_us is not None:
        retry_at = state.last_finish_us + pause_us
    else:
        # A live lease finishes no earlier than now, so the next series opens
        # no earlier than now + pause; the same holds when all the room left is
        # kept for priority waiters, who will fill it.
        retry_at = now_us + pause_us
    return Refused(max(retry_at, now_us), state)


def finish(
    state: SeriesState,
    *,
    now_us: int,
    lease_series_no: int | None,
    slots: int,
    unused: int,
    finished_us: int | None = None,
) -> SeriesState:
    """Finish a lease of ``slots`` slots, ``unused`` of them handed back.

    ``lease_series_no`` is ``None`` when the lease had already expired and was
    reaped: its unused slots stay counted, but a send that outlived its lease
    still pushes ``last_finish`` forward.

    ``finished_us`` is the holder's upper bound of the backend's clock at the
    server's last acceptance; the finish is the earlier of it and ``now_us``.
    """
    if not 0 <= unused <= slots:
        raise ValueError(f"unused must be between 0 and {slots}, got {unused}")
    current = lease_series_no == state.series_no
    granted = state.granted - unused if current else state.granted
    last_finish = state.last_finish_us
    if unused < slots and (current or lease_series_no is None):
        end = now_us if finished_us is None else min(now_us, finished_us)
        last_finish = _latest(last_finish, end)
    return replace(state, granted=max(granted, 0), last_finish_us=last_finish)


def clock_bound_us(asked_us: int, clock_us: int, local_us: int) -> int:
    """An upper bound of the backend's clock at this host's monotonic time ``local_us``.

    ``clock_us`` is a reading of the backend's clock taken after this host's
    monotonic clock read ``asked_us``, so ``clock_us - asked_us`` is at least
    the offset between the clocks then; the local time elapsed since is added
    with the most the clocks can drift apart in it.
    """
    elapsed = max(local_us - asked_us, 0)
    return clock_us + elapsed + -(-elapsed * DRIFT_PPM // 1_000_000)


def ceil_ms(us: int) -> int:
    """Microseconds to whole milliseconds, rounded up (a wait never ends early)."""
    return -(-us // US_PER_MS)


def _latest(a: int | None, b: int) -> int:
    return b if a is None else max(a, b)


__all__ = [
    "DRIFT_PPM",
    "US_PER_MS",
    "WAITER_GRACE_MS",
    "Granted",
    "Refused",
    "SeriesState",
    "ceil_ms",
    "check_limits",
    "clock_bound_us",
    "decide",
    "finish",
    "reap",
]
