"""Fixtures: an own database and queue prefix per test run, the SMTP sink, tenants, a running worker.

The helpers the tests import live in ``tests/support/``.
"""

from __future__ import annotations

import gc
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import PostgresPair, RabbitmqCluster, kill_leftovers
from tests.support.faults import PrivatePostgres, PrivateRabbitmq
from tests.support.services import (
    BROKER_URL,
    SECRETS_DIR,
    RunningWorker,
    add_tenant,
    database_url,
    delete_queues,
    isolated_settings,
    secrets_key_file,
    tenant_policy,
)
from worker.db import Connection, connect, drop_database, ensure_database, upgrade
from worker.settings import Settings
from worker.testbed.sink import RecordingHandler, Sink, free_port
from worker.testbed.sink.slow import SlowHandler


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """Settings of this test run: its own database (migrated) and its own queue prefix."""
    token = uuid.uuid4().hex[:10]
    url = database_url(f"postbote_test_{token}")
    ensure_database(url)
    with connect(url) as conn:
        upgrade(conn)
    test_settings = Settings(
        broker_url=BROKER_URL,
        database_url=url,
        queue_prefix=f"pbtest-{token}",
        metrics_port=free_port(),
        settings_cache_ms=200,
        smtp_timeout_ms=5000,
        min_backoff_ms=200,
        max_backoff_ms=1000,
        secrets_key_file=secrets_key_file(),
        secrets_dir=SECRETS_DIR,
        token_helpers={"test-token": f"cat {SECRETS_DIR}/postbote-test-token-{token}"},
    )
    yield test_settings
    delete_queues(test_settings)
    drop_database(url)


@pytest.fixture
def own_queues(settings: Settings) -> Iterator[Settings]:
    """The run's settings with a queue prefix of this test's own, for tests that start their own workers."""
    isolated = isolated_settings(settings)
    yield isolated
    delete_queues(isolated)


@pytest.fixture
def db(settings: Settings) -> Iterator[Connection]:
    with connect(settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    running = Sink(tmp_path / "maildir")
    yield running
    running.stop()


@pytest.fixture
def faulty_sink(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    """Start a sink with the given handler class; stopped after the test."""
    started: list[Sink] = []

    def start(
        handler: type[RecordingHandler], smtp_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Sink:
        maildir = tmp_path / f"maildir-{len(started)}"
        sink = Sink(maildir, handler=handler(maildir, **options), **(smtp_kwargs or {}))
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()
    with warnings.catch_warnings():
        # aiosmtpd leaves the server side of a failed STARTTLS handshake for the collector.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def make_tenant(settings: Settings, sink: Sink, tmp_path: Path) -> Callable[..., str]:
    """Create a tenant sending to the test's sink; returns its id (unique per test)."""

    def make(**fields: Any) -> str:
        return add_tenant(settings.database_url, sink, tmp_path, policy=tenant_policy(settings), **fields)

    return make


@pytest.fixture(scope="session")
def worker(settings: Settings) -> Iterator[RunningWorker]:
    """One worker for the run's ordinary end-to-end tests."""
    running = RunningWorker(settings, processes=1, threads=4)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[PrivateRabbitmq]:
    """A private RabbitMQ node for the fault tests of one module (restarted, stopped at will)."""
    node = PrivateRabbitmq()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL cluster for the fault tests of one module."""
    cluster = PrivatePostgres()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def rabbitmq_cluster() -> Iterator[RabbitmqCluster]:
    """Three private RabbitMQ nodes joined into a cluster, for the high-availability tests
    (``-m ha``); what an earlier, crashed run left behind is killed first."""
    kill_leftovers()
    cluster = RabbitmqCluster(3)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def ha_ledger(rabbitmq_cluster: RabbitmqCluster) -> Iterator[PostgresPair]:
    """A private PostgreSQL (with an asynchronous standby) for the ledger of the high-availability
    tests that break RabbitMQ; started after the cluster, which kills leftovers first."""
    pair = PostgresPair(synchronous=False)
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture
def ha_sink(tmp_path: Path) -> Iterator[Sink]:
    """A sink taking 20 ms per mail, so that jobs are in flight when something fails."""
    running = Sink(tmp_path / "maildir", handler=SlowHandler(tmp_path / "maildir", delay_s=0.02))
    yield running
    running.stop()
