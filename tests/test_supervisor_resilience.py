"""No process dies silently: a worker process that keeps dying is restarted later each time, counted,
and reported by /healthz until it runs again; a process whose dramatiq thread died ends itself to be
replaced; the health endpoint binds where it is told, and /readyz shares one probe among callers."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg.conninfo

from schemas.constants import METRIC_WORKER_RESTARTS
from tests.support.faults import worker_children
from tests.support.observe import http_get, sample, wait_for, wait_metrics
from tests.support.services import ROOT, RunningWorker
from worker.runtime.probes import SharedProbe
from worker.runtime.watchdog import THREAD_DIED_EXIT_CODE
from worker.settings import Settings


def test_a_worker_process_that_keeps_dying_is_restarted_later_each_time_and_healthz_turns_503(
    own_queues: Settings,
) -> None:
    running = RunningWorker(own_queues, threads=1, restart_backoff_max_ms=2000, restart_reset_ms=3000)
    port = running.metrics_port
    try:
        assert wait_for(lambda: http_get(port, "/healthz") == (200, "ok\n"), what="/healthz")
        killed: list[int] = []
        appeared: list[float] = []
        killed_at: list[float] = []
        for _ in range(5):
            pid = wait_for(
                lambda: next((p for p in worker_children(running.process.pid) if p not in killed), None),
                what="a worker process",
            )
            appeared.append(time.monotonic())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            killed_at.append(time.monotonic())

        status, body = wait_for(
            lambda: r if (r := http_get(port, "/healthz"))[0] == 503 else None, what="503"
        )
        assert "worker process 0 is crash-looping: it died 5 times in a row (last exit code -9)" in body
        assert "crash-looping" in http_get(port, "/readyz")[1]
        delays = [
            float(d)
            for d in re.findall(r"exited with -9; starting a new one in ([\d.]+) s", running.output())
        ]
        assert delays == [0.5, 1.0, 2.0, 2.0, 2.0]
        for delay, died, next_one in zip(delays, killed_at, appeared[1:], strict=False):
            assert next_one - died >= delay
        assert sample(wait_metrics(port), METRIC_WORKER_RESTARTS) == 5

        # Left alone, the next process runs; after restart_reset_ms the host is healthy again.
        assert wait_for(lambda: http_get(port, "/healthz") == (200, "ok\n"), timeout=30, what="recovery")
        assert wait_for(lambda: http_get(port, "/readyz") == (200, "ready\n"), what="ready again")
        assert running.process.poll() is None
    finally:
        running.stop()


_LANES = """
import logging, sys, threading, time
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker
from worker.runtime.watchdog import watch_worker_threads

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
broker = StubBroker()
broker.declare_queue("lane")
worker = Worker(broker, worker_threads=2, worker_timeout=50)
worker.start()
stop = threading.Event()
watch_worker_threads([worker], stop, grace_ms=2000, interval_s=0.2)
if sys.argv[1] == "a thread dies":
    worker.workers[0].stop()
    time.sleep(30)
else:
    stop.set()  # what SIGTERM does: the threads end on purpose
    worker.stop()
    time.sleep(1)
print("ended normally")
"""


def _lanes(case: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LANES), case],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_worker_process_whose_dramatiq_thread_died_exits_with_its_own_code() -> None:
    started = time.monotonic()
    result = _lanes("a thread dies")
    assert result.returncode == THREAD_DIED_EXIT_CODE, result.stderr
    assert time.monotonic() - started < 20
    assert "dramatiq thread(s) Thread-" in result.stderr
    assert "stopping this worker process so that it is replaced" in result.stderr
    assert "ended normally" not in result.stdout


def test_a_graceful_shutdown_is_not_mistaken_for_a_dead_thread() -> None:
    result = _lanes("shutdown")
    assert (result.returncode, result.stdout) == (0, "ended normally\n"), result.stderr


def test_the_health_endpoint_listens_on_the_metrics_host_only(own_queues: Settings) -> None:
    running = RunningWorker(own_queues, threads=1, metrics_host="127.0.0.2")
    port = running.metrics_port
    try:

        def healthz() -> int:
            with urllib.request.urlopen(f"http://127.0.0.2:{port}/healthz", timeout=5) as response:
                return int(response.status)

        assert wait_for(healthz, what="/healthz on 127.0.0.2") == 200
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError(f"something answers on 127.0.0.1:{port}")
        # The supervisor logs where it listens once its threads and processes are started.
        wait_for(
            lambda: f"metrics on 127.0.0.2:{port}" in running.output(), what="the listening address logged"
        )
    finally:
        running.stop()


class CountingProxy:
    """A TCP proxy to ``upstream`` that counts the connections made through it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                target.sendall(data)
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()


def _through(url: str, proxy: CountingProxy) -> str:
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{credentials}@127.0.0.1:{proxy.port}").geturl()


def test_fifty_concurrent_readyz_requests_share_one_probe(own_queues: Settings) -> None:
    rabbitmq = urllib.parse.urlsplit(own_queues.broker_url)
    postgres = psycopg.conninfo.conninfo_to_dict(own_queues.database_url)
    broker = CountingProxy((rabbitmq.hostname or "127.0.0.1", rabbitmq.port or 5672))
    database = CountingProxy((str(postgres.get("host", "127.0.0.1")), int(postgres.get("port", 5432))))
    running = RunningWorker(
        own_queues,
        threads=1,
        broker_url=_through(own_queues.broker_url, broker),
        database_url=psycopg.conninfo.make_conninfo(
            own_queues.database_url, host="127.0.0.1", port=str(database.port)
        ),
        queue_stats_interval_ms=600_000,
    )
    port = running.metrics_port
    try:
        assert wait_for(lambda: http_get(port, "/readyz") == (200, "ready\n"), what="/readyz")
        time.sleep(2.5)  # the answer above is no longer shared
        before = (broker.connections, database.connections)

        with ThreadPoolExecutor(50) as pool:
            answers: list[Any] = list(pool.map(lambda _: http_get(port, "/readyz"), range(50)))

        opened = (broker.connections - before[0], database.connections - before[1])
        assert answers == [(200, "ready\n")] * 50
        # One probe each, plus at most one sweep of .XQ that happened to start meanwhile.
        assert opened[0] <= 2 and opened[1] <= 2, opened
    finally:
        running.stop()
        broker.close()
        database.close()


def test_a_shared_probe_runs_once_for_concurrent_callers_and_again_when_its_answer_is_old() -> None:
    calls: list[float] = []

    def check() -> list[str]:
        calls.append(time.monotonic())
        time.sleep(0.3)
        return [f"check {len(calls)}"]

    probe = SharedProbe(check, max_age_s=0.5)
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda _: probe.problems(), range(50)))
    assert answers == [["check 1"]] * 50
    assert len(calls) == 1

    time.sleep(0.6)
    with ThreadPoolExecutor(50) as pool:
        started = time.monotonic()
        refreshing = pool.submit(probe.problems)
        time.sleep(0.05)
        others = list(pool.map(lambda _: probe.problems(), range(49)))
        waited = time.monotonic() - started
        assert refreshing.result() == ["check 2"]
    # While the second check ran, everybody else had the first answer at once.
    assert others == [["check 1"]] * 49
    assert waited < 0.25
    assert len(calls) == 2
