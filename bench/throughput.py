"""Throughput of the real pipeline against the naive worker, side by side, on one workload.

    python bench/throughput.py [--mails 3000] [--processes 2] [--threads 8] [--no-pin-cpus]

Both run RabbitMQ → worker processes → PostgreSQL look-ups → DKIM rsa-sha256 (2048)
→ SMTP to Postfix's ``smtp-sink`` on this machine, on invoices of ~30 KB with a
distinct ~25 KB PDF each, archive BCC on, series limits too high to throttle.
Prints mails/s and worker CPU ms per mail (both counted once the first tenth of
the mails has arrived, so worker start-up stays out), peak RSS per worker
process, latency publish → accepted (p50/p95) at half the measured maximum rate,
the ratios, and the producer's publish rate for 10,000 jobs. postbote runs with
``--pin-cpus`` unless told otherwise; the naive worker as dramatiq starts it.
"""

from __future__ import annotations

import argparse
import email
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim  # noqa: E402
import dramatiq  # noqa: E402

from bench.harness import (  # noqa: E402
    ROOT,
    SmtpSinkProcess,
    apply_tenant,
    bench_settings,
    cpu_seconds,
    machine,
    peak_rss_mb,
    percentile,
    process_tree,
    smtp_sink,
    spawn,
    start_workers,
    stop,
)
from producer import publish  # noqa: E402
from producer.queues import delete_queues  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.testbed.documents import make_job  # noqa: E402
from worker.tools.dkim_keys import dns_record, generate_private_key, private_key_pem  # noqa: E402

PDF_PADDING = 22_000


@dataclass
class Run:
    name: str
    mails: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")

    @property
    def rate(self) -> float:
        return self.mails / self.seconds

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000 / self.mails


def workload(tenant: str, count: int) -> list[dict[str, Any]]:
    return [
        make_job(
            tenant, "invoice", n, user_id="u1", to=f"kunde{n:05d}@example.com", padding_bytes=PDF_PADDING
        )
        for n in range(count)
    ]


def bench_tenant(smtp_port: int, key_file: Path, *, max_connections: int = 3) -> dict[str, Any]:
    """The tenant of the workload: archive BCC, a permitted sender, DKIM, series too loose to throttle."""
    return {
        "id": "bench",
        "smtp": {
            "host": "127.0.0.1",
            "port": smtp_port,
            "security": "none",
            "max_connections": min(max_connections, 20),
        },
        "series": {"batch_size": 100000, "pause_ms": 0},
        "archive_bcc": "archiv@acme.example",
        "senders": {"invoice": "rechnung@acme.example"},
        "dkim": {"domain": "acme.example", "selector": "s2026", "private_key_file": str(key_file)},
        "employees": [{"id": "u1", "email": "anna@acme.example", "senders": ["rechnung@acme.example"]}],
    }


