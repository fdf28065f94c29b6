"""A real Prometheus scrapes a worker of two processes and counts exactly the mails that were sent."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from tests.support.ledger import wait_final
from tests.support.observe import http_get, wait_for, wait_metrics
from tests.support.services import RunningWorker, send_jobs
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import free_port

PROMETHEUS = "/usr/bin/prometheus"

Query = Callable[[str], list[dict[str, Any]]]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Query]]:
    """Start Prometheus scraping ``127.0.0.1:<port>`` every second; returns a PromQL query function."""
    started: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []

    def start(metrics_port: int) -> Query:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {
                            "job_name": "postbote",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                        }
                    ],
                }
            )
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        logs.append(log)
        started.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait_for(lambda: http_get(port, "/-/ready", timeout=2)[0] == 200, what="Prometheus ready")

        def query(promql: str) -> list[dict[str, Any]]:
            status, body = http_get(port, "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
            assert status == 200, body
            result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
            return result

        return query

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for log in logs:
        log.close()


def test_prometheus_counts_every_sent_mail_across_two_worker_processes(
    own_queues: Settings, make_tenant: Any, db: Connection, prometheus: Callable[[int], Query]
) -> None:
    tenant = make_tenant()
    running = RunningWorker(own_queues, processes=2, threads=2, queue_stats_interval_ms=500)
    try:
        wait_metrics(running.metrics_port)
        wait_for(lambda: running.output().count("worker process ready") == 2, what="two worker processes")
        query = prometheus(running.metrics_port)
        jobs = [make_job(tenant, "order", n, user_id="u1", to=f"kunde{n}@example.com") for n in range(20)]
        ids = send_jobs(own_queues, jobs)
        wait_final(db, ids)

        sent = f'sum(postbote_mails_sent_total{{tenant="{tenant}"}})'
        result = wait_for(
            lambda: [r for r in query(sent) if r["value"][1] == "20"],
            timeout=30,
            what="20 sent in Prometheus",
        )
        assert len(result) == 1
        assert query('up{job="postbote"}')[0]["value"][1] == "1"
        for queue in ("documents", "receipts", "dead"):
            series = wait_for(lambda q=queue: query(f'postbote_queue_messages{{queue="{q}"}}'), what=queue)
            assert len(series) == 1, f"the {queue} queue must be reported once, not per process"
    finally:
        running.stop()
    senders = set(re.findall(r"postbote\.outcome\[(\d+)\] job sent", running.output()))
    assert len(senders) == 2, "both processes must have sent, or the sum proves nothing"
