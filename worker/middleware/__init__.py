"""dramatiq middleware: cross-cutting concerns of the worker processes."""

from worker.middleware.metrics import Metrics

__all__ = ["Metrics"]
