"""Webhooks: a tenant's delivery events reach each of its URLs in the order they were written,
signed the Standard Webhooks way; a refusing receiver blocks the events behind the refused one
until it accepts, and one that never accepts ends with failed deliveries an operator resends."""

from __future__ import annotations

import base64
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks
from pydantic import ValidationError

from schemas.constants import METRIC_WEBHOOK_DELIVERIES
from schemas.tenant import Tenant
from tests.support.ledger import wait_final
from tests.support.observe import http_get, sample, wait_for
from tests.support.services import (
    RunningWorker,
    add_tenant,
    database_url,
    delete_queues,
    isolated_settings,
    postbote,
    send_jobs,
)
from tests.support.webhooks import Receiver, assert_signed
from worker.db import Connection, connect, drop_database, ensure_database, upgrade
from worker.errors import ConfigurationError
from worker.runtime.webhook_post import read_signer
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink

DELIVERIES = METRIC_WEBHOOK_DELIVERIES


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(answer: Callable[[int], int] = lambda n: 200) -> Receiver:
        receiver = Receiver(answer)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def hook_settings(settings: Settings) -> Iterator[Settings]:
    """A database and queue prefix of this test's own (only its workers send its webhooks) and
    short webhook retries."""
    url = database_url(f"postbote_test_hooks_{uuid.uuid4().hex[:10]}")
    ensure_database(url)
    with connect(url) as conn:
        upgrade(conn)
    own = isolated_settings(
        settings, database_url=url, webhook_min_backoff_ms=100, webhook_max_backoff_ms=400
    )
    yield own
    delete_queues(own)
    drop_database(url)


