"""A three-node RabbitMQ cluster with quorum queues: the node leading the documents queue is killed
(``kill -9`` of its Erlang VM) mid-run and started again later. Sending resumes within seconds on
the surviving nodes, and every job ends sent exactly once (a second copy only where the ledger
counted a takeover: the documented duplicate window). The ledger is a private PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pika
import pytest

from schemas.constants import DOCUMENTS_QUEUE, queue_name
from tests.support.cluster import (
    PostgresPair,
    RabbitmqCluster,
    ha_settings,
    longest_pause,
    publish_jobs,
    wait_received,
)
from tests.support.faults import assert_sent_once_or_dead, copies_received
from tests.support.services import RunningWorker, add_tenant
from worker.db import connect
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink

pytestmark = pytest.mark.ha

JOBS = 400
"""bench/ha_failover.py runs the same with 3,000."""
RECOVERY_LIMIT_S = 30


def test_killing_the_node_that_leads_the_documents_queue_loses_nothing_and_sends_nothing_twice(
    rabbitmq_cluster: RabbitmqCluster, ha_ledger: PostgresPair, ha_sink: Sink, tmp_path: Path
) -> None:
    own = ha_settings(rabbitmq_cluster.url, ha_ledger.url("postbote_ha_rabbitmq"))
    tenant = add_tenant(own.database_url, ha_sink, tmp_path)
    jobs = [make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com") for n in range(JOBS)]
    ids = publish_jobs(own, jobs)
    lane = queue_name(own.queue_prefix, DOCUMENTS_QUEUE)
    assert rabbitmq_cluster.queues()[lane][0] == "quorum"
    leader = rabbitmq_cluster.leader_of(lane)

    worker = RunningWorker(own, processes=2, threads=4)
    restarted = threading.Thread(target=leader.start)
    try:
        wait_received(ha_sink.handler, JOBS // 4)
        killed_at = time.time()
        leader.kill()
        wait_received(ha_sink.handler, JOBS // 2)
        assert rabbitmq_cluster.leader_of(lane) is not leader
        restarted.start()  # brought back while the rest is sent
        stalled_s = longest_pause(ha_sink.handler, killed_at, killed_at + 60)
        assert stalled_s < RECOVERY_LIMIT_S, worker.output()

        with connect(own.database_url, autocommit=True) as db:
            rows = assert_sent_once_or_dead(db, ids, ha_sink.handler, timeout=180, possible_duplicates=True)
        assert {r["status"] for r in rows.values()} == {"sent"}
        duplicates = sum(c - 1 for c in copies_received(ha_sink.handler).values() if c > 1)
        takeovers = sum(r["takeovers"] for r in rows.values())
        assert duplicates <= takeovers
        print(f"sending stalled {stalled_s:.2f} s after the leader's kill; duplicates {duplicates}")
    finally:
        worker.stop()
        if restarted.ident is not None:
            restarted.join(timeout=120)
    assert leader in rabbitmq_cluster.alive()
    connection = pika.BlockingConnection(pika.URLParameters(leader.url))
    try:
        assert connection.channel().queue_declare(lane, passive=True).method.message_count == 0
    finally:
        connection.close()
