"""The PostgreSQL functions decide exactly like the Python rule.

``deploy/migrations/0004_series_functions.sql`` transcribes :mod:`worker.job.ratelimit.series`;
the in-memory backend runs the Python functions. Both get the same random
sequences of acquire, release (with and without the holder's bound of the
finish), expiry (the clock jumping past ``lease_ms``) and forget-waiter events
on one hand-driven clock, and must give the same answer to every call and keep
the same state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime

import psycopg
import pytest

from tests.support.ratelimit import series_database
from worker.job.ratelimit import Lease, MemoryBackend, PostgresBackend, SeriesBackend, Wait
from worker.job.ratelimit.series import SeriesState

TENANTS = {"a": (5, 100), "b": (2, 40)}  # tenant -> (batch_size, pause_ms)
LEASE_MS = 300
WAITERS = ("w1", "w2", "w3")


@pytest.fixture
def dsn() -> Iterator[str]:
    with series_database() as url:
        yield url


class Clock:
    def __init__(self) -> None:
        self.us = 1_750_000_000_000_000

    def __call__(self) -> int:
        return self.us


def answer(outcome: Lease | Wait) -> tuple[object, ...]:
    """What a caller learns, without the backend's own lease id."""
    if isinstance(outcome, Lease):
        return ("lease", outcome.tenant_id, outcome.series_no, outcome.slots, outcome.next_ask_in_ms)
    return ("wait", outcome.series_no, outcome.retry_in_ms)


def pg_state(conn: psycopg.Connection[tuple[object, ...]], tenant: str) -> SeriesState | None:
    row = conn.execute(
        "SELECT series_no, granted, opened_at, last_finish_at FROM series_state WHERE tenant_id = %s",
        (tenant,),
    ).fetchone()
    if row is None:
        return None
    series_no, granted, opened_at, last_finish_at = row
    assert isinstance(series_no, int) and isinstance(granted, int)
    return SeriesState(series_no, granted, us(opened_at), us(last_finish_at))


def us(at: object) -> int | None:
    if at is None:
        return None
    assert isinstance(at, datetime)
    return int(at.timestamp()) * 1_000_000 + at.microsecond


def boundaries(memory: MemoryBackend) -> list[int]:
    """The instants where an answer changes: a series may open, a lease or a waiter expires."""
    points = []
    for name, tenant in memory._tenants.items():
        if tenant.state.last_finish_us is not None:
            points.append(tenant.state.last_finish_us + TENANTS[name][1] * 1000)
        points.extend(expires for _, _, expires in tenant.leases.values())
        points.extend(tenant.waiters.values())
    return points


def step(rng: random.Random, clock: Clock, memory: MemoryBackend) -> None:
    """Move the clock: often not at all or a little, sometimes onto the very microsecond
    a series may open or a lease expires, about a pause, or past a lease."""
    kind = rng.random()
    if kind < 0.25:
        return
    if kind < 0.4:
        ahead = [t for t in boundaries(memory) if t >= clock.us]
        if ahead:
            clock.us = rng.choice(ahead)
        return
    if kind < 0.7:
        clock.us += rng.randint(1, 30_000)
    elif kind < 0.9:
        pause_ms = rng.choice([p for _, p in TENANTS.values()])
        clock.us += pause_ms * 1000 + rng.randint(-2_000, 2_000)
    else:
        clock.us += LEASE_MS * 1000 + rng.randint(-1_000, 50_000)


def acquire(backend: SeriesBackend, tenant: str, want: int, waiter: str | None) -> Lease | Wait:
    """A bulk caller, or with ``waiter`` a priority caller."""
    batch_size, pause_ms = TENANTS[tenant]
    return backend.acquire(
        tenant,
        holder_id="h",
        want=want,
        batch_size=batch_size,
        pause_ms=pause_ms,
        lease_ms=LEASE_MS,
        priority=waiter is not None,
        waiter_id=waiter,
    )


@pytest.mark.parametrize("seed", range(40))
def test_the_sql_functions_answer_like_the_python_rule(dsn: str, seed: int) -> None:
    rng = random.Random(seed)
    clock = Clock()
    memory = MemoryBackend(clock_us=clock)
    postgres = PostgresBackend(dsn, clock_us=clock)
    held: list[tuple[Lease, Lease]] = []  # (memory's lease, postgres's lease)
    with psycopg.connect(dsn, autocommit=True) as conn, closing(postgres):
        for _ in range(80):
            step(rng, clock, memory)
            tenant = rng.choice(list(TENANTS))
            event = rng.random()
            if event < 0.55 or not held:
                want = rng.randint(1, 6)
                waiter = rng.choice(WAITERS) if rng.random() < 0.25 else None
                mine = acquire(memory, tenant, want, waiter)
                theirs = acquire(postgres, tenant, want, waiter)
                assert answer(mine) == answer(theirs), (seed, tenant, want, waiter)
                if isinstance(mine, Lease) and isinstance(theirs, Lease):
                    held.append((mine, theirs))
            elif event < 0.95:
                mine_lease, their_lease = held.pop(rng.randrange(len(held)))
                unused = rng.choice([0, 0, rng.randint(0, mine_lease.slots)])
                # The holder's bound of the finish: none, earlier than the clock (the usual
                # case), or later (a slow first answer), by up to a few milliseconds.
                finished = rng.choice(
                    [None, clock.us - rng.randint(0, 5_000), clock.us + rng.randint(1, 5_000)]
                )
                on_time = memory.release(mine_lease, unused=unused, finished_us=finished)
                assert postgres.release(their_lease, unused=unused, finished_us=finished) == on_time, seed
            else:
                waiter = rng.choice(WAITERS)
                memory.forget_waiter(tenant, waiter)
                postgres.forget_waiter(tenant, waiter)
            for name in TENANTS:
                tenant_state = memory._tenants.get(name)
                assert pg_state(conn, name) == (tenant_state.state if tenant_state else None), seed
