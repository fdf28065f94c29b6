"""dramatiq middleware: cross-cutting behaviour kept out of the actor."""

from worker.middleware.metrics import Metrics
from worker.middleware.retries import GiveUp, RetryPolicy, backoff_ms

__all__ = ["GiveUp", "Metrics", "RetryPolicy", "backoff_ms"]
