"""The supervisor replaces a killed worker process; the dead process's counters stay, its gauges go,
and with ``--pin-cpus`` the replacement runs on the dead process's CPU."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from schemas.constants import DRAMATIQ_MESSAGES_IN_PROGRESS, METRIC_MAILS_SENT, queue_name
from tests.support.ledger import wait_final
from tests.support.observe import http_get, metrics_when, sample, wait_for, wait_metrics
from tests.support.services import RunningWorker, send_jobs
from worker.cli.run import fills_cpus
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.slow import SlowHandler


@pytest.fixture
def slow_sink(tmp_path: Path) -> Iterator[Sink]:
    running = Sink(tmp_path / "slow", handler=SlowHandler(tmp_path / "slow", delay_s=3.0))
    yield running
    running.stop()


def _ready_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker\.runtime\.process\[(\d+)\] worker process ready", output)]


def test_a_killed_worker_process_is_replaced_and_its_in_progress_gauge_dropped(
    own_queues: Settings, sink: Sink, slow_sink: Sink, make_tenant: Any, db: Connection
) -> None:
    quick = make_tenant()
    slow = make_tenant(
        smtp={"host": slow_sink.host, "port": slow_sink.port, "security": "none", "helo": "test.postbote"}
    )
    running = RunningWorker(own_queues, threads=1)
    in_progress = {"queue_name": queue_name(own_queues.queue_prefix, "documents")}
    try:
        wait_metrics(running.metrics_port)
        [first] = wait_for(lambda: _ready_pids(running.output()), what="a worker process")
        ids = send_jobs(
            own_queues,
            [make_job(quick, "offer", n, user_id="u1", to="k@example.com") for n in range(2)],
        )
        wait_final(db, ids)
        send_jobs(own_queues, [make_job(slow, "offer", 9, user_id="u1", to="k@example.com")])
        assert isinstance(slow_sink.handler, SlowHandler)
        assert slow_sink.handler.data_started.wait(30)
        before = http_get(running.metrics_port, "/metrics")[1]
        assert sample(before, DRAMATIQ_MESSAGES_IN_PROGRESS, **in_progress) == 1

        os.kill(first, signal.SIGKILL)

        wait_for(lambda: len(_ready_pids(running.output())) == 2, what="a replacement process")
        assert f"worker process {first} exited with -9; starting a new one" in running.output()
        text = wait_for(
            lambda: metrics_when(
                running.metrics_port, lambda t: sample(t, DRAMATIQ_MESSAGES_IN_PROGRESS, **in_progress) == 0
            ),
            what="the dead process's in-progress gauge gone",
        )
        assert sample(text, METRIC_MAILS_SENT, tenant=quick) == 2
    finally:
        running.stop()


def _thread_cpus(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of ``pid``."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_processes_are_pinned_by_default_only_when_they_fill_every_cpu() -> None:
    usable = len(os.sched_getaffinity(0))
    assert fills_cpus(usable)
    assert fills_cpus(usable + 1)
    assert not fills_cpus(usable - 1) or usable == 1


def test_processes_that_fill_every_cpu_are_pinned_without_being_asked(own_queues: Settings) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    running = RunningWorker(own_queues, processes=len(cpus), threads=2)
    try:
        pids = wait_for(
            lambda: p if len(p := _ready_pids(running.output())) == len(cpus) else None, what="the processes"
        )
        assert all(len(_thread_cpus(pid)) == 1 for pid in pids)
        placed = {next(iter(_thread_cpus(pid))) for pid in pids}
        assert placed == {frozenset({cpu}) for cpu in cpus}
    finally:
        running.stop()


def test_no_pin_cpus_leaves_the_processes_on_every_cpu(own_queues: Settings) -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    running = RunningWorker(own_queues, processes=len(cpus), threads=2, options=("--no-pin-cpus",))
    try:
        pids = wait_for(
            lambda: p if len(p := _ready_pids(running.output())) == len(cpus) else None, what="the processes"
        )
        assert all(_thread_cpus(pid) == {cpus} for pid in pids)
    finally:
        running.stop()


def test_pinned_worker_processes_run_on_a_cpu_each_and_a_replacement_on_the_dead_ones(
    own_queues: Settings,
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    running = RunningWorker(own_queues, processes=2, threads=2, options=("--pin-cpus",))
    try:
        pids = wait_for(
            lambda: p if len(p := _ready_pids(running.output())) == 2 else None, what="two processes"
        )
        placed = {pid: _thread_cpus(pid) for pid in pids}
        assert all(len(threads) == 1 for threads in placed.values())
        assert {cpu_set for threads in placed.values() for cpu_set in threads} == {
            frozenset({cpus[0]}),
            frozenset({cpus[1 % len(cpus)]}),
        }

        os.kill(pids[0], signal.SIGKILL)

        [replacement] = wait_for(
            lambda: r if len(r := _ready_pids(running.output())[2:]) == 1 else None, what="a replacement"
        )
        assert _thread_cpus(replacement) == placed[pids[0]]
    finally:
        running.stop()
