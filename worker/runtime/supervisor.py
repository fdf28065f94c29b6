"""``postbote worker``: start N worker processes, restart any that die, serve metrics and health.

A worker process or supervisor thread (``.XQ`` sweeper, queue gauges, parked-job releaser, event relay, webhook
sender) that dies is started again after a delay that doubles with every death in a row, from
0.5 s up to ``restart_backoff_max_ms``, and counted (``postbote_worker_restarts_total``,
``postbote_thread_restarts_total``); a run of ``restart_reset_ms`` forgets the earlier deaths.

On ``metrics_host``:``metrics_port``: ``/metrics`` aggregates every process (prometheus-client
multiprocess mode); ``/healthz`` is 503 while a worker process is crash-looping (died
``CRASH_LOOP_DEATHS`` times in a row), else 200; ``/readyz`` is 503 while broker or database do
not answer, a supervisor thread is down or a process is crash-looping.
SIGTERM or SIGINT stops the processes gracefully within ``shutdown_grace_ms``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client.registry import Collector

from worker.bounces.mailbox import BounceCounts, watch_mailboxes
from worker.db import connect
from worker.errors import DatabaseUnavailable
from worker.job.ledger import release_claims
from worker.runtime.housekeeping import Housekeeping
from worker.runtime.probes import SharedProbe, service_problems
from worker.runtime.queue_gauges import QueueGauges, StartedMarks
from worker.runtime.relay import EventRelay
from worker.runtime.releaser import Releaser
from worker.runtime.sweeper import sweep_forever
from worker.runtime.watchdog import THREAD_DIED_EXIT_CODE, Backoff, RestartCounts, SupervisedThread
from worker.runtime.webhooks import WebhookCounts, deliver_webhooks_forever
from worker.settings import Settings

logger = logging.getLogger(__name__)

CRASH_LOOP_DEATHS = 5
"""Deaths in a row (without a healthy run between them) after which a worker process is crash-looping."""
PROBE_MAX_AGE_S = 2.0
"""How long ``/readyz`` hands out one broker and database check before checking again."""
HTTP_THREADS = 8
"""Requests served at once; more wait in the listen queue."""
HTTP_TIMEOUT_S = 10
_TICK_S = 0.1


@dataclass
class _Slot:
    """One worker process place: its current process, if any, and its restart history."""

    backoff: Backoff
    process: BaseProcess | None = None
    start_at: float = 0.0
    last_exit: int | None = None

    def crash_loop(self, number: int) -> str | None:
        """What ``/healthz`` says while this slot's process is crash-looping, else ``None``."""
        deaths = self.backoff.deaths_in_a_row()
        if deaths < CRASH_LOOP_DEATHS:
            return None
        state = (
            "running again"
            if self.process
            else f"next start in {max(0.0, self.start_at - time.monotonic()):.1f} s"
        )
        return (
            f"worker process {number} is crash-looping: it died {deaths} times in a row"
            f" (last exit code {self.last_exit}); {state}"
        )


class _Health:
    """The answers of ``/healthz`` and ``/readyz``."""

    def __init__(
        self, settings: Settings, slots: Sequence[_Slot], threads: Sequence[SupervisedThread]
    ) -> None:
        self._slots = slots
        self._threads = threads
        self._services = SharedProbe(
            lambda: service_problems(settings.broker_url, settings.database_url), max_age_s=PROBE_MAX_AGE_S
        )

    def liveness_problems(self) -> list[str]:
        return [p for i, slot in enumerate(self._slots) if (p := slot.crash_loop(i))]

    def readiness_problems(self) -> list[str]:
        threads = [p for t in self._threads if (p := t.problem())]
        return self._services.problems() + threads + self.liveness_problems()


