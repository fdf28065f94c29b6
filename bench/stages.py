"""CPU per mail of each stage of the pipeline, where it runs and alone.

    python bench/stages.py [--mails 1000]

Runs the worker's pipeline (``Pipeline.process``) in one thread on the workload
of ``bench/throughput.py`` — the machine's PostgreSQL, Postfix's ``smtp-sink``,
DKIM rsa-sha256 2048 — without broker or worker threads, and times each stage
with the thread's CPU clock. Then it replays the arguments the pure stages got
in a tight loop of their own. A stage between the others costs several times
what it costs alone: the rest of the mail has pushed its code and data out of
the caches. What the real worker spends beyond the sum (``bench/throughput.py``
prints its CPU per mail) goes to dramatiq, pika and the thread hand-offs. The claims and
records go to PostgreSQL through the process's ledger writer, whose thread is counted on its
own line. Last, the CPU
the database's own server processes spent per mail on the pipeline's connections.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import worker.job.actor  # noqa: E402
from bench.harness import apply_tenant, bench_settings, cpu_seconds, machine, smtp_sink  # noqa: E402
from bench.throughput import bench_tenant, workload  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.db import connect  # noqa: E402
from worker.job.actor import Pipeline  # noqa: E402
from worker.job.signature import SigningKey  # noqa: E402
from worker.logs import configure_logging  # noqa: E402
from worker.tools.dkim_keys import generate_private_key, private_key_pem  # noqa: E402

PURE_STAGES = ("validate", "payload_digest", "compose_message", "sign_message", "log_outcome")
"""Stages that touch neither network nor database, so they can be replayed alone."""

STAGES_OF_ACTORS = (
    "payload_digest",
    "claim_job",
    "before_data",
    "resolve_sender",
    "compose_message",
    "sign_message",
    "record_attempt",
    "log_outcome",
)
"""The stages as ``worker.job.actor`` calls them, by the name it imported them under."""

RSA = "  of which RSA (OpenSSL)"
REPLAYED_CALLS = 300


class Stages:
    """CPU seconds per stage, and the first calls' arguments of the pure ones."""

    def __init__(self) -> None:
        self.cpu: Counter[str] = Counter()
        self.calls: dict[str, list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]]] = {}

    @contextmanager
    def timing(self, owner: Any, attribute: str, stage: str) -> Iterator[None]:
        original = getattr(owner, attribute)
        own = vars(owner).get(attribute)
        recorded = self.calls.setdefault(stage, []) if stage in PURE_STAGES else None

        def timed(*args: Any, **kwargs: Any) -> Any:
            if recorded is not None and len(recorded) < REPLAYED_CALLS:
                recorded.append((original, args, kwargs))
            started = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.cpu[stage] += time.thread_time() - started

        setattr(owner, attribute, timed)
        try:
            yield
        finally:
            if own is None:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, own)

    def alone(self, stage: str) -> float:
        """CPU seconds per call of ``stage`` replayed in a loop (the same arguments, warm caches)."""
        calls = self.calls.get(stage, [])
        rounds = 5
        started = time.thread_time()
        for _ in range(rounds):
            for function, args, kwargs in calls:
                function(*args, **kwargs)
        return (time.thread_time() - started) / max(1, rounds * len(calls))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mails", type=int, default=1000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="postbote-stages-"))
    key_file = workdir / "dkim.pem"
    key_file.write_bytes(private_key_pem(generate_private_key("rsa", 2048)))
    stages = Stages()
    warm_up = 50
    with bench_settings() as settings, smtp_sink() as sink, open(os.devnull, "w") as devnull:
        apply_tenant(settings, bench_tenant(sink.port, key_file), workdir)
        configure_logging(settings.log_format)
        logging.getLogger().handlers[0].setStream(devnull)
        pipeline = Pipeline(settings)
        jobs = workload("bench", warm_up + args.mails)
        try:
            for job in jobs[:warm_up]:
                pipeline.process(job)
            with ExitStack() as stack:
                stack.enter_context(stages.timing(Job, "model_validate", "validate"))
                for name in STAGES_OF_ACTORS:
                    stack.enter_context(stages.timing(worker.job.actor, name, name))
                stack.enter_context(stages.timing(SigningKey, "sign_digest", RSA))
                stack.enter_context(stages.timing(pipeline.smtp, "deliver", "smtp"))
                backends = database_backends(settings.database_url)
                backends_started = cpu_seconds(backends)
                writer = writer_clock(pipeline)
                writer_started = time.clock_gettime(writer)
                started = time.thread_time()
                for job in jobs[warm_up:]:
                    pipeline.process(job)
                total = time.thread_time() - started
                writer_cpu = time.clock_gettime(writer) - writer_started
                database = cpu_seconds(backends) - backends_started
            alone = {stage: stages.alone(stage) for stage in PURE_STAGES}
        finally:
            pipeline.close()
    per_mail = {stage: seconds / args.mails for stage, seconds in stages.cpu.items()}
    rsa_part = per_mail.pop(RSA, 0.0)
    measured = sum(per_mail.values())
    print(machine())
    print(f"{args.mails} mails through Pipeline.process in one thread; CPU µs per mail\n")
    print(f"{'stage':28}{'in the pipeline':>17}{'alone':>10}{'ratio':>9}")
    for stage, seconds in sorted(per_mail.items(), key=lambda item: -item[1]):
        row = f"{stage:28}{seconds * 1e6:17.0f}"
        if stage in alone:
            row += f"{alone[stage] * 1e6:10.0f}{seconds / alone[stage]:8.1f}×"
        print(row)
        if stage == "sign_message":
            print(f"{RSA:28}{rsa_part * 1e6:17.0f}")
    print(f"{'everything else':28}{(total / args.mails - measured) * 1e6:17.0f}")
    print(f"{'ledger writer (own thread)':28}{writer_cpu / args.mails * 1e6:17.0f}")
    print(f"{'total':28}{(total + writer_cpu) / args.mails * 1e6:17.0f}")
    print(
        f"\nPostgreSQL, its server processes for the pipeline: {database / args.mails * 1e6:.0f} µs per mail"
    )
    return 0


def writer_clock(pipeline: Pipeline) -> int:
    """The CPU clock of the ledger writer's thread (started by the warm-up's claims)."""
    thread = pipeline.ledger.thread
    assert thread is not None and thread.ident is not None
    return time.pthread_getcpuclockid(thread.ident)


def database_backends(url: str) -> list[int]:
    """The server processes of the connections to the database of ``url`` (the pipeline's pool)."""
    with connect(url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [row["pid"] for row in rows]


if __name__ == "__main__":
    sys.exit(main())
