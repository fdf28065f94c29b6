"""``postbote demo``: two tenants, a realistic batch of documents, workers and the SMTP sink, a summary."""

from __future__ import annotations

import email
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from email import policy
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

from producer import parse_jobs, publish
from worker.db import connect, ensure_database, upgrade
from worker.job.ledger import delivery_record
from worker.runtime.probes import check_broker, check_database
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink, free_port, read_index
from worker.testbed.sink.faults import RecipientRules
from worker.tools.tenant_file import apply_tenants, read_tenant_file
from worker.vocabulary import FINAL, Reason, Status

UNLOADED_TENANT = "acme-nord"
"""A branch the ERP already sends for, but whose tenant nobody has loaded yet."""
GREYLISTED = "kunde-grau@example.com"
"""A customer whose mail server greylists: it answers 451 to the first attempt."""
GREYLISTING = {GREYLISTED: ["451 4.7.1 greylisted, please try again later", None]}


@dataclass(frozen=True)
class Expectation:
    job: dict[str, Any]
    failure: Reason | None = None
    """The reason the rules must fail the job with; ``None``: it must be delivered."""


def demo_tenants(smtp_port: int) -> dict[str, Any]:
    smtp = {"host": "127.0.0.1", "port": smtp_port, "security": "none", "helo": "demo.postbote.test"}
    return {
        "tenants": [
            {
                "id": "acme",
                "smtp": smtp,
                "series": {"batch_size": 50, "pause_ms": 200},
                "archive_bcc": "archiv@acme.example",
                "senders": {"offer": "angebote@acme.example", "invoice": "rechnung@acme.example"},
                "use_user_mail_data": True,
                "cc_clerk": True,
                "groups": [
                    {"id": "sales", "name": "Vertrieb", "senders": ["angebote@acme.example"]},
                    {"id": "accounting", "name": "Buchhaltung", "senders": ["rechnung@acme.example"]},
                ],
                "employees": [
                    {
                        "id": "u1",
                        "email": "anna@acme.example",
                        "name": "Anna Berg",
                        "group": "sales",
                        "signature_text": "Anna Berg\nVertrieb\nACME GmbH",
                    },
                    {
                        "id": "u2",
                        "email": "ben@acme.example",
                        "name": "Ben Kurz",
                        "group": "accounting",
                        "signature_text": "Ben Kurz\nBuchhaltung\nACME GmbH",
                    },
                    {
                        "id": "u3",
                        "email": "carla@acme.example",
                        "name": "Carla Neu",
                        "signature_text": "Carla Neu\nACME GmbH",
                    },
                ],
            },
            {
                "id": "bistro",
                "smtp": smtp,
                "series": {"batch_size": 20, "pause_ms": 100},
                "archive_bcc": "belege@bistro.example",
                "use_user_mail_data": True,
                "employees": [
                    {
                        "id": "k1",
                        "email": "kasse1@bistro.example",
                        "name": "Kasse 1",
                        "signature_text": "Bistro am Markt\nMarktplatz 1",
                    },
                ],
            },
        ]
    }


def demo_jobs(count: int) -> list[Expectation]:
    """Invoices, offers, dunning letters and receipts, one invoice to a greylisting customer (sent
    on the retry), one sender the rules refuse, and one job for a branch whose tenant is not
    loaded yet: those two end in the dead-letter queue."""
    expectations = []
    for n in range(count):
        kind = n % 6
        customer = f"kunde{n:04d}@example.com"
        if kind in (0, 1, 2):
            job = make_job("acme", "invoice", n, user_id="u2", clerk_id="u1", to=customer)
        elif kind == 3:
            job = make_job("acme", "offer", n, user_id="u1", to=customer)
        elif kind == 4:
            job = make_job("acme", "dunning", n, user_id="u2", to=customer)
        else:
            job = make_job("bistro", "receipt", n, user_id="k1", to=customer)
        expectations.append(Expectation(job))
    greylisted = make_job("acme", "invoice", count + 2, user_id="u2", clerk_id="u1", to=GREYLISTED)
    expectations.append(Expectation(greylisted))
    refused = make_job("acme", "invoice", count, user_id="u3", to="kunde-x@example.com")
    expectations.append(Expectation(refused, Reason.SENDER_NOT_PERMITTED))
    branch = make_job(UNLOADED_TENANT, "order", count + 1, user_id="u1", to="kunde-nord@example.com")
    expectations.append(Expectation(branch, Reason.UNKNOWN_TENANT))
    return expectations


