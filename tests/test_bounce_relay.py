"""Bounces from a real relay, read from a real mailbox: postbote submits to a local Postfix that
relays to a server answering 550, 552, 554 or 451 for chosen addresses; Postfix writes its own
RFC 3464 reports into the sender's mailbox, next to customer replies, and the worker reads them
over IMAP (Dovecot) as they arrive.

The bars: every report lands on the right job and recipient with its class and nothing else is
attributed; ledger, event and metric follow within 5 s of the report's arrival; customer mail and
unmatched reports stay untouched; a second ingest changes nothing.
"""

from __future__ import annotations

import email
import hashlib
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import imapclient
import pytest

from tests.support.bounces import corpus_report, events_of
from tests.support.ledger import wait_final
from tests.support.mailrelay import (
    MAILBOX,
    TOKEN,
    VERP_DOMAIN,
    MailRelay,
    start_relay,
    stop_relay,
    unavailable,
)
from tests.support.observe import sample, wait_for, wait_metrics
from tests.support.services import (
    RunningWorker,
    add_tenant,
    delete_queues,
    isolated_settings,
    postbote,
    send_jobs,
)
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

UNKNOWN = [f"weg{n}@example.com" for n in range(7)]
REFUSALS = {
    **{a: f"550 5.1.1 <{a}>: Recipient address rejected: User unknown" for a in UNKNOWN},
    "voll@example.com": "552 5.2.2 <voll@example.com>: Mailbox full",
    "spam@example.com": "554 5.7.1 Message rejected as spam by policy",
    "spaeter@example.com": "451 4.2.1 Mailbox busy, try again later",
}
EXPECTED_CLASS = {
    **dict.fromkeys(UNKNOWN, "invalid_recipient"),
    "voll@example.com": "mailbox_full",
    "spam@example.com": "policy",
    "spaeter@example.com": "delayed",
}
PROCESSED = "Processed"


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    """The server behind the relay: refuses the addresses of ``REFUSALS``, accepts the rest."""
    maildir = tmp_path_factory.mktemp("upstream")
    rules: dict[str, list[str | None]] = {a: [reply] for a, reply in REFUSALS.items()}
    sink = Sink(maildir, handler=RecipientRules(maildir, rules=rules))
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def relay(upstream: Sink) -> Iterator[MailRelay]:
    why = unavailable()
    if why is not None:
        pytest.fail(why)
    running = start_relay(upstream)
    yield running
    stop_relay(running)


@pytest.fixture(scope="module")
def relay_settings(settings: Settings) -> Iterator[Settings]:
    own = isolated_settings(settings)
    yield own
    delete_queues(own)