def wait_for(
    sink: SmtpSinkProcess, root: int, total: int, timeout: float
) -> tuple[float, float, int, list[int]]:
    """Seconds and worker CPU from the arrival of the first tenth of ``total`` to the last arrival,
    how many arrived in that span, and the worker processes (the tree under ``root`` by then).

    Start-up (imports, first connections, keys loaded, the second process still starting while the
    first sends) stays out of the per-mail figures, for either worker alike."""
    deadline = time.monotonic() + timeout
    first_at = first_cpu = None
    first_count = 0
    warm = max(1, total // 10)
    pids: list[int] = []
    while time.monotonic() < deadline:
        count = sink.count()
        if first_at is None and count >= warm:
            pids = process_tree(root)
            first_at, first_cpu, first_count = time.monotonic(), cpu_seconds(pids), count
        if count >= total:
            assert first_at is not None and first_cpu is not None
            return time.monotonic() - first_at, cpu_seconds(pids) - first_cpu, total - first_count, pids
        # As often as the receiver's counter is read: a window of a few seconds must not be off by 0.2 s.
        time.sleep(0.02)
    raise SystemExit(f"bench: only {sink.count()} of {total} mails arrived within {timeout:.0f}s")


def start_postbote(settings: Settings, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    return start_workers(
        settings, processes=args.processes, threads=args.threads, log=log, pin_cpus=args.pin_cpus
    )


def run_postbote(
    settings: Settings,
    jobs: list[dict[str, Any]],
    sink: SmtpSinkProcess,
    args: argparse.Namespace,
    workdir: Path,
) -> tuple[Run, subprocess.Popen[bytes]]:
    publish(
        [Job.model_validate(j) for j in jobs],
        broker_url=settings.broker_url,
        queue_prefix=settings.queue_prefix,
    )
    worker = start_postbote(settings, args, workdir / "postbote.log")
    seconds, cpu, counted, pids = wait_for(sink, worker.pid, len(jobs), timeout=600)
    return Run("postbote", counted, seconds, cpu, peak_rss_mb(pids[1:])), worker


def run_naive(
    settings: Settings,
    jobs: list[dict[str, Any]],
    sink: SmtpSinkProcess,
    key_pem: bytes,
    args: argparse.Namespace,
    workdir: Path,
) -> tuple[Run, subprocess.Popen[bytes]]:
    queue = f"{settings.queue_prefix}.naive"
    env = {
        "NAIVE_BROKER_URL": settings.broker_url,
        "NAIVE_DATABASE_URL": settings.database_url,
        "NAIVE_QUEUE": queue,
        "NAIVE_SMTP_HOST": "127.0.0.1",
        "NAIVE_SMTP_PORT": str(sink.port),
        "NAIVE_DKIM_DOMAIN": "acme.example",
        "NAIVE_DKIM_SELECTOR": "s2026",
        "NAIVE_DKIM_KEY": key_pem.decode(),
    }
    publish_naive(settings, queue, jobs)
    argv = [sys.executable, "-m", "dramatiq", "naive_baseline", "--path", str(ROOT / "bench")]
    argv += ["--processes", str(args.processes), "--threads", str(args.threads), "--queues", queue]
    worker = spawn(argv, {**os.environ, **env}, workdir / "naive.log")
    seconds, cpu, counted, pids = wait_for(sink, worker.pid, len(jobs), timeout=900)
    return Run("naive", counted, seconds, cpu, peak_rss_mb(pids[1:])), worker


def publish_naive(settings: Settings, queue: str, jobs: list[dict[str, Any]]) -> None:
    import pika

    from producer.queues import declare_queues

    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    channel = connection.channel()
    declare_queues(channel, queue)
    for job in jobs:
        message = dramatiq.Message(
            queue_name=queue, actor_name="naive_send", args=(job,), kwargs={}, options={}
        )
        channel.basic_publish("", queue, message.encode(), pika.BasicProperties(delivery_mode=2))
    connection.close()


def latency(
    sink: SmtpSinkProcess, publish_batch: Any, jobs: list[dict[str, Any]], rate: float
) -> tuple[float, float]:
    """Publish ``jobs`` at ``rate`` per second; p50/p95 of publish → accepted by the receiver, in ms."""
    sink.clear()
    published: dict[str, float] = {}
    step = max(1, int(rate / 20))
    started = time.monotonic()
    wall_offset = time.time() - time.monotonic()
    for i in range(0, len(jobs), step):
        due = started + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        batch = jobs[i : i + step]
        publish_batch(batch)
        now = time.monotonic() + wall_offset
        for job in batch:
            published[job["job_id"]] = now
    deadline = time.monotonic() + 120
    while sink.count() < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    latencies = []
    for path in sink.files():
        with path.open("rb") as f:
            message = email.message_from_binary_file(f)
        job_id = str(message["Message-ID"]).strip("<>").split("@")[0]
        if job_id in published:
            latencies.append((path.stat().st_mtime - published[job_id]) * 1000)
    return percentile(latencies, 50), percentile(latencies, 95)


def verify_sample(sink: SmtpSinkProcess, record: Any, expected_rcpts: int, sample: int = 20) -> int:
    """Every received mail had ``expected_rcpts`` envelope recipients; DKIM-verify a sample."""
    files = sink.files()
    for path in files:
        with path.open("rb") as f:
            head = f.read(2048)
        assert head.count(b"X-Rcpt-Args:") == expected_rcpts, f"{path.name}: wrong envelope"
    published = {record.name: "".join(record.strings).encode()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return published.get(name.decode().rstrip("."))

    verified = 0
    for path in files[:: max(1, len(files) // sample)][:sample]:
        raw = path.read_bytes()
        rcpts = raw.count(b"\nX-Rcpt-Args:") + raw.startswith(b"X-Rcpt-Args:")
        assert rcpts == expected_rcpts, f"{path.name}: {rcpts} envelope recipients, expected {expected_rcpts}"
        verified += bool(dkim.verify(raw, dnsfunc=dnsfunc))
    return verified


def publish_rate(settings: Settings, tenant: str, count: int) -> float:
    jobs = [Job.model_validate(j) for j in workload(tenant, count)]
    started = time.monotonic()
    publish(jobs, broker_url=settings.broker_url, queue_prefix=settings.queue_prefix + "-pubrate")
    elapsed = time.monotonic() - started
    delete_queues(settings.broker_url, [f"{settings.queue_prefix}-pubrate.documents"])
    return count / elapsed


def scaling(settings: Settings, sink: SmtpSinkProcess, args: argparse.Namespace, workdir: Path) -> list[Run]:
    """postbote alone with 1, 2 and 4 worker processes on the same workload."""
    runs = []
    for processes in (1, 2, 4):
        sink.clear()
        scaled = argparse.Namespace(**{**vars(args), "processes": processes})
        run, worker = run_postbote(settings, workload("bench", args.scaling_mails), sink, scaled, workdir)
        stop(worker)
        run.name = f"{processes} process{'es' if processes > 1 else ''}"
        runs.append(run)
    sink.clear()
    return runs


def backlog_memory(
    settings: Settings, sink: SmtpSinkProcess, args: argparse.Namespace, workdir: Path
) -> list[tuple[int, float]]:
    """Worker RSS while working through a backlog of ``args.backlog`` queued jobs: (processed, MB)."""
    from bench.harness import rss_mb

    small = []
    for n in range(args.backlog):
        job = make_job("bench", "invoice", n, user_id="u1", to=f"kunde{n:06d}@example.com")
        job["attachments"] = []
        small.append(Job.model_validate(job))
    for i in range(0, len(small), 10_000):
        publish(small[i : i + 10_000], broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
    sink.clear()
    worker = start_postbote(settings, args, workdir / "backlog.log")
    samples = []
    try:
        for target in (args.backlog // 50, args.backlog // 10, args.backlog // 5, args.backlog * 3 // 10):
            deadline = time.monotonic() + 300
            while sink.count() < target and time.monotonic() < deadline:
                time.sleep(0.5)
            samples.append((sink.count(), rss_mb(process_tree(worker.pid)[1:])))
    finally:
        stop(worker)
        delete_queues(settings.broker_url, [f"{settings.queue_prefix}.documents"])
        sink.clear()
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mails", type=int, default=3000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument(
        "--pin-cpus",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run postbote with --pin-cpus (default: yes)",
    )
    parser.add_argument("--publish-jobs", type=int, default=10_000)
    parser.add_argument(
        "--scaling-mails", type=int, default=1500, help="per run of the 1/2/4-process scaling (0: skip)"
    )
    parser.add_argument(
        "--backlog", type=int, default=100_000, help="queued jobs for the memory check (0: skip)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="postbote-bench-"))
    key = generate_private_key("rsa", 2048)
    key_pem = private_key_pem(key)
    key_file = workdir / "dkim.pem"
    key_file.write_bytes(key_pem)
    record = dns_record("acme.example", "s2026", key)
    with bench_settings() as settings, smtp_sink() as sink:
        # One connection per thread, as the naive actor has: no thread waits for a free one.
        apply_tenant(settings, bench_tenant(sink.port, key_file, max_connections=args.threads), workdir)
        print(machine())
        print(
            f"workload: {args.mails} invoices of ~{len(json.dumps(workload('bench', 1)[0])) // 1024} KB JSON "
            f"(PDF ~25 KB), DKIM rsa-sha256 2048, archive BCC, {args.processes} processes × {args.threads} threads"
            f"{' (postbote with --pin-cpus)' if args.pin_cpus else ''}; "
            "mails/s and CPU counted from the first tenth's arrival on"
        )

        ours, worker = run_postbote(settings, workload("bench", args.mails), sink, args, workdir)
        ok = verify_sample(sink, record, expected_rcpts=2)
        ours.p50_ms, ours.p95_ms = latency(
            sink,
            lambda batch: publish(
                [Job.model_validate(j) for j in batch],
                broker_url=settings.broker_url,
                queue_prefix=settings.queue_prefix,
            ),
            workload("bench", int(ours.rate / 2 * 8)),
            ours.rate / 2,
        )
        stop(worker)
        sink.clear()

        naive, worker = run_naive(settings, workload("bench", args.mails), sink, key_pem, args, workdir)
        naive_ok = verify_sample(sink, record, expected_rcpts=2)
        queue = f"{settings.queue_prefix}.naive"
        naive.p50_ms, naive.p95_ms = latency(
            sink,
            lambda batch: publish_naive(settings, queue, batch),
            workload("bench", int(naive.rate / 2 * 8)),
            naive.rate / 2,
        )
        stop(worker)
        delete_queues(settings.broker_url, [queue])

        pub_rate = publish_rate(settings, "bench", args.publish_jobs)
        scaled = scaling(settings, sink, args, workdir) if args.scaling_mails else []
        memory = backlog_memory(settings, sink, args, workdir) if args.backlog else []

    print()
    print(f"{'':24}{'postbote':>12}{'naive':>12}{'ratio':>10}")
    rows = [
        ("mails/s", ours.rate, naive.rate, ours.rate / naive.rate),
        ("worker CPU ms/mail", ours.cpu_ms, naive.cpu_ms, naive.cpu_ms / ours.cpu_ms),
        ("peak RSS/process MB", ours.peak_rss_mb, naive.peak_rss_mb, naive.peak_rss_mb / ours.peak_rss_mb),
        ("latency p50 ms (½ max)", ours.p50_ms, naive.p50_ms, naive.p50_ms / ours.p50_ms),
        ("latency p95 ms (½ max)", ours.p95_ms, naive.p95_ms, naive.p95_ms / ours.p95_ms),
    ]
    for label, a, b, ratio in rows:
        print(f"{label:24}{a:12.1f}{b:12.1f}{ratio:9.2f}×")
    print(f"\npublish rate, {args.publish_jobs} jobs (each confirmed): {pub_rate:,.0f} jobs/s")
    print(
        f"DKIM verified (dkimpy) in a sample: postbote {ok}/20, naive {naive_ok}/20; "
        "every mail reached the receiver with its archive copy"
    )
    if scaled:
        print(f"\nscaling, {args.scaling_mails} mails each, {args.threads} threads per process:")
        print(f"{'':14}{'mails/s':>10}{'CPU ms/mail':>13}{'peak RSS MB':>13}")
        for run in scaled:
            print(f"{run.name:14}{run.rate:10.1f}{run.cpu_ms:13.2f}{run.peak_rss_mb:13.1f}")
    if memory:
        print(f"\nworker RSS with a backlog of {args.backlog:,} queued jobs (largest process):")
        print("  " + ", ".join(f"after {done:,} sent: {mb:.0f} MB" for done, mb in memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
