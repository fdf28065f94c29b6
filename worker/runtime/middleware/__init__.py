"""dramatiq middleware: cross-cutting behaviour kept out of the actor."""

from worker.runtime.middleware.message_metrics import Metrics
from worker.runtime.middleware.retries import GiveUp, RetryPolicy, backoff_ms

__all__ = ["GiveUp", "Metrics", "RetryPolicy", "backoff_ms"]
