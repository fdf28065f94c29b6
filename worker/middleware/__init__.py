"""dramatiq middleware: cross-cutting behaviour kept out of the actor."""

from worker.middleware.retries import GiveUp, RetryPolicy, backoff_ms

__all__ = ["GiveUp", "RetryPolicy", "backoff_ms"]
