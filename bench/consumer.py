"""CPU per message of dramatiq and pika alone: the worker's consumer against dramatiq's own.

    python bench/consumer.py [--messages 5000] [--threads 8] [--rounds 3]

Publishes the jobs of ``bench/throughput.py`` (~31 KB messages) and lets a
dramatiq ``Worker`` in this process run them through an actor that does
nothing, once with the worker's broker (acks handed over in batches, written
without a socket flush each) and once with the same broker consuming through
dramatiq's own consumer (each ack handed over and flushed on its own).
Rounds alternate; the medians are printed with their ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="postbote-bench-metrics-"))

import dramatiq  # noqa: E402
import pika  # noqa: E402
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqConsumer  # noqa: E402
from dramatiq.middleware import CurrentMessage  # noqa: E402

from bench.harness import bench_settings, machine  # noqa: E402
from bench.throughput import workload  # noqa: E402
from producer.confirms import publish_confirmed  # noqa: E402
from producer.envelope import encode_job  # noqa: E402
from producer.queues import delete_queues  # noqa: E402
from schemas.constants import DOCUMENTS_QUEUE, actor_of  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.runtime.broker import make_broker  # noqa: E402
from worker.runtime.middleware import Metrics  # noqa: E402
from worker.settings import Settings  # noqa: E402


def with_dramatiq_acks(broker: RabbitmqBroker) -> RabbitmqBroker:
    """The same broker, consuming through dramatiq's own consumer."""

    class DramatiqAcks(type(broker)):  # type: ignore[misc]
        @property
        def consumer_class(self) -> type[_RabbitmqConsumer]:
            return _RabbitmqConsumer

    broker.__class__ = DramatiqAcks
    return broker


def cpu_per_message(
    settings: Settings, messages: list[tuple[str, bytes]], threads: int, *, dramatiq_acks: bool
) -> float:
    """Publish ``messages``, consume them all with a no-op actor; µs of this process's CPU per message."""
    queue = messages[0][0]
    publish_confirmed(pika.URLParameters(settings.broker_url), messages)
    finished = threading.Event()
    lock = threading.Lock()
    count = 0

    def send_document(job: dict[str, Any]) -> None:
        nonlocal count
        with lock:
            count += 1
            if count == len(messages):
                finished.set()

    broker = make_broker(settings, lambda *_: None, extra=[CurrentMessage(), Metrics(settings.queue_prefix)])
    if dramatiq_acks:
        with_dramatiq_acks(broker)
    dramatiq.Actor(
        send_document,
        broker=broker,
        actor_name=actor_of(DOCUMENTS_QUEUE),
        queue_name=queue,
        priority=10,
        options={},
    )
    before = resource.getrusage(resource.RUSAGE_SELF)
    worker = dramatiq.Worker(broker, queues={queue}, worker_threads=threads, worker_timeout=100)
    worker.start()
    if not finished.wait(300):
        raise SystemExit(f"bench: only {count} of {len(messages)} messages were processed")
    after = resource.getrusage(resource.RUSAGE_SELF)
    worker.stop()
    broker.close()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return cpu * 1e6 / len(messages)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures: dict[bool, list[float]] = {False: [], True: []}
    with bench_settings() as settings:
        messages = [
            encode_job(Job.model_validate(job), settings.queue_prefix)
            for job in workload("bench", args.messages)
        ]
        try:
            for _ in range(args.rounds):
                for dramatiq_acks in (True, False):
                    figures[dramatiq_acks].append(
                        cpu_per_message(settings, messages, args.threads, dramatiq_acks=dramatiq_acks)
                    )
        finally:
            delete_queues(settings.broker_url, [messages[0][0]])
    ours, theirs = statistics.median(figures[False]), statistics.median(figures[True])
    size = len(messages[0][1]) // 1024
    print(machine())
    print(
        f"{args.messages} messages of ~{size} KB, no-op actor, {args.threads} threads, {args.rounds} rounds"
    )
    print(f"\n{'consumer':34}{'CPU µs per message':>20}")
    print(f"{'dramatiq (an ack flushed each)':34}{theirs:20.0f}   rounds: {_rounds(figures[True])}")
    print(f"{'postbote (acks in batches)':34}{ours:20.0f}   rounds: {_rounds(figures[False])}")
    print(f"\nratio: {theirs / ours:.2f}×")
    return 0


def _rounds(values: list[float]) -> str:
    return ", ".join(f"{v:.0f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
