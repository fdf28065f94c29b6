"""Series rate limiting: ``batch_size`` mails per series per tenant, then ``pause_ms`` of silence.

Holds across every worker process on every host, coordinated through
PostgreSQL only. See ``docs/series.md`` for the semantics and
:mod:`worker.job.ratelimit.series` for why it holds.
"""

from __future__ import annotations

from worker.errors import Throttled

from .backend import Lease, SeriesBackend, Wait
from .limiter import SeriesLimiter, Slot, default_holder_id
from .memory import MemoryBackend
from .postgres import PostgresBackend

__all__ = [
    "Lease",
    "MemoryBackend",
    "PostgresBackend",
    "SeriesBackend",
    "SeriesLimiter",
    "Slot",
    "Throttled",
    "Wait",
    "default_holder_id",
]
