"""``postbote queues migrate --to quorum`` moves an installation's classic queues to quorum queues
under load: messages waiting in the work and delay queues. While a publisher is still sending it
is refused with nothing changed; once the publishers stop it goes through. No job is lost and
none is sent twice. On the private RabbitMQ cluster, the ledger on a private PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas.constants import lane_queues
from tests.support.cluster import PostgresPair, RabbitmqCluster, ha_settings, publish_jobs, wait_received
from tests.support.faults import assert_sent_once_or_dead
from tests.support.services import RunningWorker, add_tenant, postbote
from worker.db import connect
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules
from worker.tools.queues import MIGRATING_SUFFIX

pytestmark = pytest.mark.ha

BEFORE = 150
AFTER = 20
CUSTOMERS = 1000
GREYLISTED = "451 4.7.1 greylisted, try again later"


@pytest.fixture
def greylisting_sink(tmp_path: Path) -> Iterator[Sink]:
    """Greylists every tenth customer once, so retries wait in the delay queue."""
    rules = {f"kunde{n}@example.com": [GREYLISTED, None] for n in range(0, CUSTOMERS, 10)}
    sink = Sink(tmp_path / "maildir", handler=RecipientRules(tmp_path / "maildir", rules=rules))
    yield sink
    sink.stop()


def queue_types(cluster: RabbitmqCluster, settings: Settings) -> dict[str, str]:
    found = cluster.queues()
    names = [n for lane in lane_queues(settings.queue_prefix) for n in (lane, f"{lane}.DQ", f"{lane}.XQ")]
    return {name: found[name][0] for name in names}


def test_migrating_to_quorum_under_load_loses_no_job_and_sends_none_twice(
    rabbitmq_cluster: RabbitmqCluster, ha_ledger: PostgresPair, greylisting_sink: Sink, tmp_path: Path
) -> None:
    classic = ha_settings(
        rabbitmq_cluster.url,
        ha_ledger.url("postbote_ha_migrate"),
        queue_type="classic",
        min_backoff_ms=3000,
        max_backoff_ms=5000,
    )
    quorum = classic.model_copy(update={"queue_type": "quorum"})
    tenant = add_tenant(classic.database_url, greylisting_sink, tmp_path)

    def job(n: int) -> dict[str, object]:
        return make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com")

    ids = publish_jobs(classic, [job(n) for n in range(BEFORE)])
    worker = RunningWorker(classic, processes=1, threads=4)
    try:
        wait_received(greylisting_sink.handler, BEFORE // 3)
        refused = postbote(classic, "queues", "migrate", "--to", "quorum")
        assert refused.returncode == 1 and "stop the workers first" in refused.stderr, refused
    finally:
        assert worker.stop() == 0

    dry = postbote(classic, "queues", "migrate", "--to", "quorum", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "to become quorum" in dry.stdout and "nothing was changed" in dry.stdout
    assert set(queue_types(rabbitmq_cluster, classic).values()) == {"classic"}

    # A publisher still sending: refused before anything changed, nothing lost.
    published: list[str] = []
    sending, done = threading.Event(), threading.Event()

    def publish_during() -> None:
        while not done.is_set():
            first = BEFORE + len(published)
            published.extend(publish_jobs(classic, [job(k) for k in range(first, first + 5)]))
            sending.set()
            time.sleep(0.25)

    publisher = threading.Thread(target=publish_during)
    publisher.start()
    try:
        assert sending.wait(30), "the publisher did not get going"
        refused = postbote(classic, "queues", "migrate", "--to", "quorum", "--quiet-seconds", "60")
    finally:
        done.set()
        publisher.join(timeout=60)
    assert refused.returncode == 1 and "stop every publisher" in refused.stderr, refused
    assert set(queue_types(rabbitmq_cluster, classic).values()) == {"classic"}
    assert not [q for q in rabbitmq_cluster.queues() if q.endswith(MIGRATING_SUFFIX)]

    migrated = postbote(classic, "queues", "migrate", "--to", "quorum")
    assert migrated.returncode == 0, migrated.stderr
    assert "now quorum" in migrated.stdout and "POSTBOTE_QUEUE_TYPE=quorum" in migrated.stdout
    first = BEFORE + len(published)
    published.extend(publish_jobs(quorum, [job(k) for k in range(first, first + AFTER)]))
    assert set(queue_types(rabbitmq_cluster, classic).values()) == {"quorum"}
    assert not [q for q in rabbitmq_cluster.queues() if q.endswith(MIGRATING_SUFFIX)]

    worker = RunningWorker(quorum, processes=1, threads=4)
    try:
        with connect(quorum.database_url, autocommit=True) as db:
            rows = assert_sent_once_or_dead(db, ids + published, greylisting_sink.handler, timeout=120)
        assert {r["status"] for r in rows.values()} == {"sent"}
    finally:
        worker.stop()
