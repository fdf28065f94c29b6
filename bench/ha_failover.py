"""Failover figures for docs/high-availability.md: 3,000 jobs in flight while the infrastructure
fails the unclean way, on clusters of this machine's own (``tests/support/cluster.py``).

- ``rabbitmq``: three RabbitMQ nodes, quorum queues; the node leading the documents queue is
  killed (``kill -9``) and started again later.
- ``postgres-sync`` / ``postgres-async``: a primary with a synchronous / asynchronous standby; the
  primary is killed (every process, ``kill -9``) and the standby promoted.
- ``postgres-async-behind``: the same asynchronous pair, with the standby 1 s behind when the
  primary dies (its WAL receiver stopped for that long: a slow link, a busy standby).
- ``postgres-frozen``: the primary is stopped (``kill -STOP``: sockets open, nothing answers) and
  the standby promoted.

For each: the longest time without a mail arriving after the failure (what a user sees), the
duplicates the sink received, the ledger's takeovers, jobs whose mail arrived but whose ledger row
did not end ``sent`` (a lost mark), jobs whose mail never arrived, series broken, and how much WAL
the standby lacked. Run as root (the clusters run as the ``rabbitmq`` and ``postgres`` users),
never together with ``make test-ha`` (each kills the clusters the other left):

    .venv/bin/python bench/ha_failover.py [--jobs 3000] [--runs 1] [--only rabbitmq,postgres-async]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.cluster import (  # noqa: E402
    PostgresPair,
    RabbitmqCluster,
    ha_settings,
    kill_leftovers,
    longest_pause,
    publish_jobs,
    settled_statuses,
    wait_received,
)
from tests.support.faults import copies_received  # noqa: E402
from tests.support.ratelimit import oversized  # noqa: E402
from tests.support.services import RunningWorker, add_tenant  # noqa: E402
from worker.db import connect  # noqa: E402
from worker.testbed.documents import make_job  # noqa: E402
from worker.testbed.sink import Sink  # noqa: E402
from worker.testbed.sink.slow import SlowHandler  # noqa: E402

BATCH_SIZE = 50
PAUSE_MS = 300
SCENARIOS = ("rabbitmq", "postgres-sync", "postgres-async", "postgres-async-behind", "postgres-frozen")
BEHIND_S = 1.0
"""``postgres-async-behind``: how long the standby's WAL receiver is stopped before the primary dies."""


def run(scenario: str, cluster: RabbitmqCluster, jobs: int, workdir: Path) -> dict[str, Any]:
    pair = PostgresPair(synchronous=not scenario.startswith("postgres-async"))
    sink = Sink(workdir / "maildir", handler=SlowHandler(workdir / "maildir", delay_s=0.02))
    try:
        own = ha_settings(
            cluster.url,
            pair.url("postbote_bench_ha"),
            statement_timeout_ms=2000,
            smtp_timeout_ms=2000,
            series_max_wait_ms=1000,
            series_lease_ms=3000,
        )
        series = scenario in ("postgres-sync", "postgres-async", "postgres-async-behind")
        limits = (
            {"batch_size": BATCH_SIZE, "pause_ms": PAUSE_MS}
            if series
            else {"batch_size": 1000, "pause_ms": 0}
        )
        tenant = add_tenant(own.database_url, sink, workdir, series=limits)
        ids = publish_jobs(
            own,
            [make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com") for n in range(jobs)],
        )
        worker = RunningWorker(own, processes=2, threads=4)
        started = time.monotonic()
        try:
            wait_received(sink.handler, jobs // 3, timeout=600)
            lag = _replication_lag(pair) if scenario.startswith("postgres") else None
            failed_at = time.time()
            restart: threading.Thread | None = None
            if scenario == "rabbitmq":
                leader = cluster.leader_of(f"{own.queue_prefix}.documents")
                leader.kill()
                restart = threading.Thread(target=lambda: (time.sleep(5), leader.start()))
                restart.start()
            elif scenario == "postgres-frozen":
                pair.freeze_primary()
                pair.promote()
            elif scenario == "postgres-async-behind":
                resume = pair.hold_replication()
                time.sleep(BEHIND_S)
                lag = _replication_lag(pair)
                pair.kill_primary()
                resume()
                pair.promote()
            else:
                pair.kill_primary()
                pair.promote()
            with connect(own.database_url, autocommit=True) as db:
                statuses = settled_statuses(db, ids, quiet_s=20, timeout=900)
            total_s = time.monotonic() - started
            if restart is not None:
                restart.join()
        finally:
            worker.stop()
        copies = copies_received(sink.handler)
        arrived = {job for job, _ in copies}
        arrivals = [r.arrived_at for r in sink.handler.received]
        with connect(own.database_url, autocommit=True) as db:
            takeovers = db.execute(
                "SELECT coalesce(sum(takeovers), 0) AS n FROM deliveries WHERE job_id = ANY(%s::uuid[])",
                (ids,),
            ).fetchone()
        return {
            "scenario": scenario,
            "jobs": jobs,
            "stall_s": round(longest_pause(sink.handler, failed_at), 2),
            "duplicates": sum(c - 1 for c in copies.values() if c > 1),
            "takeovers": int(takeovers["n"]) if takeovers else 0,
            "lost_marks": sum(1 for j in arrived if statuses.get(j) != "sent"),
            "not_arrived": len(set(ids) - arrived),
            "oversized_series": len(oversized(arrivals, batch_size=BATCH_SIZE, pause_ms=PAUSE_MS // 2))
            if series
            else None,
            "total_s": round(total_s, 1),
            "lag_before_failure": lag,
        }
    finally:
        sink.stop()
        pair.close()


def _replication_lag(pair: PostgresPair) -> dict[str, float] | None:
    """How far the standby was behind just before the failure: WAL bytes sent but not yet flushed
    there, and PostgreSQL's flush and replay lag (the commits an asynchronous failover may lose)."""
    rows = pair.primary.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::float8,"
        " coalesce(extract(epoch FROM flush_lag) * 1000, 0)::float8,"
        " coalesce(extract(epoch FROM replay_lag) * 1000, 0)::float8 FROM pg_stat_replication"
    )
    if not rows:
        return None
    unflushed, flush_ms, replay_ms = (float(str(v)) for v in rows[0])
    return {
        "unflushed_bytes": unflushed,
        "flush_lag_ms": round(flush_ms, 3),
        "replay_lag_ms": round(replay_ms, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    args = parser.parse_args()
    kill_leftovers()
    cluster = RabbitmqCluster(3)
    results = []
    try:
        for scenario in args.only.split(","):
            for _ in range(args.runs):
                with tempfile.TemporaryDirectory() as workdir:
                    result = run(scenario, cluster, args.jobs, Path(workdir))
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        cluster.close()
    print(
        "| scenario | jobs | longest stall | duplicates | takeovers | lost sent marks | mails lost"
        " | over-full series | standby behind at the failure |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        series = "–" if r["oversized_series"] is None else r["oversized_series"]
        print(
            f"| {r['scenario']} | {r['jobs']} | {r['stall_s']} s | {r['duplicates']} | {r['takeovers']} |"
            f" {r['lost_marks']} | {r['not_arrived']} | {series} | {_lag_text(r['lag_before_failure'])} |"
        )
    return 0


def _lag_text(lag: dict[str, float] | None) -> str:
    if lag is None:
        return "–"
    return f"{lag['unflushed_bytes']:.0f} B of WAL, flush lag {lag['flush_lag_ms']} ms"


if __name__ == "__main__":
    sys.exit(main())
