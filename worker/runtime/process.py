"""One worker process: the pipeline, a bulk lane and a receipts lane, each with its own threads.

Each lane has its own broker connection set and dramatiq ``Worker``, so receipts
never wait for a thread busy with a dunning run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from dramatiq import Worker
from dramatiq.middleware import CurrentMessage

from schemas.constants import DOCUMENTS_QUEUE, RECEIPTS_QUEUE
from worker.errors import DatabaseUnavailable
from worker.job.actor import Pipeline, register_actor
from worker.library_internals import set_delay_prefetch
from worker.logs import configure_logging
from worker.runtime.broker import make_broker
from worker.runtime.middleware import Metrics
from worker.runtime.queue_gauges import StartedMarks
from worker.runtime.seal import Sealer, load_seal_key
from worker.runtime.watchdog import watch_worker_threads
from worker.settings import Settings

logger = logging.getLogger(__name__)


def run_worker_process(
    settings_data: dict[str, Any],
    threads: int,
    receipt_threads: int,
    started: StartedMarks | None = None,
    holder: str | None = None,
    cpu: int | None = None,
) -> None:
    """Entry point of a spawned worker process; returns after SIGTERM once in-flight jobs are done.

    ``started`` is the supervisor's shared record of what was started, for the queue-age gauge;
    ``holder`` names this process's claims in the ledger, so the supervisor can
    release them when it sees the process die. ``cpu`` pins every thread of the process to that CPU.
    """
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    settings = Settings.model_validate(settings_data)
    configure_logging(settings.log_format)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    sealer = _wait_for_sealer(settings, stop)
    if sealer is None:
        return
    tenant_threads = settings.tenant_threads or max(1, threads // 2)
    pipeline = Pipeline(settings, holder=holder, tenant_threads=tenant_threads)
    lanes = []
    for lane, count in ((DOCUMENTS_QUEUE, threads), (RECEIPTS_QUEUE, receipt_threads)):
        broker = make_broker(
            settings,
            pipeline.give_up,
            extra=[CurrentMessage(), Metrics(settings.queue_prefix, started)],
            sealer=sealer,
        )
        queue = register_actor(broker, pipeline, settings.queue_prefix, lane)
        worker = Worker(broker, queues={queue}, worker_threads=count, worker_timeout=100)
        # A delayed message is held in memory until it is due: dramatiq's 1000 per thread
        # times the largest message the consumer reads would be gigabytes.
        set_delay_prefetch(worker, settings.delay_prefetch)
        worker.start()
        lanes.append((broker, worker))
    watch_worker_threads([worker for _, worker in lanes], stop, grace_ms=settings.shutdown_grace_ms)
    logger.info(
        "worker process ready: %d bulk threads, %d receipt threads%s",
        threads,
        receipt_threads,
        f", on CPU {cpu}" if cpu is not None else "",
    )
    stop.wait()
    logger.info("stopping: finishing in-flight jobs, handing back prefetched ones")
    # Both lanes stop at once, so together they take at most one grace period.
    stoppers = [
        threading.Thread(target=worker.stop, kwargs={"timeout": settings.shutdown_grace_ms}, name=f"stop-{i}")
        for i, (_, worker) in enumerate(lanes)
    ]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()
    for broker, _ in lanes:
        broker.close()
    pipeline.close()


def _wait_for_sealer(settings: Settings, stop: threading.Event) -> Sealer | None:
    """The sealer with the installation's key, once the database answers; ``None`` if stopped first."""
    delay = 0.5
    while True:
        try:
            return Sealer(load_seal_key(settings.database_url))
        except DatabaseUnavailable as e:
            logger.warning("cannot read the message sealing key yet (%s); retrying in %.1fs", e, delay)
        if stop.wait(delay):
            return None
        delay = min(delay * 2, 10.0)


__all__ = ["run_worker_process"]
