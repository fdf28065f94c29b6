"""PostgreSQL CPU per mail of the ledger's writes, as a worker process's ledger writer sends them.

    python bench/ledger_sql.py [--mails 600] [--batch 6] [--rounds 10] [--overlay NAME=FILE.sql]…

``--batch`` threads claim a job each at the same moment through one ``LedgerBatcher``, so their
claims go as one statement and one commit, then record a sent attempt (three recipients: the
customer, the clerk's copy, the archive's) the same way, round after round; then the event
relay publishes the events those records wrote. It prints the CPU the writer's server process
spent per mail (read from ``/proc/<pid>/schedstat``, in ns), and the CPU PostgreSQL spent per
event while the relay published. There is no SMTP and no worker here: only the database's
side of a mail, on an otherwise idle machine, so the figures are lower than the ones
``bench/throughput.py`` counts while every process shares the cores.

Each ``--overlay`` is SQL run on a database of its own after the migrations (changed functions,
a dropped index …): the databases take turns, ``--mails`` at a time per round, so a change is
measured against the migrations as they are, in the same minutes.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.harness import bench_settings, machine, service_pids  # noqa: E402
from schemas.job import Job  # noqa: E402
from worker.db import connect, drop_database, ensure_database, upgrade  # noqa: E402
from worker.job.intake import payload_digest  # noqa: E402
from worker.job.ledger import claim_job, record_attempt  # noqa: E402
from worker.job.ledger_batch import LedgerBatcher  # noqa: E402
from worker.job.outcome import AttemptRecord, Fate, Verdict  # noqa: E402
from worker.job.smtp.replies import SmtpReply  # noqa: E402
from worker.runtime.relay import EventRelay  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.testbed.documents import make_job  # noqa: E402
from worker.vocabulary import RecipientState, Role, Status  # noqa: E402

HOLDER = "bench:ledger"


@dataclass
class Database:
    name: str
    settings: Settings
    writer: LedgerBatcher
    backends: list[int] = field(default_factory=list)
    ledger_s: float = 0.0
    relay_s: float = 0.0
    mails: int = 0


def on_cpu_s(pid: int) -> float:
    """Time the process has run on a CPU, from the scheduler's nanosecond count."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


def sent(job: Job) -> AttemptRecord:
    reply = SmtpReply(250, "2.0.0", "Ok: queued as 4Xb7Kd1zYpz2")
    fates = tuple(
        Fate(address, role, RecipientState.ACCEPTED, reply, 1)
        for address, role in (
            (str(job.to[0]), Role.TO),
            ("clerk@acme.example", Role.CLERK),
            ("archiv@acme.example", Role.ARCHIVE),
        )
    )
    return AttemptRecord(
        job_id=job.job_id,
        attempt=1,
        started_at=time.time(),
        duration_ms=4,
        worker=HOLDER,
        tried=tuple(f.address for f in fates),
        sender="rechnung@acme.example",
        message_id=f"<{job.job_id}@acme.example>",
        reply=str(reply),
        verdict=Verdict(Status.SENT, fates, smtp_reply=str(reply), settled=fates),
    )


def one_mail(writer: LedgerBatcher, job: Job, digest: str, start: threading.Barrier) -> None:
    start.wait()
    claim_job(writer, job, digest, holder=HOLDER, claim_ms=130_000, customers=[str(job.to[0])])
    record_attempt(writer, sent(job))


def write(db: Database, mails: int, batch: int) -> None:
    """``mails`` claims and records, ``batch`` threads at a time."""
    jobs = []
    for n in range(mails):
        data = make_job("acme", "invoice", n, user_id="u1", to=f"kunde{uuid.uuid4().hex[:10]}@example.com")
        jobs.append((Job.model_validate(data), payload_digest(data)))
    started = sum(on_cpu_s(pid) for pid in db.backends)
    for first in range(0, mails, batch):
        group = jobs[first : first + batch]
        start = threading.Barrier(len(group))
        threads = [threading.Thread(target=one_mail, args=(db.writer, *j, start)) for j in group]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    db.ledger_s += sum(on_cpu_s(pid) for pid in db.backends) - started
    db.mails += mails


def relay(db: Database) -> None:
    """Publish every event written so far; PostgreSQL's CPU meanwhile."""
    postgres = service_pids("postgres")
    started = _on_cpu_s(postgres)
    publisher = EventRelay(db.settings)
    while publisher.relay_once():
        pass
    publisher.close()
    db.relay_s += _on_cpu_s(postgres) - started


def _on_cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with suppress(OSError):
            total += on_cpu_s(pid)
    return total


def database(number: int, name: str, base: Settings, overlay: Path | None, batch: int) -> Database:
    own = f"{psycopg.conninfo.conninfo_to_dict(base.database_url)['dbname']}_{number}"
    url = psycopg.conninfo.make_conninfo(base.database_url, dbname=own)
    ensure_database(url)
    with connect(url, autocommit=True) as conn:
        upgrade(conn)
        if overlay is not None:
            try:
                conn.execute(overlay.read_text())
            except (OSError, psycopg.Error) as e:
                drop_database(url)
                raise SystemExit(f"bench: overlay {name} ({overlay}): {e}") from None
    settings = base.model_copy(update={"database_url": url})
    db = Database(name, settings, LedgerBatcher(lambda: _connect(db), wait_s=60, writers=lambda: batch))
    return db


def _connect(db: Database) -> psycopg.Connection:
    conn = connect(db.settings.database_url, autocommit=True)
    db.backends.append(conn.info.backend_pid)
    return conn


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mails", type=int, default=600, help="mails per database and round")
    parser.add_argument("--batch", type=int, default=6, help="threads writing at once (writes per commit)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--overlay", action="append", default=[], metavar="NAME=FILE.sql")
    args = parser.parse_args()
    print(machine())
    with bench_settings() as base:
        overlays = [("migrated", None)] + [
            (name, Path(path)) for name, _, path in (o.partition("=") for o in args.overlay)
        ]
        dbs: list[Database] = []
        try:
            for number, (name, overlay) in enumerate(overlays):
                dbs.append(database(number, name, base, overlay, args.batch))
            for db in dbs:  # warm-up, not counted
                write(db, args.mails, args.batch)
                relay(db)
                db.ledger_s = db.relay_s = 0.0
                db.mails = 0
            for _ in range(args.rounds):
                for db in dbs:
                    write(db, args.mails, args.batch)
                    relay(db)
        finally:
            for db in dbs:
                db.writer.close()
                drop_database(db.settings.database_url)
    print(
        f"{args.rounds} rounds of {args.mails} mails per database, {args.batch} writes per statement;"
        " PostgreSQL CPU µs per mail:"
    )
    print(f"{'':16}{'claim+record':>14}{'relay':>8}{'together':>10}")
    for db in dbs:
        ledger, relayed = db.ledger_s / db.mails * 1e6, db.relay_s / db.mails * 1e6
        print(f"{db.name:16}{ledger:14.1f}{relayed:8.1f}{ledger + relayed:10.1f}")


if __name__ == "__main__":
    main()
