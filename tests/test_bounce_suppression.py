"""The suppression list holds mail to dead addresses instead of dropping it: a hard bounce, then a
new invoice to that address waits as ``held`` with an event; removing the entry sends it once; a
``send`` policy sends offers anyway; a 5.1.x refusal at RCPT suppresses too."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.bounces import corpus_report, events_of
from tests.support.ledger import recipient_states, wait_status
from tests.support.services import RunningWorker, delete_queues, isolated_settings, postbote, send_jobs
from worker.bounces import ingest_report
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

DEAD = "weg@example.com"


@pytest.fixture(scope="module")
def own_settings(settings: Settings) -> Iterator[Settings]:
    own = isolated_settings(settings, min_backoff_ms=200, max_backoff_ms=500)
    yield own
    delete_queues(own)


@pytest.fixture(scope="module")
def running(own_settings: Settings) -> Iterator[RunningWorker]:
    worker = RunningWorker(own_settings, processes=1, threads=2)
    yield worker
    worker.stop()


@dataclass
class Shop:
    """A running worker, a sink answering by per-address rules, and tenants sending to it."""

    settings: Settings
    sink: Sink
    db: Connection
    make_tenant: Callable[..., str]

    def tenant(self, **fields: Any) -> str:
        smtp = {"host": self.sink.host, "port": self.sink.port, "security": "none", "helo": "test.postbote"}
        return self.make_tenant(smtp=smtp, **fields)

    def delivered(self, address: str) -> int:
        handler = self.sink.handler
        assert isinstance(handler, RecipientRules)
        return handler.delivered_to(address)


@pytest.fixture
def shop(
    own_settings: Settings,
    running: RunningWorker,
    faulty_sink: Callable[..., Sink],
    make_tenant: Callable[..., str],
    db: Connection,
) -> Shop:
    return Shop(own_settings, faulty_sink(RecipientRules), db, make_tenant)


def document(tenant: str, doc_type: str, number: int, to: str = DEAD) -> dict[str, Any]:
    return make_job(tenant, doc_type, number, user_id="u1", to=to)


def cli(settings: Settings, *args: str, input: str | None = None) -> str:
    result = postbote(settings, *args, input=input)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_hard_bounce_holds_the_next_invoice_to_that_address_until_the_entry_is_removed(shop: Shop) -> None:
    tenant = shop.tenant()
    [first] = send_jobs(shop.settings, [document(tenant, "invoice", 1)])
    wait_status(shop.db, first, "sent")
    ingest_report(shop.db, corpus_report("m365_dsn.eml", first, to=DEAD))
    assert wait_status(shop.db, first, "failed")["reason"] == "bounced"

    [second] = send_jobs(shop.settings, [document(tenant, "invoice", 2)])
    held = wait_status(shop.db, second, "held")
    assert held["reason"] == "suppressed"
    assert DEAD in (held["detail"] or "")
    [event] = [e["body"] for e in events_of(shop.db, second) if e["type"] == "held"]
    assert (event["status"], event["reason"]) == ("held", "suppressed")
    [named] = event["recipients"]
    assert (named["address"], named["state"]) == (DEAD, "suppressed")
    assert named["reply"].startswith("suppressed: bounce, invalid_recipient, 550 5.1.10")
    assert shop.delivered(DEAD) == 1

    listed = json.loads(cli(shop.settings, "suppression", "list", "--tenant", tenant, "--json"))
    assert [(e["address"], e["source"], e["class"], e["held_jobs"]) for e in listed] == [
        (DEAD, "bounce", "invalid_recipient", 1)
    ]
    assert "released 1 held jobs" in cli(shop.settings, "suppression", "remove", "--tenant", tenant, DEAD)
    wait_status(shop.db, second, "sent", timeout=60)
    assert shop.delivered(DEAD) == 2
    assert recipient_states(shop.db, second) == {DEAD: ("to", "accepted")}
    assert "released 0 held jobs" in cli(shop.settings, "suppression", "release", "--tenant", tenant, "--all")
    wait_status(shop.db, second, "sent")
    assert shop.delivered(DEAD) == 2


def test_a_send_policy_sends_offers_anyway_and_release_sends_a_held_invoice_while_the_entry_stays(
    shop: Shop,
) -> None:
    tenant = shop.tenant(suppression={"offer": "send"})
    cli(shop.settings, "suppression", "add", "--tenant", tenant, DEAD, "--note", "customer moved")
    offer, invoice = send_jobs(shop.settings, [document(tenant, "offer", 1), document(tenant, "invoice", 1)])
    wait_status(shop.db, offer, "sent")
    wait_status(shop.db, invoice, "held")
    assert shop.delivered(DEAD) == 1

    assert "released 1 held jobs" in cli(shop.settings, "suppression", "release", "--tenant", tenant, DEAD)
    wait_status(shop.db, invoice, "sent", timeout=60)
    assert shop.delivered(DEAD) == 2
    assert DEAD in cli(shop.settings, "suppression", "list", "--tenant", tenant)


def test_an_address_refused_as_unknown_at_rcpt_is_suppressed_as_a_refusal(shop: Shop) -> None:
    handler = shop.sink.handler
    assert isinstance(handler, RecipientRules)
    handler.rules[DEAD] = ["550 5.1.1 <weg@example.com>: user unknown"]
    tenant = shop.tenant()
    [job_id] = send_jobs(shop.settings, [document(tenant, "invoice", 1)])
    assert wait_status(shop.db, job_id, "failed")["reason"] == "recipients_refused"
    row = shop.db.execute(
        "SELECT source, class, expires_at FROM suppressions WHERE tenant_id = %s AND address = %s",
        (tenant, DEAD),
    ).fetchone()
    assert row == {"source": "refusal", "class": "invalid_recipient", "expires_at": None}


def test_import_and_export_round_trip_and_a_bad_line_imports_nothing(
    own_settings: Settings, make_tenant: Callable[..., str], sink: Sink, tmp_path: Path
) -> None:
    tenant = make_tenant()

    def import_lines(text: str) -> Any:
        return postbote(own_settings, "suppression", "import", "--tenant", tenant, "-", input=text)

    bad = import_lines("a@example.com\nnot-an-address\n")
    assert bad.returncode == 2
    assert "line 2: 'not-an-address' is not an e-mail address; nothing imported" in bad.stderr
    assert cli(own_settings, "suppression", "export", "--tenant", tenant).splitlines()[1:] == []

    assert import_lines("# old list\na@example.com\nB@Example.com\n").returncode == 0
    exported = cli(own_settings, "suppression", "export", "--tenant", tenant)
    assert sorted(line.split(",")[:2] for line in exported.splitlines()[1:]) == [
        ["a@example.com", "import"],
        ["b@example.com", "import"],
    ]
    other = make_tenant()
    (tmp_path / "list.csv").write_text(exported)
    cli(own_settings, "suppression", "import", "--tenant", other, str(tmp_path / "list.csv"))
    assert len(cli(own_settings, "suppression", "export", "--tenant", other).splitlines()) == 3
