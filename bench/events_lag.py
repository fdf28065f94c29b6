"""Delivery-event lag: from the ledger commit that wrote an event to a consumer of ``<prefix>.events``
receiving it, while postbote sends at a steady rate.

    python bench/events_lag.py [--rate 200] [--seconds 10] [--processes 2] [--threads 8]

Jobs (~30 KB invoices with archive BCC, DKIM-signed) are published at ``--rate`` per second to
workers sending to Postfix's ``smtp-sink``; a consumer bound to ``<prefix>.events`` with ``#``
receives every event and measures now − ``occurred_at``. The baseline, measured in the same run
on the same broker, is a plain persistent publish → consume round trip of a message of the same
size every 50 ms. Prints p50/p95/max of both and their ratio; the target is p95 ≤ 1 s at 200 mails/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pika  # noqa: E402

from bench.harness import (  # noqa: E402
    apply_tenant,
    bench_settings,
    machine,
    percentile,
    smtp_sink,
    start_workers,
)
from bench.throughput import bench_tenant, workload  # noqa: E402
from producer import publish  # noqa: E402
from schemas.constants import events_exchange  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.tools.dkim_keys import generate_private_key, private_key_pem  # noqa: E402


def consume(url: str, queue: str, lags: list[float], stop: threading.Event) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    try:
        while not stop.is_set():
            for method, _, body in channel.consume(queue, inactivity_timeout=0.2, auto_ack=True):
                if method is None:
                    break
                occurred = datetime.fromisoformat(json.loads(body)["occurred_at"]).timestamp()
                lags.append(time.time() - occurred)
    finally:
        connection.close()


def round_trips(url: str, size: int, stop: threading.Event) -> list[float]:
    """A plain persistent, confirmed publish → consume of ``size`` bytes every 50 ms."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    queue = channel.queue_declare("", exclusive=True).method.queue
    body = b"x" * size
    times = []
    try:
        while not stop.is_set():
            started = time.time()
            channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
            while channel.basic_get(queue, auto_ack=True)[0] is None:
                pass
            times.append(time.time() - started)
            time.sleep(0.05)
    finally:
        connection.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="postbote-events-lag-"))
    key_file = workdir / "dkim.pem"
    key_file.write_bytes(private_key_pem(generate_private_key("rsa", 2048)))
    total = args.rate * args.seconds
    with bench_settings() as settings, smtp_sink() as sink:
        apply_tenant(settings, bench_tenant(sink.port, key_file, max_connections=8), workdir)
        exchange = events_exchange(settings.queue_prefix)
        queue = f"{settings.queue_prefix}.events.bench"
        setup = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        channel = setup.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, exchange, routing_key="#")
        setup.close()
        lags: list[float] = []
        stop = threading.Event()
        consumer = threading.Thread(
            target=consume, args=(settings.broker_url, queue, lags, stop), daemon=True
        )
        consumer.start()
        baseline: list[float] = []
        prober = threading.Thread(
            target=lambda: baseline.extend(round_trips(settings.broker_url, 1200, stop)), daemon=True
        )
        start_workers(settings, processes=args.processes, threads=args.threads, log=workdir / "worker.log")
        jobs = [Job.model_validate(j) for j in workload("bench", total)]
        time.sleep(3)
        prober.start()
        started = time.monotonic()
        step = max(1, args.rate // 10)
        for n in range(0, total, step):
            publish(jobs[n : n + step], broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
            time.sleep(max(0.0, started + (n + step) / args.rate - time.monotonic()))
        deadline = time.monotonic() + 120
        while len(lags) < total and time.monotonic() < deadline:
            time.sleep(0.2)
        stop.set()
        consumer.join(timeout=10)
        prober.join(timeout=10)
        cleanup = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
        cleanup.channel().queue_delete(queue)
        cleanup.channel().exchange_delete(exchange)
        cleanup.close()
    print(machine())
    print(
        f"{total} jobs at {args.rate}/s to {args.processes} × {args.threads} workers; {len(lags)} events received\n"
    )
    print(f"{'':34}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for name, values in (("event lag (commit → consumer)", lags), ("baseline: AMQP round trip", baseline)):
        row = [percentile(values, 50), percentile(values, 95), max(values, default=float("nan"))]
        print(f"{name:34}" + "".join(f"{v * 1000:10.1f}" for v in row))
    ratio = percentile(lags, 95) / percentile(baseline, 95)
    print(
        f"\np95 ratio event lag / baseline: {ratio:.1f}×; target p95 ≤ 1000 ms: "
        f"{'met' if percentile(lags, 95) <= 1.0 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