@pytest.fixture(scope="module")
def tenant(
    relay: MailRelay, upstream: Sink, relay_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A tenant sending through the relay as ``rechnung@acme.example``, whose mailbox gets the bounces."""
    workdir = tmp_path_factory.mktemp("tenant")
    secret = workdir / "imap-password"
    secret.write_text(relay.imap_settings()["password"] + "\n")  # type: ignore[operator]
    imap = relay.imap_settings(processed_folder=PROCESSED)
    del imap["password"]
    return add_tenant(
        relay_settings.database_url,
        upstream,
        workdir,
        smtp={"host": "127.0.0.1", "port": relay.smtp_port, "security": "none", "helo": "test.postbote"},
        employees=[{"id": "u1", "email": MAILBOX, "name": "Rechnung"}],
        bounces={"imap": {**imap, "password_file": str(secret)}, "dsn": True},
    )


@pytest.fixture(scope="module")
def relay_worker(relay_settings: Settings, tenant: str) -> Iterator[RunningWorker]:
    worker = RunningWorker(relay_settings, processes=1, threads=4)
    yield worker
    worker.stop()


def invoice(tenant: str, number: int, *customers: str) -> dict[str, Any]:
    job = make_job(tenant, "invoice", number, user_id="u1", to=customers[0])
    job["to"] = list(customers)
    return job


def imap_client(relay: MailRelay, folder: str) -> imapclient.IMAPClient:
    client = imapclient.IMAPClient("127.0.0.1", port=relay.imap_port, ssl=False, timeout=30)
    settings = relay.imap_settings()
    client.login(str(settings["user"]), str(settings["password"]))
    client.select_folder(folder, readonly=True)
    return client


def folder_contents(relay: MailRelay, folder: str) -> dict[int, tuple[bytes, tuple[bytes, ...], Any]]:
    """UID → (bytes, flags, INTERNALDATE) of every message in ``folder``."""
    client = imap_client(relay, folder)
    try:
        fetched = client.fetch(client.search(["ALL"]), ["BODY.PEEK[]", "FLAGS", "INTERNALDATE"])
    finally:
        client.logout()
    return {uid: (d[b"BODY[]"], tuple(d[b"FLAGS"]), d[b"INTERNALDATE"]) for uid, d in fetched.items()}


def test_postfix_reports_in_the_mailbox_land_on_their_jobs_and_recipients_and_nothing_else_is_touched(
    relay: MailRelay, tenant: str, relay_settings: Settings, relay_worker: RunningWorker, db: Connection
) -> None:
    jobs = [invoice(tenant, 1, "spaeter@example.com")]
    jobs += [
        invoice(tenant, 10 + n, a)
        for n, a in enumerate([*UNKNOWN[:-1], "voll@example.com", "spam@example.com"])
    ]
    jobs += [invoice(tenant, 30, "ok1@example.com", UNKNOWN[-1]), invoice(tenant, 31, "ok2@example.com")]
    ids = send_jobs(relay_settings, jobs)
    by_address = {a: job_id for job, job_id in zip(jobs, ids, strict=True) for a in job["to"]}
    wait_final(db, ids)

    customer_mail = [
        corpus_report("customer_reply.eml", by_address[UNKNOWN[0]], to=UNKNOWN[0]),
        corpus_report("out_of_office.eml", by_address["ok2@example.com"], to="ok2@example.com"),
        corpus_report("unknown_job.eml", by_address["ok2@example.com"], to="ok2@example.com"),
    ]
    for data in customer_mail:
        relay.deliver(data)

    def bounced() -> list[dict[str, Any]] | None:
        rows = db.execute(
            "SELECT b.job_id::text AS job_id, b.address, b.class, b.matched_by, b.received_at, b.report_key"
            " FROM bounce_reports b WHERE b.tenant_id = %s",
            (tenant,),
        ).fetchall()
        return rows if len(rows) == len(EXPECTED_CLASS) else None

    try:
        rows = wait_for(bounced, timeout=90, what="a report for every refused recipient")
    except AssertionError:
        raise AssertionError(f"{relay.log()[-3000:]}\n{relay_worker.output()[-3000:]}") from None

    assert {(r["job_id"], r["address"]): r["class"] for r in rows} == {
        (by_address[a], a): c for a, c in EXPECTED_CLASS.items()
    }
    assert {r["matched_by"] for r in rows} == {"message_id+envid"}

    statuses = {
        str(r["job_id"]): (r["status"], r["reason"])
        for r in db.execute(
            "SELECT job_id, status, reason FROM deliveries WHERE job_id = ANY(%s::uuid[])", (ids,)
        )
    }
    for address, bounce_class in EXPECTED_CLASS.items():
        job_id = by_address[address]
        types = [e["type"] for e in events_of(db, job_id)]
        if bounce_class == "delayed":
            assert statuses[job_id] == ("sent", None)
            assert "delayed" in types
        elif address == UNKNOWN[-1]:
            assert statuses[job_id] == ("partial", "bounced")
        else:
            assert statuses[job_id] == ("failed", "bounced")
            assert types[-1] == "bounced"
    assert statuses[by_address["ok2@example.com"]] == ("sent", None)
    assert "bounced" not in [e["type"] for e in events_of(db, by_address["ok2@example.com"])]

    processed = folder_contents(relay, PROCESSED)
    arrived = {}
    for data, _, internal_date in processed.values():
        message_id = (email.message_from_bytes(data).get("Message-ID") or "").strip()
        arrived[hashlib.sha256(message_id.encode()).hexdigest()] = internal_date
    for row in rows:
        arrival = arrived[row["report_key"]].replace(tzinfo=row["received_at"].tzinfo)
        assert row["received_at"] - arrival < timedelta(seconds=6), (row, arrival)

    metrics = wait_metrics(relay_worker.metrics_port)
    assert sample(metrics, "postbote_bounces_total", tenant=tenant, **{"class": "invalid_recipient"}) == len(
        UNKNOWN
    )
    assert sample(metrics, "postbote_bounces_total", tenant=tenant, **{"class": "delayed"}) == 1

    inbox = folder_contents(relay, "INBOX")
    assert sorted(data for data, _, _ in inbox.values()) == sorted(customer_mail)
    assert all(b"\\Seen" not in flags and b"\\Deleted" not in flags for _, flags, _ in inbox.values())

    events_before = db.execute("SELECT count(*) AS n FROM events").fetchone()
    again = postbote(
        relay_settings,
        "bounces",
        "ingest",
        str(relay.maildir / f".{PROCESSED}"),
        "--tenant",
        tenant,
        "--json",
    )
    assert again.returncode == 0, again.stderr
    outcomes = {r["outcome"] for line in again.stdout.splitlines() for r in json.loads(line)["recorded"]}
    assert outcomes == {"duplicate"}
    fetched = postbote(relay_settings, "bounces", "fetch", "--tenant", tenant, "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["matched"] == 0
    assert db.execute("SELECT count(*) AS n FROM events").fetchone() == events_before


def test_bounces_fetch_names_the_tenant_without_a_mailbox(
    relay_settings: Settings, tenant: str, tmp_path: Path
) -> None:
    result = postbote(relay_settings, "bounces", "fetch", "--tenant", "no-such-tenant")
    assert result.returncode == 2
    assert "unknown tenant 'no-such-tenant'" in result.stderr


def test_a_verp_return_path_brings_the_report_to_its_job_through_a_local_pipe(
    relay: MailRelay,
    upstream: Sink,
    relay_settings: Settings,
    relay_worker: RunningWorker,
    db: Connection,
    tmp_path: Path,
) -> None:
    handler = upstream.handler
    assert isinstance(handler, RecipientRules)
    handler.rules["verp@example.com"] = [
        "550 5.1.1 <verp@example.com>: Recipient address rejected: User unknown"
    ]
    owner = add_tenant(
        relay_settings.database_url,
        upstream,
        tmp_path,
        smtp={"host": "127.0.0.1", "port": relay.smtp_port, "security": "none", "helo": "test.postbote"},
        employees=[{"id": "u1", "email": MAILBOX, "name": "Rechnung"}],
        bounces={"verp": VERP_DOMAIN},
    )
    [job_id] = send_jobs(relay_settings, [invoice(owner, 1, "verp@example.com", "ok-verp@example.com")])
    wait_final(db, [job_id])
    [record] = [r for r in handler.received if "ok-verp@example.com" in r.rcpt_tos]
    assert record.mail_from == f"bounce+{job_id.replace('-', '')}@{VERP_DOMAIN}"

    wait_for(
        lambda: list((relay.verp_maildir / "new").glob("*")),
        timeout=60,
        what="the report at the VERP address",
    )
    result = postbote(relay_settings, "bounces", "ingest", str(relay.verp_maildir), "--json")
    assert result.returncode == 0, result.stderr
    [line] = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["job_id"], r["address"], r["class"], r["matched_by"]) for r in line["recorded"]] == [
        (job_id, "verp@example.com", "invalid_recipient", "message_id+verp")
    ]
    assert db.execute("SELECT status, reason FROM deliveries WHERE job_id = %s", (job_id,)).fetchone() == {
        "status": "partial",
        "reason": "bounced",
    }


def test_test_mail_says_whether_the_relay_offers_dsn(relay_settings: Settings, tenant: str) -> None:
    result = postbote(
        relay_settings, "test-mail", "--tenant", tenant, "--from", MAILBOX, "--to", "ok-test@example.com"
    )
    assert result.returncode == 0, result.stderr
    assert "DSN         offered" in result.stdout
    as_json = postbote(
        relay_settings,
        "test-mail",
        "--tenant",
        tenant,
        "--from",
        MAILBOX,
        "--to",
        "ok-test@example.com",
        "--json",
    )
    assert json.loads(as_json.stdout)["dsn"] is True


def test_bounces_fetch_logs_in_with_an_oauth2_token_as_the_smtp_login_does(
    relay: MailRelay, upstream: Sink, relay_settings: Settings, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    imap = relay.imap_settings(auth="xoauth2", token_file=str(token_file))
    del imap["password"]
    owner = add_tenant(relay_settings.database_url, upstream, tmp_path, bounces={"imap": imap})

    token_file.write_text(TOKEN + "\n")
    fetched = postbote(relay_settings, "bounces", "fetch", "--tenant", owner, "--json")
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["matched"] == 0

    token_file.write_text("ya29.expired-token\n")
    refused = postbote(relay_settings, "bounces", "fetch", "--tenant", owner)
    assert refused.returncode == 1
    assert f"IMAP login as {MAILBOX} at 127.0.0.1 failed" in refused.stderr
    assert "expired-token" not in refused.stderr
