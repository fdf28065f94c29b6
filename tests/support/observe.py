"""A running worker's HTTP endpoints and metrics: GET a path, wait for a condition, read a sample."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

T = TypeVar("T")


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of ``GET http://127.0.0.1:port/path``; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.read().decode()


def wait_for(probe: Callable[[], T | None], timeout: float = 30, what: str = "condition") -> T:
    """Call ``probe`` until it returns something truthy, and return that (OSError counts as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = probe()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.2)


def sample(metrics_text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with (at least) ``labels`` in an exposition, or ``None``."""
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def wait_metrics(port: int, timeout: float = 30) -> str:
    """The worker's ``/metrics`` once it answers."""
    return wait_for(lambda: _metrics_if_up(port), timeout, f"/metrics on port {port}")


def _metrics_if_up(port: int) -> str | None:
    status, body = http_get(port, "/metrics", timeout=2)
    return body if status == 200 else None


def metrics_when(port: int, check: Callable[[str], bool]) -> str | None:
    """The worker's ``/metrics`` if ``check`` accepts it, else ``None`` (for ``wait_for``)."""
    text = http_get(port, "/metrics")[1]
    return text if check(text) else None


__all__ = ["http_get", "metrics_when", "sample", "wait_for", "wait_metrics"]