def run_demo(settings: Settings, *, count: int, processes: int, threads: int, workdir: Path) -> int:
    say = print
    for problem in (check_broker(settings.broker_url), _database_problem(settings)):
        if problem:
            say(f"postbote demo: {problem}", file=sys.stderr)
            return 1
    with connect(settings.database_url) as conn:
        upgrade(conn)
    run_dir = workdir / time.strftime("%Y%m%d-%H%M%S")
    sink = Sink(run_dir / "maildir", handler=RecipientRules(run_dir / "maildir", rules=GREYLISTING))
    say(f"SMTP sink listening on 127.0.0.1:{sink.port}, storing mail in {sink.handler.maildir}")
    tenant_path = run_dir / "tenants.yaml"
    tenant_path.write_text(yaml.safe_dump(demo_tenants(sink.port), allow_unicode=True, sort_keys=False))
    with connect(settings.database_url) as conn:
        for change in apply_tenants(conn, read_tenant_file(tenant_path)):
            say(f"tenant {change.tenant}: {change.action}")
    env = {
        **os.environ,
        "POSTBOTE_METRICS_PORT": str(free_port()),
        "POSTBOTE_QUEUE_PREFIX": settings.queue_prefix,
        "POSTBOTE_DATABASE_URL": settings.database_url,
        "POSTBOTE_BROKER_URL": settings.broker_url,
    }
    log = (run_dir / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "worker", "--processes", str(processes), "--threads", str(threads)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        return _publish_and_watch(settings, sink, run_dir, count, say)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
        log.close()
        sink.stop()


def _publish_and_watch(settings: Settings, sink: Sink, run_dir: Path, count: int, say: Any) -> int:
    expectations = demo_jobs(count)
    import json

    jobs, errors = parse_jobs("\n".join(json.dumps(e.job) for e in expectations))
    assert not errors, errors
    started = time.monotonic()
    ids = publish(jobs, broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
    say(f"published {len(ids)} documents ({Counter(e.job['document']['type'] for e in expectations)})")
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + max(120, count) + settings.max_backoff_ms / 1000
    last_progress = ""
    while time.monotonic() < deadline:
        with connect(settings.database_url) as conn:
            rows = conn.execute(
                "SELECT job_id::text, status, reason, detail FROM deliveries"
                " WHERE job_id = ANY(%s::uuid[]) AND status = ANY(%s)",
                ([str(i) for i in ids], list(FINAL)),
            ).fetchall()
        final = {str(r["job_id"]): r for r in rows}
        progress = f"  {len(final)}/{len(ids)} done, {len(read_index(sink.handler.maildir))} mails received"
        # One line rewritten in place on a terminal; a line per change in a log.
        if sys.stdout.isatty():
            sys.stdout.write(f"\r{progress}")
            sys.stdout.flush()
        elif progress != last_progress:
            print(progress, flush=True)
        last_progress = progress
        if len(final) == len(ids):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    say("")
    status = _summary(expectations, final, sink.handler.maildir, elapsed, run_dir, say)
    if status == 0:
        _explain_greylisting(settings, expectations, say)
        _explain_events(settings, [str(i) for i in ids], say)
        _explain_dead_letters(expectations, final, say)
        say("\nEvery expected mail arrived; the greylisted customer got the invoice on the retry;")
        say("the refused sender was refused.")
    return status


def _summary(
    expectations: list[Expectation],
    final: dict[str, dict[str, Any]],
    maildir: Path,
    elapsed: float,
    run_dir: Path,
    say: Any,
) -> int:
    received: dict[str, list[str]] = {}
    for record in read_index(maildir):
        with (maildir / record["file"]).open("rb") as f:
            message = email.message_from_binary_file(f, policy=policy.default)
        received.setdefault(str(message["X-Postbote-Job"]), []).extend(record["rcpt_tos"])
    problems = []
    sent = 0
    failures: Counter[str] = Counter()
    for e in expectations:
        job_id = e.job["job_id"]
        row = final.get(job_id)
        number = e.job["document"]["number"]
        if row is None:
            problems.append(f"{number}: no outcome")
        elif Status(row["status"]).delivered:
            sent += 1
            if e.failure is not None:
                problems.append(f"{number}: expected {e.failure}, but it was sent")
            elif not set(e.job["to"]) <= set(received.get(job_id, [])):
                problems.append(f"{number}: marked sent but not received by the sink")
        else:
            failures[row["reason"]] += 1
            if row["reason"] != e.failure:
                problems.append(f"{number}: expected {e.failure or 'sent'}, got {row['reason']}")
    say("\nSummary")
    say(f"  sent:     {sent} mails in {elapsed:.1f} s ({sent / elapsed:.1f} mails/s)")
    for reason, n in sorted(failures.items()):
        say(f"  failed:   {n} × {reason}")
    for e in expectations:
        row = final.get(e.job["job_id"])
        if row and row["status"] == Status.FAILED:
            say(f"            {e.job['document']['number']}: {row['detail']}")
            say(f"            see: postbote status {e.job['job_id']}")
    index = read_index(maildir)
    envelope = sum(len(r["rcpt_tos"]) for r in index)
    say(
        f"  mail:     {maildir} ({len(index)} messages to {envelope} envelope recipients, archive copies included)"
    )
    say(f"  worker log: {run_dir / 'worker.log'}")
    if problems:
        say("\nNot as expected:")
        for p in problems[:20]:
            say(f"  {p}")
        return 1
    return 0


def _explain_events(settings: Settings, job_ids: list[str], say: Any) -> None:
    with connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT type, count(*) AS n FROM events WHERE job_id = ANY(%s::uuid[]) GROUP BY type ORDER BY type",
            (job_ids,),
        ).fetchall()
    seen = ", ".join(f"{r['type']} {r['n']}" for r in rows)
    say(f"\nDelivery events written with the ledger (exchange {settings.queue_prefix}.events): {seen}")
    say("  postbote events tail --follow      # watch them; docs/events.md has a consumer")


def _explain_greylisting(settings: Settings, expectations: list[Expectation], say: Any) -> None:
    job = next(e.job for e in expectations if e.job["to"] == [GREYLISTED])
    with connect(settings.database_url) as conn:
        record = delivery_record(conn, UUID(job["job_id"]))
    if record is None:
        return
    say(f"\nGreylisting: {job['document']['number']} to {GREYLISTED} ({record['status']})")
    for attempt in record["history"]:
        say(f"  attempt {attempt['attempt']}: {attempt['outcome']}")
        for r in attempt["recipients"]:
            say(
                f"    {r['role']:<8} {r['address']:<26} {r['reply'] or 'held back: no customer accepted yet'}"
            )
    say("  The clerk and archive copies waited for the customer; everyone got exactly one mail.")
    say(f"  postbote status {job['job_id']}")


def _explain_dead_letters(
    expectations: list[Expectation], final: dict[str, dict[str, Any]], say: Any
) -> None:
    dead = [e.job for e in expectations if (final.get(e.job["job_id"]) or {}).get("status") == Status.FAILED]
    if not dead:
        return
    branch = next((j for j in dead if j["tenant"] == UNLOADED_TENANT), dead[0])
    say("\nDead-letter queue (kept in PostgreSQL until purged, each job with its reason):")
    say("  postbote dlq list                          # every dead job: tenant, document, reason, attempts")
    say(f"  postbote dlq show {branch['job_id']}")
    say(f"  # the order for {UNLOADED_TENANT} died as unknown_tenant; once its tenant is loaded")
    say("  # (postbote tenants apply FILE), send it again - the ledger lets it go out exactly once:")
    say(f"  postbote dlq replay {branch['job_id']}")
    say("  postbote dlq replay --reason unknown_tenant --dry-run   # or all jobs that died for that reason")


def _database_problem(settings: Settings) -> str | None:
    try:
        ensure_database(settings.database_url)
    except Exception as e:  # noqa: BLE001
        return str(e)
    return check_database(settings.database_url)


__all__ = ["demo_jobs", "demo_tenants", "run_demo"]
