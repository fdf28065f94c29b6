"""Our own infrastructure fails mid-run: RabbitMQ restarts, PostgreSQL goes away for a while.
Every accepted job still ends sent exactly once to each recipient, with the clerk in CC, the archive
copy and a greylisted customer in the mix. Both run against private instances, never the
machine's shared ones."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.faults import PrivatePostgres, PrivateRabbitmq, assert_sent_once_or_dead
from tests.support.services import RunningWorker, add_tenant, delete_queues, isolated_settings, send_jobs
from worker.db import connect, ensure_database, upgrade
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

GREYLISTED = "451 4.7.1 greylisted, try again later"


class SlowGreylisting(RecipientRules):
    """Greylists each job's second customer once, and takes 50 ms per message."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir, rules={f"grau{n}@example.com": [GREYLISTED, None] for n in range(100)})

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        await asyncio.sleep(0.05)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def slow_sink(tmp_path: Path) -> Iterator[Sink]:
    sink = Sink(tmp_path / "maildir", handler=SlowGreylisting(tmp_path / "maildir"))
    yield sink
    sink.stop()


def greylisting_tenant(database_url: str, sink: Sink, tmp_path: Path) -> str:
    """A tenant as the settings page makes them: archive copy and the clerk in CC."""
    return add_tenant(
        database_url,
        sink,
        tmp_path,
        archive_bcc="archiv@acme.example",
        cc_clerk=True,
        employees=[{"id": "u1", "email": "anna@acme.example"}, {"id": "u2", "email": "bernd@acme.example"}],
    )


def jobs(tenant: str, count: int) -> list[dict[str, Any]]:
    """Invoices as the settings page's tenants send them: the clerk in CC, an archive copy, and a
    second customer whose server greylists the first attempt."""
    return [
        {
            **make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com", clerk_id="u2"),
            "to": [f"kunde{n}@example.com", f"grau{n}@example.com"],
        }
        for n in range(count)
    ]


def wait_received(sink: Sink, count: int, worker: RunningWorker, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(sink.handler.received) < count:
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.02)


def test_rabbitmq_restarted_mid_run_loses_nothing_and_sends_nothing_twice(
    settings: Settings, rabbitmq: PrivateRabbitmq, slow_sink: Sink, make_tenant: Any, tmp_path: Path
) -> None:
    own = isolated_settings(settings, broker_url=rabbitmq.url, min_backoff_ms=100, max_backoff_ms=500)
    ids = send_jobs(own, jobs(greylisting_tenant(own.database_url, slow_sink, tmp_path), 40))
    worker = RunningWorker(own, processes=1, threads=4)
    try:
        wait_received(slow_sink, 8, worker)
        rabbitmq.stop_app()
        time.sleep(2)
        rabbitmq.start_app()
        with connect(own.database_url, autocommit=True) as db:
            rows = assert_sent_once_or_dead(db, ids, slow_sink.handler, timeout=120)
        assert {r["status"] for r in rows.values()} == {"sent"}
    finally:
        worker.stop()


def test_postgresql_unreachable_for_a_while_loses_nothing_and_sends_nothing_twice(
    settings: Settings, postgres: PrivatePostgres, slow_sink: Sink, tmp_path: Path
) -> None:
    own = isolated_settings(
        settings,
        database_url=postgres.url("postbote_outage"),
        smtp_timeout_ms=1000,
        min_backoff_ms=100,
        max_backoff_ms=500,
    )
    ensure_database(own.database_url)
    with connect(own.database_url) as conn:
        upgrade(conn)
    ids = send_jobs(own, jobs(greylisting_tenant(own.database_url, slow_sink, tmp_path), 40))
    worker = RunningWorker(own, processes=1, threads=4)
    try:
        wait_received(slow_sink, 8, worker)
        postgres.stop()
        time.sleep(4)
        postgres.start()
        with connect(own.database_url, autocommit=True) as db:
            rows = assert_sent_once_or_dead(db, ids, slow_sink.handler, timeout=120)
        assert {r["status"] for r in rows.values()} == {"sent"}
        assert "database" in worker.output()
    finally:
        worker.stop()
        delete_queues(own)