@pytest.fixture
def hook_db(hook_settings: Settings) -> Iterator[Connection]:
    with connect(hook_settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def secret(tmp_path: Path) -> tuple[str, Path]:
    """A Standard Webhooks secret and the secret_file holding it."""
    value = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    path = tmp_path / "webhook.secret"
    path.write_text(value + "\n")
    return value, path


@pytest.fixture
def workers(hook_settings: Settings) -> Iterator[Callable[..., RunningWorker]]:
    started: list[RunningWorker] = []

    def start(**overrides: Any) -> RunningWorker:
        running = RunningWorker(hook_settings, processes=1, threads=2, **overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def tenant_with_webhooks(
    settings: Settings, sink: Sink, workdir: Path, *webhooks: dict[str, Any], **fields: Any
) -> str:
    return add_tenant(settings.database_url, sink, workdir, webhooks=list(webhooks), **fields)


def emit(db: Connection, tenant: str, *types: str, job_id: uuid.UUID | None = None) -> uuid.UUID:
    """Write events the way the ledger does: a ledger row, then ``postbote_emit_event``."""
    job = job_id or uuid.uuid4()
    db.execute(
        "INSERT INTO deliveries (job_id, tenant_id, doc_type, doc_number, payload_sha256, status)"
        " VALUES (%s, %s, 'invoice', %s, 'x', 'sending') ON CONFLICT DO NOTHING",
        (job, tenant, f"RE-{str(job)[:8]}"),
    )
    for event_type in types:
        db.execute("SELECT postbote_emit_event(%s, %s)", (job, event_type))
    return job


def event_ids(db: Connection, tenant: str, *types: str) -> list[str]:
    rows = db.execute(
        "SELECT event_id FROM events WHERE tenant_id = %s AND (%s::text[] IS NULL OR type = ANY(%s))"
        " ORDER BY id",
        (tenant, list(types) or None, list(types) or None),
    ).fetchall()
    return [str(r["event_id"]) for r in rows]


def received_ids(receiver: Receiver) -> list[str]:
    return [str(r.event["event_id"]) for r in receiver.accepted()]


def test_events_reach_each_webhook_in_the_order_they_were_written_signed(
    hook_settings: Settings,
    hook_db: Connection,
    sink: Sink,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    secret: tuple[str, Path],
    workers: Callable[..., RunningWorker],
) -> None:
    every, only_sent = receivers(), receivers()
    tenant = tenant_with_webhooks(
        hook_settings,
        sink,
        tmp_path,
        {"url": every.url, "secret_file": str(secret[1])},
        {"url": only_sent.url, "secret_file": str(secret[1]), "events": ["sent"]},
    )
    other = tenant_with_webhooks(hook_settings, sink, tmp_path)
    workers()
    jobs = [emit(hook_db, tenant, "retrying") for _ in range(4)]
    emit(hook_db, other, "sent")
    for job in reversed(jobs):
        emit(hook_db, tenant, "sent", job_id=job)

    written = event_ids(hook_db, tenant)
    assert len(written) == 8
    wait_for(lambda: len(every.accepted()) >= 8 and len(only_sent.accepted()) >= 4, what="8 + 4 events")
    assert received_ids(every) == written
    assert received_ids(only_sent) == event_ids(hook_db, tenant, "sent")
    assert_signed(every.requests + only_sent.requests, secret[0])
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(base64.b64encode(os.urandom(32)).decode()).verify(
            every.requests[0].body, every.requests[0].headers
        )
    first = every.requests[0].event
    assert (first["tenant"], first["type"], first["seq"], first["status"]) == (
        tenant,
        "retrying",
        1,
        "sending",
    )
    assert first["job_id"] == str(jobs[0])


def test_a_receiver_that_refuses_at_first_gets_every_event_in_order_once_it_accepts(
    hook_settings: Settings,
    hook_db: Connection,
    sink: Sink,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    secret: tuple[str, Path],
    workers: Callable[..., RunningWorker],
) -> None:
    receiver = receivers(lambda n: 500 if n < 3 else 200)
    tenant = tenant_with_webhooks(
        hook_settings, sink, tmp_path, {"url": receiver.url, "secret_file": str(secret[1])}
    )
    running = workers(webhook_retry_hours=1)
    for _ in range(4):
        emit(hook_db, tenant, "sent")

    wait_for(lambda: len(receiver.accepted()) >= 4, what="4 accepted events")
    written = event_ids(hook_db, tenant)
    assert received_ids(receiver) == written
    # The refused event blocked the ones behind it: the first four requests all carried it.
    assert [r.event["event_id"] for r in receiver.requests[:4]] == [written[0]] * 4
    assert len(receiver.requests) == 7
    assert_signed(receiver.requests, secret[0])
    assert hook_db.execute("SELECT count(*) AS n FROM webhook_deliveries").fetchone() == {"n": 0}
    metrics = wait_for(
        lambda: _metrics_with(running, tenant, "delivered", 4), what="the delivered count on /metrics"
    )
    assert sample(metrics, DELIVERIES, tenant=tenant, outcome="retrying") == 3
    assert sample(metrics, DELIVERIES, tenant=tenant, outcome="failed") == 0


def test_a_receiver_that_never_accepts_ends_with_failed_deliveries_that_a_resend_delivers(
    hook_settings: Settings,
    hook_db: Connection,
    sink: Sink,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    secret: tuple[str, Path],
    workers: Callable[..., RunningWorker],
) -> None:
    accepting = threading.Event()
    receiver = receivers(lambda n: 200 if accepting.is_set() else 503)
    tenant = tenant_with_webhooks(
        hook_settings, sink, tmp_path, {"url": receiver.url, "secret_file": str(secret[1])}
    )
    running = workers(webhook_retry_hours=1.5 / 3600)
    emit(hook_db, tenant, "retrying", "sent")

    failed = wait_for(
        lambda: _failed_listing(hook_settings, tenant, 2), timeout=60, what="2 failed deliveries"
    )
    written = event_ids(hook_db, tenant)
    assert [f["event_id"] for f in failed] == written
    assert all(f["attempts"] >= 2 and f["last_error"].startswith("HTTP 503") for f in failed)
    [state] = json.loads(postbote(hook_settings, "events", "webhooks", "--json", "--tenant", tenant).stdout)
    assert (state["url"], state["backlog"], state["failed"], state["attempts"]) == (receiver.url, 0, 2, 0)
    assert not receiver.accepted()

    accepting.set()
    ids = [str(f["id"]) for f in failed]
    resent = postbote(hook_settings, "events", "webhooks", "--resend", *ids)
    assert resent.returncode == 0, resent.stdout + resent.stderr
    assert resent.stdout.splitlines() == [f"{i}: resent" for i in ids]
    assert received_ids(receiver) == written
    assert_signed(receiver.accepted(), secret[0])
    again = postbote(hook_settings, "events", "webhooks", "--resend", ids[0])
    assert again.returncode == 0 and "already resent" in again.stdout
    assert _failed_listing(hook_settings, tenant, 0) == []
    unknown = postbote(hook_settings, "events", "webhooks", "--resend", "999999")
    assert unknown.returncode == 1 and "999999: not found" in unknown.stdout

    later = emit(hook_db, tenant, "sent")
    wait_for(lambda: len(receiver.accepted()) == 3, what="the next event, delivered as usual")
    assert receiver.accepted()[-1].event["job_id"] == str(later)
    metrics = wait_for(lambda: _metrics_with(running, tenant, "delivered", 1), what="the counts on /metrics")
    assert sample(metrics, DELIVERIES, tenant=tenant, outcome="failed") == 2


def test_an_event_written_later_with_a_smaller_id_is_not_passed_over(
    hook_settings: Settings,
    hook_db: Connection,
    sink: Sink,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    secret: tuple[str, Path],
    workers: Callable[..., RunningWorker],
) -> None:
    receiver = receivers()
    tenant = tenant_with_webhooks(
        hook_settings, sink, tmp_path, {"url": receiver.url, "secret_file": str(secret[1])}
    )
    workers()
    emit(hook_db, tenant, "sent")
    wait_for(lambda: len(receiver.accepted()) == 1, what="the first event")
    with connect(hook_settings.database_url) as slow:  # a ledger transaction that takes its time
        emit(slow, tenant, "sent")
        emit(hook_db, tenant, "sent")  # a larger id, committed first
        threading.Event().wait(2)
        assert len(receiver.accepted()) == 1
        slow.commit()
    wait_for(lambda: len(receiver.accepted()) == 3, what="both events")
    assert received_ids(receiver) == event_ids(hook_db, tenant)


def test_two_hosts_send_each_event_once_and_in_order(
    hook_settings: Settings,
    hook_db: Connection,
    sink: Sink,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    secret: tuple[str, Path],
    workers: Callable[..., RunningWorker],
) -> None:
    receiver = receivers()
    tenant = tenant_with_webhooks(
        hook_settings, sink, tmp_path, {"url": receiver.url, "secret_file": str(secret[1])}
    )
    workers()
    workers()
    for _ in range(30):
        emit(hook_db, tenant, "retrying", "sent")
    wait_for(lambda: len(receiver.requests) >= 60, what="60 events")
    threading.Event().wait(1)
    assert received_ids(receiver) == event_ids(hook_db, tenant)


def test_jobs_sent_by_a_worker_report_their_events_to_the_webhook(
    hook_settings: Settings,
    hook_db: Connection,
    sink: Sink,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    secret: tuple[str, Path],
    workers: Callable[..., RunningWorker],
) -> None:
    receiver = receivers()
    tenant = tenant_with_webhooks(
        hook_settings,
        sink,
        tmp_path,
        {"url": receiver.url, "secret_file": str(secret[1]), "events": ["sent"]},
    )
    workers()
    ids = send_jobs(
        hook_settings, [make_job(tenant, "invoice", n, user_id="u1", to="k@example.com") for n in range(3)]
    )
    wait_final(hook_db, ids)
    wait_for(lambda: len(receiver.accepted()) == 3, what="3 sent events")
    assert sorted(r.event["job_id"] for r in receiver.accepted()) == sorted(ids)
    assert {r.event["status"] for r in receiver.accepted()} == {"sent"}
    assert_signed(receiver.accepted(), secret[0])


def test_a_webhook_missing_its_secret_retries_without_showing_a_secret(
    hook_settings: Settings,
    hook_db: Connection,
    sink: Sink,
    tmp_path: Path,
    receivers: Callable[..., Receiver],
    workers: Callable[..., RunningWorker],
) -> None:
    receiver = receivers()
    tenant = tenant_with_webhooks(
        hook_settings, sink, tmp_path, {"url": receiver.url, "secret_file": str(tmp_path / "missing.secret")}
    )
    workers(webhook_retry_hours=1)
    emit(hook_db, tenant, "sent")
    listing = wait_for(
        lambda: _retrying(postbote(hook_settings, "events", "webhooks", "--tenant", tenant).stdout),
        what="the webhook retrying",
    )
    assert "cannot read secret_file" in listing and "missing.secret" in listing
    assert not receiver.requests


def test_applying_the_tenant_file_again_keeps_a_webhook_cursor_and_dropping_the_webhook_removes_it(
    hook_settings: Settings, hook_db: Connection, sink: Sink, tmp_path: Path, secret: tuple[str, Path]
) -> None:
    hook = {"url": "https://erp.example/hooks/postbote", "secret_file": str(secret[1])}
    tenant = tenant_with_webhooks(hook_settings, sink, tmp_path, hook)
    emit(hook_db, tenant, "sent")
    cursor = hook_db.execute(
        "SELECT last_event_id FROM webhook_cursors WHERE tenant_id = %s", (tenant,)
    ).fetchone()
    tenant_with_webhooks(hook_settings, sink, tmp_path, hook, id=tenant)
    again = hook_db.execute(
        "SELECT last_event_id FROM webhook_cursors WHERE tenant_id = %s", (tenant,)
    ).fetchone()
    assert cursor == again
    tenant_with_webhooks(hook_settings, sink, tmp_path, id=tenant)
    assert hook_db.execute("SELECT * FROM webhook_cursors WHERE tenant_id = %s", (tenant,)).fetchall() == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://erp.example/hook", "must be https://"),
        ("https://user:pw@erp.example/hook", "must not carry a user or password"),
        ("ftp://erp.example/hook", "should match pattern"),
        ("https://erp.example/a b", "should match pattern"),
    ],
)
def test_a_webhook_url_must_be_https_or_loopback_http(url: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        Tenant.model_validate(
            {
                "id": "acme",
                "smtp": {"host": "smtp.acme.example"},
                "webhooks": [{"url": url, "secret_file": "/s"}],
            }
        )


def test_a_webhook_event_filter_names_known_event_types() -> None:
    with pytest.raises(ValidationError, match="webhooks.0.events.0"):
        Tenant.model_validate(
            {
                "id": "acme",
                "smtp": {"host": "smtp.acme.example"},
                "webhooks": [{"url": "https://erp.example/h", "secret_file": "/s", "events": ["snet"]}],
            }
        )


@pytest.mark.parametrize(
    "content", ["", "c2VjcmV0", "whsec_not base64!", "whsec_" + base64.b64encode(b"x" * 8).decode()]
)
def test_a_secret_file_must_hold_a_standard_webhooks_secret_and_errors_do_not_show_it(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "secret"
    path.write_text(content)
    with pytest.raises(ConfigurationError) as raised:
        read_signer(path)
    assert str(path) in str(raised.value)
    assert not content or content not in str(raised.value)


def _failed_listing(settings: Settings, tenant: str, count: int) -> list[dict[str, Any]] | None:
    result = postbote(settings, "events", "webhooks", "--failed", "--json", "--tenant", tenant)
    assert result.returncode == 0, result.stderr
    failed: list[dict[str, Any]] = json.loads(result.stdout)
    return failed if len(failed) == count else None


def _retrying(listing: str) -> str | None:
    return listing if "retrying (try" in listing else None


def _metrics_with(running: RunningWorker, tenant: str, outcome: str, value: float) -> str | None:
    text = http_get(running.metrics_port, "/metrics")[1]
    return text if sample(text, DELIVERIES, tenant=tenant, outcome=outcome) == value else None
