"""Throughput of the real pipeline against the naive worker, side by side, on one workload.

    python bench/throughput.py [--mails 3000] [--send-jobs 10000] [--backlog 100000] [--parked 10000]

All run RabbitMQ → worker processes → PostgreSQL → DKIM rsa-sha256 (2048) → SMTP to
Postfix's ``smtp-sink`` on this machine, on invoices of ~30 KB with a distinct ~25 KB PDF
each, archive BCC on, series limits too high to throttle, every guarantee on.

postbote runs twice: with its defaults (``postbote worker`` as README's quick start has it,
a tenant file that says nothing about connections) and tuned (``--pin-cpus``, one SMTP
connection per thread); the naive worker as dramatiq starts it with 2 × 8 threads. For each:
mails/s, and CPU ms per mail of the workers, PostgreSQL, RabbitMQ and the receiver (counted
once the first tenth of the mails has arrived, so start-up stays out), peak RSS per worker
process, latency publish → accepted (p50/p95) at half the measured maximum rate. Then the
publish rate of ``postbote send FILE`` (the whole command, median of three) and of ``publish()``, worker memory
with a backlog of queued and of parked jobs, and the targets, met or not.
"""

from __future__ import annotations

import argparse
import email
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
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
    env_for,
    machine,
    peak_rss_mb,
    percentile,
    process_tree,
    rss_mb,
    service_pids,
    smtp_sink,
    spawn,
    start_workers,
    stop,
)
from producer import publish  # noqa: E402
from producer.queues import delete_queues  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.db import connect  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.testbed.documents import make_job  # noqa: E402
from worker.tools.dkim_keys import dns_record, generate_private_key, private_key_pem  # noqa: E402

PDF_PADDING = 22_000


SERVICES = {"postgres": "postgres", "rabbitmq": "beam.smp", "receiver": "smtp-sink"}


@dataclass
class Config:
    """How postbote is started: ``None`` leaves a count, or the tenant's connections, at its default."""

    name: str
    processes: int | None = None
    threads: int | None = None
    pin_cpus: bool = False
    max_connections: int | None = None


DEFAULTS = Config("defaults")
TUNED = Config("tuned", processes=2, threads=8, pin_cpus=True, max_connections=8)


@dataclass
class Run:
    name: str
    mails: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float
    services_s: dict[str, float] = field(default_factory=dict)
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")

    @property
    def rate(self) -> float:
        return self.mails / self.seconds

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s * 1000 / self.mails

    def service_ms(self, service: str) -> float:
        return self.services_s[service] * 1000 / self.mails


def workload(tenant: str, count: int) -> list[dict[str, Any]]:
    return [
        make_job(
            tenant, "invoice", n, user_id="u1", to=f"kunde{n:05d}@example.com", padding_bytes=PDF_PADDING
        )
        for n in range(count)
    ]


def bench_tenant(smtp_port: int, key_file: Path, *, max_connections: int | None = None) -> dict[str, Any]:
    """The tenant of the workload: archive BCC, a permitted sender, DKIM, series too loose to throttle."""
    smtp: dict[str, Any] = {"host": "127.0.0.1", "port": smtp_port, "security": "none"}
    if max_connections is not None:
        smtp["max_connections"] = min(max_connections, 20)
    return {
        "id": "bench",
        "smtp": smtp,
        "series": {"batch_size": 100000, "pause_ms": 0},
        "archive_bcc": "archiv@acme.example",
        "senders": {"invoice": "rechnung@acme.example"},
        "dkim": {"domain": "acme.example", "selector": "s2026", "private_key_file": str(key_file)},
        "employees": [{"id": "u1", "email": "anna@acme.example", "senders": ["rechnung@acme.example"]}],
    }


