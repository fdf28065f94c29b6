"""Nothing dies silently: restart delays, restart counters, supervised threads, and the worker
processes' watch over their dramatiq threads.

The supervisor restarts a worker process or one of its own threads (the ``.XQ`` sweeper, the
queue gauges) that died, after a delay that doubles with every death in a row (``Backoff``),
and counts each restart (``RestartCounts``, served on ``/metrics``). A worker process ends
itself, with ``THREAD_DIED_EXIT_CODE``, when one of its dramatiq threads died
(``watch_worker_threads``), so that the supervisor replaces it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from dramatiq import Worker
from dramatiq.worker import ConsumerThread, WorkerThread
from prometheus_client.core import CounterMetricFamily, Metric

from schemas import constants as names

logger = logging.getLogger(__name__)

THREAD_DIED_EXIT_CODE = 70
"""The exit code of a worker process that ended itself because a dramatiq thread died (EX_SOFTWARE)."""

FIRST_RESTART_DELAY_S = 0.5


class Backoff:
    """The delay before each restart of one thing: 0.5 s, 1 s, 2 s, … up to ``cap_s``.

    A run that lasted ``reset_after_s`` counts as healthy: the next death starts over at 0.5 s.

    Parameters:
      cap_s: the longest delay.
      reset_after_s: how long a run must last to count as healthy.
      clock: monotonic seconds, replaceable in tests.
    """

    def __init__(
        self, *, cap_s: float, reset_after_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._cap_s = max(cap_s, FIRST_RESTART_DELAY_S)
        self._reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started_at: float | None = None
        self._deaths = 0

    def started(self) -> None:
        """A new run begins now."""
        with self._lock:
            self._started_at = self._clock()

    def died(self) -> float:
        """The current run ended; returns how long to wait before the next one."""
        with self._lock:
            if self._ran_healthy():
                self._deaths = 0
            self._started_at = None
            self._deaths += 1
            return min(self._cap_s, FIRST_RESTART_DELAY_S * 2.0 ** min(self._deaths - 1, 32))

    def deaths_in_a_row(self) -> int:
        """Deaths since the last healthy run; 0 once the current run has lasted ``reset_after_s``."""
        with self._lock:
            if self._ran_healthy():
                self._deaths = 0
            return self._deaths

    def _ran_healthy(self) -> bool:
        return self._started_at is not None and self._clock() - self._started_at >= self._reset_after_s


class RestartCounts:
    """``postbote_worker_restarts_total`` and ``postbote_thread_restarts_total{thread}``, as a collector.

    The supervisor counts in its own memory and serves the counts with the worker processes'
    metrics; they start at 0 for every thread it supervises, so ``increase()`` sees the first one.
    """

    def __init__(self, threads: Sequence[str] = ()) -> None:
        self._lock = threading.Lock()
        self._workers = 0
        self._threads = dict.fromkeys(threads, 0)

    def worker_restarted(self) -> None:
        with self._lock:
            self._workers += 1

    def thread_restarted(self, thread: str) -> None:
        with self._lock:
            self._threads[thread] = self._threads.get(thread, 0) + 1

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            workers, threads = self._workers, dict(self._threads)
        worker_family = CounterMetricFamily(
            names.METRIC_WORKER_RESTARTS.removesuffix("_total"),
            "Worker processes that died and were restarted (after a growing delay).",
        )
        worker_family.add_metric([], workers)
        yield worker_family
        thread_family = CounterMetricFamily(
            names.METRIC_THREAD_RESTARTS.removesuffix("_total"),
            "Supervisor threads (the .XQ sweeper, the queue gauges) that died and were restarted.",
            labels=["thread"],
        )
        for thread, count in sorted(threads.items()):
            thread_family.add_metric([thread], count)
        yield thread_family


class SupervisedThread:
    """Runs ``target(stop)`` in a thread and starts it again, after a ``Backoff``, whenever it raises.

    Parameters:
      name: the ``thread`` label of ``postbote_thread_restarts_total`` and the name in logs.
      target: runs until ``stop`` is set; returning earlier counts as dying.
      stop: ends the thread (also during a restart delay).
      backoff: the restart delays.
      counts: where restarts are counted.
    """

    def __init__(
        self,
        name: str,
        target: Callable[[threading.Event], None],
        stop: threading.Event,
        *,
        backoff: Backoff,
        counts: RestartCounts,
    ) -> None:
        self.name = name
        self._target = target
        self._stop = stop
        self._backoff = backoff
        self._counts = counts
        self._down: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def problem(self) -> str | None:
        """What ``/readyz`` says while the thread is down, ``None`` while it runs."""
        return self._down

    def _run(self) -> None:
        while not self._stop.is_set():
            self._backoff.started()
            self._down = None
            try:
                self._target(self._stop)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"[:300]
                logger.exception("the %s thread died", self.name)
            else:
                if self._stop.is_set():
                    return
                error = "it returned"
                logger.error("the %s thread returned while postbote runs", self.name)
            delay = self._backoff.died()
            self._counts.thread_restarted(self.name)
            self._down = f"the {self.name} thread is down ({error}); restarting it in {delay:.1f} s"
            logger.error("restarting the %s thread in %.1f s", self.name, delay)
            self._stop.wait(delay)


def watch_worker_threads(
    workers: Sequence[Worker], stop: threading.Event, *, grace_ms: int, interval_s: float = 2.0
) -> threading.Thread:
    """Start a thread that ends this worker process when one of its dramatiq threads died.

    Every ``interval_s`` it checks that the worker and consumer threads running when it started
    (and any started since) are alive. When one is not, and ``stop`` is not set (a graceful
    shutdown ends them on purpose), it logs which, stops ``workers`` as SIGTERM would (in-flight
    jobs finish within ``grace_ms``, prefetched ones go back to RabbitMQ) and exits the process
    with ``THREAD_DIED_EXIT_CODE``; the supervisor then starts a new one.

    Parameters:
      workers: this process's dramatiq workers, already started.
      stop: set by the process's SIGTERM handler.
      grace_ms: how long in-flight jobs may take to finish.
      interval_s: how often to check.
    """
    watched = _dramatiq_threads()

    def watch() -> None:
        while not stop.wait(interval_s):
            watched.update(_dramatiq_threads())
            dead = sorted(t.name for t in watched if not t.is_alive())
            if dead and not stop.is_set():
                logger.critical(
                    "dramatiq thread(s) %s died; stopping this worker process so that it is replaced",
                    ", ".join(dead),
                )
                _stop_workers(workers, grace_ms)
                logging.shutdown()
                os._exit(THREAD_DIED_EXIT_CODE)

    thread = threading.Thread(target=watch, name="thread-watchdog", daemon=True)
    thread.start()
    return thread


def _dramatiq_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if isinstance(t, WorkerThread | ConsumerThread)}


def _stop_workers(workers: Sequence[Worker], grace_ms: int) -> None:
    def stop(worker: Worker) -> None:
        try:
            worker.stop(timeout=grace_ms)
        except Exception:
            logger.exception("a lane did not stop cleanly; its unfinished jobs are redelivered")

    stoppers = [
        threading.Thread(target=stop, args=(w,), name=f"watchdog-stop-{i}", daemon=True)
        for i, w in enumerate(workers)
    ]
    for stopper in stoppers:
        stopper.start()
    deadline = time.monotonic() + grace_ms / 1000 + 5
    for stopper in stoppers:
        stopper.join(max(0.0, deadline - time.monotonic()))


__all__ = [
    "FIRST_RESTART_DELAY_S",
    "THREAD_DIED_EXIT_CODE",
    "Backoff",
    "RestartCounts",
    "SupervisedThread",
    "watch_worker_threads",
]