def supervise(
    settings: Settings, *, processes: int, threads: int, receipt_threads: int, pin_cpus: bool = False
) -> int:
    """Run ``processes`` worker processes until SIGTERM or SIGINT; returns the exit code (0).

    With ``pin_cpus`` the n-th process runs on the n-th CPU this process may use (round robin),
    and a replacement on the CPU of the process it replaces.
    """
    # A fresh directory per run: files left by an earlier run (or another
    # supervisor on the host) would otherwise be added to this run's counters.
    metrics_dir = tempfile.mkdtemp(prefix="postbote-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    context = multiprocessing.get_context("spawn")
    settings_data = settings.model_dump()
    started = StartedMarks(context)
    gauges = QueueGauges(settings, started)

    holders: dict[int, str] = {}
    cpus = cpu_placement(processes) if pin_cpus else []

    def start(slot: int) -> BaseProcess:
        from worker.runtime.process import run_worker_process

        holder = f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"
        process = context.Process(
            target=run_worker_process,
            args=(settings_data, threads, receipt_threads, started, holder, cpus[slot] if cpus else None),
            daemon=False,
        )
        process.start()
        holders[id(process)] = holder
        return process

    def backoff() -> Backoff:
        return Backoff(
            cap_s=settings.restart_backoff_max_ms / 1000, reset_after_s=settings.restart_reset_ms / 1000
        )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    counts = RestartCounts(
        threads=("bounces", "event_relay", "housekeeping", "queue_gauges", "releaser", "sweeper", "webhooks")
    )
    housekeeping = Housekeeping(settings)
    relay = EventRelay(settings)
    releaser = Releaser(settings)
    webhook_counts = WebhookCounts()
    helpers = [
        SupervisedThread("queue_gauges", gauges.run, stop, backoff=backoff(), counts=counts),
        SupervisedThread(
            "sweeper", lambda s: sweep_forever(settings, s), stop, backoff=backoff(), counts=counts
        ),
        SupervisedThread("event_relay", relay.run, stop, backoff=backoff(), counts=counts),
        SupervisedThread("releaser", releaser.run, stop, backoff=backoff(), counts=counts),
        SupervisedThread("housekeeping", housekeeping.run, stop, backoff=backoff(), counts=counts),
        SupervisedThread(
            "bounces", lambda s: watch_mailboxes(settings, s), stop, backoff=backoff(), counts=counts
        ),
        SupervisedThread(
            "webhooks",
            lambda s: deliver_webhooks_forever(settings, s, counts=webhook_counts),
            stop,
            backoff=backoff(),
            counts=counts,
        ),
    ]
    slots = [_Slot(backoff()) for _ in range(processes)]
    server = _serve_http(
        settings,
        [gauges, counts, relay.metrics, webhook_counts, BounceCounts(settings), housekeeping],
        _Health(settings, slots, helpers),
    )
    for helper in helpers:
        helper.start()
    for number, slot in enumerate(slots):
        slot.process = start(number)
        slot.backoff.started()
    logger.info(
        "postbote worker: %d processes × %d threads (+%d for receipts), metrics on %s:%d",
        processes,
        threads,
        receipt_threads,
        settings.metrics_host,
        settings.metrics_port,
    )
    try:
        while not stop.wait(_TICK_S):
            for number, slot in enumerate(slots):
                if stop.is_set():
                    break
                child = slot.process
                if child is not None and not child.is_alive():
                    slot.process, slot.last_exit = None, child.exitcode
                    _bury(settings, child, holders.pop(id(child), ""))
                    delay = slot.backoff.died()
                    slot.start_at = time.monotonic() + delay
                    counts.worker_restarted()
                    logger.error(
                        "worker process %s exited with %s; starting a new one in %.1f s%s",
                        child.pid,
                        slot.last_exit,
                        delay,
                        " (one of its dramatiq threads had died)"
                        if slot.last_exit == THREAD_DIED_EXIT_CODE
                        else "",
                    )
                    child.close()
                if slot.process is None and time.monotonic() >= slot.start_at:
                    slot.process = start(number)
                    slot.backoff.started()
    finally:
        children = [slot.process for slot in slots if slot.process is not None]
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + settings.shutdown_grace_ms / 1000 + 5
        for child in children:
            child.join(max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                logger.error("worker process %s did not stop in time; killing it", child.pid)
                child.kill()
                child.join()
        if server is not None:
            server.shutdown()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def cpu_placement(processes: int) -> list[int]:
    """The CPU of each worker process: round robin over the CPUs the supervisor may run on."""
    cpus = sorted(os.sched_getaffinity(0))
    return [cpus[slot % len(cpus)] for slot in range(processes)]


def _bury(settings: Settings, child: BaseProcess, holder: str) -> None:
    """Drop a dead process's live gauges and release its claims."""
    _mark_dead(child)
    if holder:
        _release_claims(settings, holder)


def _release_claims(settings: Settings, holder: str) -> None:
    """A dead process's claims are stale now (the ledger's stale-claim rule), not in minutes."""
    try:
        with connect(settings.database_url) as conn:
            released = release_claims(conn, holder)
    except DatabaseUnavailable as e:
        logger.warning("cannot release the claims of %s now (%s); they expire on their own", holder, e)
        return
    if released:
        logger.warning("released %d claim(s) of the dead worker process %s", released, holder)


def _mark_dead(child: BaseProcess) -> None:
    from prometheus_client import multiprocess

    if child.pid is not None:
        multiprocess.mark_process_dead(child.pid)  # type: ignore[no-untyped-call]


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``HTTP_THREADS`` requests at once."""

    request_queue_size = 64

    def __init__(self, address: tuple[str, int], handler: Callable[..., BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._busy = threading.BoundedSemaphore(HTTP_THREADS)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self._busy.acquire()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._busy.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._busy.release()


def _serve_http(
    settings: Settings, collectors: Sequence[Collector], health: _Health
) -> ThreadingHTTPServer | None:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    for collector in collectors:
        registry.register(collector)

    class Handler(BaseHTTPRequestHandler):
        timeout = HTTP_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._problems(health.liveness_problems(), "ok")
            elif path == "/readyz":
                self._problems(health.readiness_problems(), "ready")
            else:
                self._reply(404, b"not found\n")

        def _problems(self, problems: list[str], fine: str) -> None:
            self._reply(503 if problems else 200, ("\n".join(problems) or fine).encode() + b"\n")

        def _reply(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    if settings.metrics_port == 0:
        return None
    try:
        server = _Server((settings.metrics_host, settings.metrics_port), Handler)
    except OSError as e:
        logger.error(
            "cannot serve metrics on %s:%d: %s", settings.metrics_host, settings.metrics_port, e.strerror or e
        )
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


__all__ = ["CRASH_LOOP_DEATHS", "HTTP_THREADS", "PROBE_MAX_AGE_S", "cpu_placement", "supervise"]