def wait_for(sink: SmtpSinkProcess, name: str, root: int, total: int, timeout: float) -> Run:
    """Seconds and CPU (workers and services) from the arrival of the first tenth of ``total`` to
    the last arrival, and how many arrived in that span; the workers are the tree under ``root``.

    Start-up (imports, first connections, keys loaded, the second process still starting while the
    first sends) stays out of the per-mail figures, for either worker alike."""
    deadline = time.monotonic() + timeout
    first_at = first_cpu = None
    first_count = 0
    warm = max(1, total // 10)
    pids: list[int] = []
    started: dict[str, dict[int, float]] = {}
    while time.monotonic() < deadline:
        count = sink.count()
        if first_at is None and count >= warm:
            pids = process_tree(root)
            first_at, first_cpu, first_count = time.monotonic(), cpu_seconds(pids), count
            started = _service_cpu()
        if count >= total:
            assert first_at is not None and first_cpu is not None
            ended = _service_cpu()
            return Run(
                name,
                total - first_count,
                time.monotonic() - first_at,
                cpu_seconds(pids) - first_cpu,
                peak_rss_mb(pids[1:]),
                {
                    service: sum(cpu - started[service].get(pid, 0.0) for pid, cpu in by_pid.items())
                    for service, by_pid in ended.items()
                },
            )
        # As often as the receiver's counter is read: a window of a few seconds must not be off by 0.2 s.
        time.sleep(0.02)
    raise SystemExit(f"bench: only {sink.count()} of {total} mails arrived within {timeout:.0f}s")


def _service_cpu() -> dict[str, dict[int, float]]:
    """CPU seconds of each service's processes by pid: a database backend started since the last
    look counts from zero."""
    return {
        service: {pid: cpu_seconds([pid]) for pid in service_pids(command)}
        for service, command in SERVICES.items()
    }


def start_postbote(settings: Settings, config: Config, log: Path) -> subprocess.Popen[bytes]:
    return start_workers(
        settings, processes=config.processes, threads=config.threads, log=log, pin_cpus=config.pin_cpus
    )


def run_postbote(
    settings: Settings,
    config: Config,
    jobs: list[dict[str, Any]],
    sink: SmtpSinkProcess,
    key_file: Path,
    workdir: Path,
) -> tuple[Run, subprocess.Popen[bytes]]:
    apply_tenant(settings, bench_tenant(sink.port, key_file, max_connections=config.max_connections), workdir)
    publish(
        [Job.model_validate(j) for j in jobs],
        broker_url=settings.broker_url,
        queue_prefix=settings.queue_prefix,
    )
    worker = start_postbote(settings, config, workdir / f"postbote-{config.name}.log")
    return wait_for(sink, config.name, worker.pid, len(jobs), timeout=600), worker


def run_naive(
    settings: Settings,
    jobs: list[dict[str, Any]],
    sink: SmtpSinkProcess,
    key_pem: bytes,
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
    argv += ["--processes", "2", "--threads", "8", "--queues", queue]
    worker = spawn(argv, {**os.environ, **env}, workdir / "naive.log")
    return wait_for(sink, "naive", worker.pid, len(jobs), timeout=900), worker


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
    """Jobs per second through ``publish()``, each confirmed."""
    jobs = [Job.model_validate(j) for j in workload(tenant, count)]
    started = time.monotonic()
    publish(jobs, broker_url=settings.broker_url, queue_prefix=settings.queue_prefix + "-pubrate")
    elapsed = time.monotonic() - started
    delete_queues(settings.broker_url, [f"{settings.queue_prefix}-pubrate.documents"])
    return count / elapsed


def send_rate(
    settings: Settings, tenant: str, count: int, workdir: Path, runs: int = 3
) -> tuple[list[float], float]:
    """Jobs per second of ``postbote send FILE`` as a user runs it (the whole command, start-up
    included), ``runs`` times on one file, and the file's mean line size in KB."""
    path = workdir / "jobs.jsonl"
    with path.open("w") as f:
        for job in workload(tenant, count):
            f.write(json.dumps(job) + "\n")
    prefix = settings.queue_prefix + "-send"
    env = env_for(settings, queue_prefix=prefix)
    rates = []
    for _ in range(runs):
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "worker", "send", str(path)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
        elapsed = time.monotonic() - started
        delete_queues(settings.broker_url, [f"{prefix}.documents"])
        if done.returncode != 0 or done.stdout.count(b"\n") != count:
            raise SystemExit(f"bench: postbote send failed: {done.stderr.decode()[-500:]}")
        rates.append(count / elapsed)
    size_kb = path.stat().st_size / count / 1024
    path.unlink()
    return rates, size_kb


def small_jobs(count: int, **fields: Any) -> list[Job]:
    jobs = []
    for n in range(count):
        job = make_job("bench", "invoice", n, user_id="u1", to=f"kunde{n:06d}@example.com")
        job["attachments"] = []
        jobs.append(Job.model_validate({**job, **fields}))
    return jobs


def backlog_memory(
    settings: Settings, sink: SmtpSinkProcess, count: int, workdir: Path
) -> list[tuple[int, float]]:
    """Worker RSS while working through a backlog of ``count`` queued jobs: (sent, MB)."""
    jobs = small_jobs(count)
    for i in range(0, len(jobs), 10_000):
        publish(jobs[i : i + 10_000], broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
    sink.clear()
    worker = start_postbote(settings, DEFAULTS, workdir / "backlog.log")
    samples = []
    try:
        for target in (count // 50, count // 10, count // 5, count * 3 // 10):
            deadline = time.monotonic() + 300
            while sink.count() < target and time.monotonic() < deadline:
                time.sleep(0.5)
            samples.append((sink.count(), rss_mb(process_tree(worker.pid))))
    finally:
        stop(worker)
        delete_queues(settings.broker_url, [f"{settings.queue_prefix}.documents"])
        sink.clear()
    return samples


def parked_memory(settings: Settings, count: int, workdir: Path) -> list[tuple[int, float]]:
    """RSS of the supervisor and its workers (the largest) while ``count`` jobs scheduled an hour
    ahead are taken off the queue and parked, and after: (parked, MB)."""
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    jobs = small_jobs(count, not_before=later)
    publish(jobs, broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
    worker = start_postbote(settings, DEFAULTS, workdir / "parked.log")
    samples: list[tuple[int, float]] = []
    try:
        with connect(settings.database_url) as conn:
            for target in (count // 10, count // 2, count, count):
                deadline = time.monotonic() + 300
                while (parked := _parked(conn)) < target and time.monotonic() < deadline:
                    time.sleep(0.5)
                samples.append((parked, rss_mb(process_tree(worker.pid))))
            time.sleep(5)
            samples.append((_parked(conn), rss_mb(process_tree(worker.pid))))
    finally:
        stop(worker)
        delete_queues(settings.broker_url, [f"{settings.queue_prefix}.documents"])
    return samples


def _parked(conn: Any) -> int:
    row = conn.execute("SELECT count(*) AS parked FROM parked_jobs").fetchone()
    return int(row["parked"])


@dataclass
class Target:
    what: str
    measured: str
    met: bool


def targets(
    defaults: Run,
    tuned: Run,
    naive: Run,
    send_jobs_s: float,
    memory_mb: float,
) -> list[Target]:
    gap = 1 - defaults.rate / tuned.rate
    return [
        Target(
            "defaults within 10 % of tuned (mails/s)",
            f"{defaults.rate:.0f} vs {tuned.rate:.0f} ({abs(gap):.0%} {'below' if gap > 0 else 'above'})",
            gap <= 0.10,
        ),
        Target(
            "≥ 4.5× naive in mails/s (defaults)",
            f"{defaults.rate / naive.rate:.2f}×",
            defaults.rate / naive.rate >= 4.5,
        ),
        Target(
            "≥ 5× less worker CPU per mail than naive (defaults)",
            f"{naive.cpu_ms / defaults.cpu_ms:.2f}×",
            naive.cpu_ms / defaults.cpu_ms >= 5,
        ),
        Target(
            "≤ 2.5 ms worker CPU per mail (defaults)", f"{defaults.cpu_ms:.2f} ms", defaults.cpu_ms <= 2.5
        ),
        Target(
            "PostgreSQL ≤ 0.3 ms per mail (defaults)",
            f"{defaults.service_ms('postgres'):.2f} ms",
            defaults.service_ms("postgres") <= 0.3,
        ),
        Target("postbote send FILE ≥ 4,000 jobs/s", f"{send_jobs_s:,.0f} jobs/s", send_jobs_s >= 4000),
        Target("≤ 150 MB per worker process, flat", f"{memory_mb:.0f} MB at most", memory_mb <= 150),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mails", type=int, default=3000)
    parser.add_argument("--publish-jobs", type=int, default=10_000, help="jobs for the publish() rate")
    parser.add_argument("--send-jobs", type=int, default=10_000, help="jobs in the file for postbote send")
    parser.add_argument(
        "--backlog", type=int, default=100_000, help="queued jobs for the memory check (0: skip)"
    )
    parser.add_argument(
        "--parked", type=int, default=10_000, help="parked jobs for the memory check (0: skip)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="postbote-bench-"))
    key = generate_private_key("rsa", 2048)
    key_pem = private_key_pem(key)
    key_file = workdir / "dkim.pem"
    key_file.write_bytes(key_pem)
    record = dns_record("acme.example", "s2026", key)
    with bench_settings() as settings, smtp_sink() as sink:
        print(machine())
        print(
            f"workload: {args.mails} invoices of ~{len(json.dumps(workload('bench', 1)[0])) // 1024} KB JSON "
            "(PDF ~25 KB), DKIM rsa-sha256 2048, archive BCC; mails/s and CPU counted from the first "
            "tenth's arrival on"
        )
        print(
            "defaults: postbote worker, tenant without max_connections; tuned: --processes 2 --threads 8 "
            "--pin-cpus, max_connections 8; naive: 2 processes × 8 threads"
        )
        runs: dict[str, Run] = {}
        verified: dict[str, int] = {}
        for config in (DEFAULTS, TUNED):
            run, worker = run_postbote(
                settings, config, workload("bench", args.mails), sink, key_file, workdir
            )
            verified[config.name] = verify_sample(sink, record, expected_rcpts=2)
            if config is DEFAULTS:
                run.p50_ms, run.p95_ms = latency(
                    sink,
                    lambda batch: publish(
                        [Job.model_validate(j) for j in batch],
                        broker_url=settings.broker_url,
                        queue_prefix=settings.queue_prefix,
                    ),
                    workload("bench", int(run.rate / 2 * 8)),
                    run.rate / 2,
                )
            stop(worker)
            sink.clear()
            runs[config.name] = run

        naive, worker = run_naive(settings, workload("bench", args.mails), sink, key_pem, workdir)
        verified["naive"] = verify_sample(sink, record, expected_rcpts=2)
        queue = f"{settings.queue_prefix}.naive"
        naive.p50_ms, naive.p95_ms = latency(
            sink,
            lambda batch: publish_naive(settings, queue, batch),
            workload("bench", int(naive.rate / 2 * 8)),
            naive.rate / 2,
        )
        stop(worker)
        delete_queues(settings.broker_url, [queue])
        sink.clear()

        pub_rate = publish_rate(settings, "bench", args.publish_jobs)
        send_rates, line_kb = send_rate(settings, "bench", args.send_jobs, workdir)
        send_jobs_s = statistics.median(send_rates)
        apply_tenant(settings, bench_tenant(sink.port, key_file), workdir)
        memory = backlog_memory(settings, sink, args.backlog, workdir) if args.backlog else []
        parked = parked_memory(settings, args.parked, workdir) if args.parked else []

    defaults, tuned = runs["defaults"], runs["tuned"]
    print()
    print(f"{'':28}{'defaults':>10}{'tuned':>10}{'naive':>10}{'ratio':>9}")
    rows = [
        ("mails/s", lambda r: r.rate, lambda: defaults.rate / naive.rate),
        ("worker CPU ms/mail", lambda r: r.cpu_ms, lambda: naive.cpu_ms / defaults.cpu_ms),
        ("PostgreSQL CPU ms/mail", lambda r: r.service_ms("postgres"), None),
        ("RabbitMQ CPU ms/mail", lambda r: r.service_ms("rabbitmq"), None),
        ("receiver CPU ms/mail", lambda r: r.service_ms("receiver"), None),
        ("peak RSS/process MB", lambda r: r.peak_rss_mb, None),
        ("latency p50 ms (½ max)", lambda r: r.p50_ms, lambda: naive.p50_ms / defaults.p50_ms),
        ("latency p95 ms (½ max)", lambda r: r.p95_ms, lambda: naive.p95_ms / defaults.p95_ms),
    ]
    for label, value, ratio in rows:
        cells = "".join(f"{value(r):10.2f}" for r in (defaults, tuned, naive))
        print(f"{label:28}{cells}{f'{ratio():8.2f}×' if ratio else ''}")
    print("(ratio: naive against defaults)")
    print(
        f"\npostbote send FILE, {args.send_jobs:,} jobs of {line_kb:.0f} KB (whole command, median of "
        f"{len(send_rates)}: {', '.join(f'{r:,.0f}' for r in send_rates)}): {send_jobs_s:,.0f} jobs/s; "
        f"publish(), {args.publish_jobs:,} jobs: {pub_rate:,.0f} jobs/s"
    )
    print(
        f"DKIM verified (dkimpy) in a sample of 20: defaults {verified['defaults']}, tuned {verified['tuned']}, "
        f"naive {verified['naive']}; every mail reached the receiver with its archive copy"
    )
    if memory:
        print(f"\nRSS with a backlog of {args.backlog:,} queued jobs (largest process):")
        print("  " + ", ".join(f"after {done:,} sent: {mb:.0f} MB" for done, mb in memory))
    if parked:
        print(f"\nRSS while {args.parked:,} jobs are parked (largest process, supervisor included):")
        print("  " + ", ".join(f"{done:,} parked: {mb:.0f} MB" for done, mb in parked))
    largest = max([mb for _, mb in memory + parked] + [defaults.peak_rss_mb, tuned.peak_rss_mb])
    print("\ntargets:")
    for target in targets(defaults, tuned, naive, send_jobs_s, largest):
        print(f"  {'met    ' if target.met else 'NOT MET'}  {target.what}: {target.measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
