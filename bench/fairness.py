"""A throttled tenant's backlog beside another tenant's invoices: real workers, two aiosmtpd sinks.

    python bench/fairness.py [--backlog 5000] [--invoices 100] [--batch 30] [--pause-ms 60000]

Tenant A (Microsoft 365-like: ``batch`` mails, then ``pause_ms`` of silence) has ``backlog``
dunning letters queued; then tenant B publishes ``invoices`` invoices, one every 50 ms. Prints
B's latency from publication to arrival (p50/p95/max), how many of A's letters went out
meanwhile, how many MAIL FROM commands A's server saw per accepted mail, A's parked jobs, and
what the workers and PostgreSQL spent while A's backlog waited (CPU seconds per minute).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.smtp import SMTP, Envelope, Session  # noqa: E402

from bench.harness import (  # noqa: E402
    apply_tenant,
    bench_settings,
    cpu_seconds,
    machine,
    percentile,
    process_tree,
    service_pids,
    start_workers,
    stop,
)
from producer import publish  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.db import connect  # noqa: E402
from worker.testbed.documents import make_job  # noqa: E402
from worker.testbed.sink import RecordingHandler, Sink  # noqa: E402


class CountingHandler(RecordingHandler):
    """Counts MAIL commands and keeps each arrival's time and subject line; writes nothing."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.mail_from = 0
        self.arrivals: list[tuple[float, str]] = []

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.mail_from += 1
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        data = envelope.original_content or b""
        start = data.find(b"X-Postbote-Job: ")
        job = data[start + 16 : start + 52].decode() if start >= 0 else ""
        self.arrivals.append((time.time(), job))
        return "250 2.0.0 Ok"


def small_job(tenant: str, doc_type: str, n: int) -> Job:
    job = make_job(tenant, doc_type, n, user_id="u1", to=f"kunde{n:05d}@example.com")
    job["attachments"] = []
    return Job.model_validate(job)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=5000)
    parser.add_argument("--invoices", type=int, default=100)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--pause-ms", type=int, default=60_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--watch-s", type=float, default=150.0, help="how long to watch A's backlog afterwards"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="postbote-fairness-"))
    with bench_settings(settings_cache_ms=1000) as settings:
        sinks = {name: Sink(workdir / name, handler=CountingHandler(workdir / name)) for name in ("a", "b")}
        try:
            for name, series in (("a", {"batch_size": args.batch, "pause_ms": args.pause_ms}), ("b", {})):
                apply_tenant(
                    settings,
                    {
                        "id": f"tenant-{name}",
                        "smtp": {"host": "127.0.0.1", "port": sinks[name].port, "security": "none"},
                        "series": series or {"batch_size": 1000, "pause_ms": 0},
                        "employees": [{"id": "u1", "email": "anna@acme.example"}],
                    },
                    workdir,
                )
            publish(
                [small_job("tenant-a", "dunning", n) for n in range(args.backlog)],
                broker_url=settings.broker_url,
                queue_prefix=settings.queue_prefix,
            )
            worker = start_workers(
                settings, processes=args.processes, threads=args.threads, log=workdir / "worker.log"
            )
            published: dict[str, float] = {}

            def send_invoices() -> None:
                time.sleep(2)
                for n in range(args.invoices):
                    job = small_job("tenant-b", "invoice", n)
                    published[str(job.job_id)] = time.time()
                    publish([job], broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
                    time.sleep(0.05)

            sender = threading.Thread(target=send_invoices)
            sender.start()
            b = sinks["b"].handler
            a = sinks["a"].handler
            assert isinstance(a, CountingHandler) and isinstance(b, CountingHandler)
            deadline = time.monotonic() + 300
            while len(b.arrivals) < args.invoices and time.monotonic() < deadline:
                time.sleep(0.1)
            sender.join()
            a_during = len(a.arrivals)
            pids = process_tree(worker.pid)
            pg = service_pids("postgres")
            cpu_before = {pid: cpu_seconds([pid]) for pid in [*pids, *pg]}
            watch_started = time.monotonic()
            time.sleep(args.watch_s)
            watched_min = (time.monotonic() - watch_started) / 60
            # Processes that ended meanwhile (a PostgreSQL backend) are left out of both readings.
            spent = {
                pid: cpu_seconds([pid]) - before
                for pid, before in cpu_before.items()
                if Path(f"/proc/{pid}").exists()
            }
            worker_cpu = sum(spent.get(pid, 0.0) for pid in pids) / watched_min
            pg_cpu = sum(spent.get(pid, 0.0) for pid in pg) / watched_min
            with connect(settings.database_url) as conn:
                row = conn.execute(
                    "SELECT count(*) AS n FROM parked_jobs WHERE tenant_id = 'tenant-a' AND released_at IS NULL"
                ).fetchone()
            parked = int(row["n"]) if row else 0
            stop(worker)
        finally:
            for sink in sinks.values():
                sink.stop()
    latencies = [(t - published[j]) * 1000 for t, j in b.arrivals if j in published]
    print(f"machine: {machine()}")
    print(
        f"tenant A: batch {args.batch} / pause {args.pause_ms} ms, {args.backlog} letters queued;"
        f" tenant B: {args.invoices} invoices, one every 50 ms"
    )
    print(f"{'B invoices sent':34} {len(latencies)} of {args.invoices}")
    print(
        f"{'B latency p50 / p95 / max (ms)':34} {percentile(latencies, 50):.0f} / {percentile(latencies, 95):.0f}"
        f" / {max(latencies):.0f}"
    )
    print(f"{'A letters sent meanwhile':34} {a_during}")
    print(f"{'A letters sent in all':34} {len(a.arrivals)}")
    print(f"{'A MAIL FROM per accepted mail':34} {a.mail_from / max(1, len(a.arrivals)):.2f}")
    print(f"{'A jobs parked at the end':34} {parked}")
    print(f"{'while A waits: worker CPU s/min':34} {worker_cpu:.2f}")
    print(f"{'while A waits: PostgreSQL CPU s/min':34} {pg_cpu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
