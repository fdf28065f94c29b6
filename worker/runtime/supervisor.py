"""``postbote worker``: start N worker processes, restart any that die, serve metrics and health.

``/metrics`` aggregates every process (prometheus-client multiprocess mode),
``/healthz`` says the supervisor is alive, ``/readyz`` that broker and database answer.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.process import BaseProcess
from typing import Any

from worker.db import connect
from worker.errors import DatabaseUnavailable
from worker.job.ledger import release_claims
from worker.runtime.probes import check_broker, check_database
from worker.runtime.queue_gauges import QueueGauges, StartedMarks
from worker.runtime.sweeper import sweep_forever
from worker.settings import Settings

logger = logging.getLogger(__name__)


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

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server = _serve_http(settings, gauges)
    threading.Thread(target=gauges.run, args=(stop,), name="queue-gauges", daemon=True).start()
    children = [start(slot) for slot in range(processes)]
    threading.Thread(target=sweep_forever, args=(settings, stop), name="xq-sweeper", daemon=True).start()
    logger.info(
        "postbote worker: %d processes × %d threads (+%d for receipts), metrics on :%d",
        processes,
        threads,
        receipt_threads,
        settings.metrics_port,
    )
    try:
        while not stop.wait(0.5):
            for i, child in enumerate(children):
                if not child.is_alive() and not stop.is_set():
                    logger.error(
                        "worker process %s exited with %s; starting a new one", child.pid, child.exitcode
                    )
                    _mark_dead(child)
                    _release_claims(settings, holders.pop(id(child), ""))
                    children[i] = start(i)
    finally:
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


def _serve_http(settings: Settings, gauges: QueueGauges) -> ThreadingHTTPServer | None:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(gauges)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                problems = [
                    p for p in (check_broker(settings.broker_url), check_database(settings.database_url)) if p
                ]
                self._reply(503 if problems else 200, ("\n".join(problems) or "ready").encode() + b"\n")
            else:
                self._reply(404, b"not found\n")

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
        server = ThreadingHTTPServer(("0.0.0.0", settings.metrics_port), Handler)
    except OSError as e:
        logger.error("cannot serve metrics on port %d: %s", settings.metrics_port, e.strerror)
        return None
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


__all__ = ["supervise"]
