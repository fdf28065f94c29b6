"""Series limits under load: real workers against the aiosmtpd sink.

    python bench/series.py [--processes 4] [--threads 8] [--backlog 5000]

Prints, per scenario: series violations (split arrivals wherever the gap is at
least ``pause_ms``; a chunk holding more than ``batch_size`` mails is a
violation), the achieved rate as a share of the ceiling ``batch_size / pause``,
receipt latency p50/p95 while the backlog of dunning letters is queued for the
same tenant, and SMTP connections opened per 1,000 mails.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402

from bench.harness import apply_tenant, bench_settings, machine, percentile, start_workers, stop  # noqa: E402
from producer import publish  # noqa: E402
from producer.queues import delete_queues  # noqa: E402
from schemas.constants import lane_queues  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.testbed.documents import make_job  # noqa: E402
from worker.testbed.sink import RecordingHandler, Sink  # noqa: E402


class ArrivalHandler(RecordingHandler):
    """Keeps arrival time and job id of each message in memory; writes nothing to disk."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.arrivals: list[tuple[float, str, str]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        arrived = time.time()
        data = envelope.original_content or b""
        match = re.search(rb"X-Postbote-Job: ([0-9a-f-]+)", data)
        kind = "receipt" if b"X-Postbote-Document: receipt" in data else "bulk"
        self.arrivals.append((arrived, match.group(1).decode() if match else "", kind))
        return "250 2.0.0 Ok"


def small_job(tenant: str, doc_type: str, n: int) -> Job:
    job = make_job(tenant, doc_type, n, user_id="u1", to=f"kunde{n:05d}@example.com")
    job["attachments"] = []
    return Job.model_validate(job)


def violations(arrivals: list[float], batch_size: int, pause_ms: int) -> tuple[int, int]:
    """(oversized chunks, chunks)."""
    chunks: list[int] = []
    last = None
    for t in sorted(arrivals):
        if last is not None and (t - last) * 1000 < pause_ms:
            chunks[-1] += 1
        else:
            chunks.append(1)
        last = t
    return sum(1 for c in chunks if c > batch_size), len(chunks)


def connections_opened(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("postbote_smtp_connections_opened_total{")
    )


def scenario(
    settings: Settings,
    sink: Sink,
    args: argparse.Namespace,
    workdir: Path,
    *,
    name: str,
    batch_size: int,
    pause_ms: int,
    backlog: int,
    receipts: int,
) -> dict[str, Any]:
    handler = sink.handler
    assert isinstance(handler, ArrivalHandler)
    handler.arrivals.clear()
    tenant = f"{name}"
    apply_tenant(
        settings,
        {
            "id": tenant,
            "smtp": {"host": "127.0.0.1", "port": sink.port, "security": "none", "max_connections": 8},
            "series": {"batch_size": batch_size, "pause_ms": pause_ms},
            "employees": [{"id": "u1", "email": "anna@acme.example"}],
        },
        workdir,
    )
    prefix = f"{settings.queue_prefix}-{name}"
    scenario_settings = settings.model_copy(update={"queue_prefix": prefix})
    publish(
        [small_job(tenant, "dunning", n) for n in range(backlog)],
        broker_url=settings.broker_url,
        queue_prefix=prefix,
    )
    worker = start_workers(
        scenario_settings, processes=args.processes, threads=args.threads, log=workdir / f"{name}.log"
    )
    published: dict[str, float] = {}

    def send_receipts() -> None:
        time.sleep(3)
        for n in range(receipts):
            job = small_job(tenant, "receipt", 100000 + n)
            published[str(job.job_id)] = time.time()
            publish([job], broker_url=settings.broker_url, queue_prefix=prefix)
            time.sleep(0.25)

    sender = threading.Thread(target=send_receipts)
    sender.start()
    deadline = time.monotonic() + 600
    while len(handler.arrivals) < backlog + receipts and time.monotonic() < deadline:
        time.sleep(0.2)
    sender.join()
    opened = connections_opened(scenario_settings.metrics_port)
    stop(worker)
    delete_queues(settings.broker_url, lane_queues(prefix))
    arrivals = sorted(a[0] for a in handler.arrivals)
    # the rate over the steady part: from the 10th to the last arrival
    span = arrivals[-1] - arrivals[min(9, len(arrivals) - 1)]
    rate = (len(arrivals) - 10) / span if span > 0 else float("nan")
    latencies = [
        (t - published[job_id]) * 1000
        for t, job_id, kind in handler.arrivals
        if kind == "receipt" and job_id in published
    ]
    bad, chunks = violations(arrivals, batch_size, pause_ms) if pause_ms else (0, 1)
    return {
        "name": name,
        "batch": batch_size,
        "pause": pause_ms,
        "mails": len(arrivals),
        "rate": rate,
        "ceiling": batch_size / (pause_ms / 1000) if pause_ms else float("nan"),
        "violations": bad,
        "series": chunks,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "per_1000": opened * 1000 / max(1, len(arrivals)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--backlog", type=int, default=5000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="postbote-series-"))
    results = []
    with bench_settings(settings_cache_ms=1000) as settings:
        handler = ArrivalHandler(workdir / "maildir")
        sink = Sink(workdir / "maildir", handler=handler)
        try:
            results.append(
                scenario(
                    settings,
                    sink,
                    args,
                    workdir,
                    name="series20x200",
                    batch_size=20,
                    pause_ms=200,
                    backlog=args.backlog,
                    receipts=40,
                )
            )
            results.append(
                scenario(
                    settings,
                    sink,
                    args,
                    workdir,
                    name="unthrottled",
                    batch_size=1000,
                    pause_ms=0,
                    backlog=min(args.backlog, 3000),
                    receipts=20,
                )
            )
        finally:
            sink.stop()
    print(f"\n{machine()}")
    print(
        f"{args.processes} worker processes × {args.threads} threads (+2 receipt threads each), aiosmtpd sink"
    )
    print(
        f"{'scenario':14}{'mails':>7}{'series':>8}{'violations':>11}{'mails/s':>9}{'of ceiling':>11}"
        f"{'receipt p50':>12}{'p95 ms':>8}{'conn/1000':>10}"
    )
    for r in results:
        share = r["rate"] / r["ceiling"] if r["pause"] else float("nan")
        share_text = f"{share:.2f}" if r["pause"] else "—"
        print(
            f"{r['name']:14}{r['mails']:7d}{r['series']:8d}{r['violations']:11d}{r['rate']:9.1f}{share_text:>11}"
            f"{r['p50']:12.0f}{r['p95']:8.0f}{r['per_1000']:10.1f}"
        )
    return 0 if all(r["violations"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
