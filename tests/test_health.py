"""Probes: /healthz says the worker lives, /readyz and `postbote check` whether broker and database answer."""

from __future__ import annotations

from tests.support.observe import http_get, wait_for
from tests.support.services import RunningWorker, postbote
from worker.settings import Settings
from worker.testbed.sink import free_port


def test_healthz_answers_while_the_worker_runs(worker: RunningWorker) -> None:
    status, body = wait_for(lambda: http_get(worker.metrics_port, "/healthz"), what="/healthz")
    assert (status, body) == (200, "ok\n")


def test_readyz_is_ready_when_broker_and_database_answer(worker: RunningWorker) -> None:
    status, body = wait_for(lambda: http_get(worker.metrics_port, "/readyz"), what="/readyz")
    assert (status, body) == (200, "ready\n")


def test_readyz_is_503_naming_the_database_when_it_cannot_be_reached(settings: Settings) -> None:
    closed = free_port()
    running = RunningWorker(
        settings, threads=1, database_url=f"postgresql://postgres:s3cret@127.0.0.1:{closed}/postbote"
    )
    try:
        status, body = wait_for(lambda: http_get(running.metrics_port, "/readyz"), what="/readyz")
        assert status == 503
        assert "database unreachable" in body
        assert str(closed) in body
        assert "s3cret" not in body
        assert http_get(running.metrics_port, "/healthz")[0] == 200
    finally:
        running.stop()


def test_other_paths_are_404(worker: RunningWorker) -> None:
    status, _ = wait_for(lambda: http_get(worker.metrics_port, "/nothing-here"), what="an answer")
    assert status == 404


def test_check_exits_0_when_broker_and_database_answer(settings: Settings) -> None:
    result = postbote(settings, "check")
    assert result.returncode == 0, result.stderr
    reachable, role = result.stdout.splitlines()[:2]
    assert reachable == "broker and database reachable"
    assert role.startswith("database role: ")


def test_check_exits_1_naming_an_unreachable_database_without_a_traceback(settings: Settings) -> None:
    closed = free_port()
    result = postbote(
        settings, "check", database_url=f"postgresql://postgres:s3cret@127.0.0.1:{closed}/postbote"
    )
    assert result.returncode == 1
    assert result.stderr.startswith("postbote: database unreachable")
    assert str(closed) in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr + result.stdout


def test_check_exits_1_naming_an_unreachable_broker_without_a_traceback(settings: Settings) -> None:
    closed = free_port()
    result = postbote(settings, "check", broker_url=f"amqp://guest:s3cret@127.0.0.1:{closed}/%2F")
    assert result.returncode == 1
    assert result.stderr.startswith(f"postbote: RabbitMQ at 127.0.0.1:{closed} unreachable")
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
