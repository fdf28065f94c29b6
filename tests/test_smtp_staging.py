"""MAIL FROM and RCPT TO ahead of the series slot, DATA inside it, against a real aiosmtpd sink."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.smtp import message, server_of, sink_starter
from worker.errors import SmtpRejected
from worker.job.smtp import SmtpPool
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import FaultyHandler, RecipientLimit, RefuseRecipients


class SlowEnvelope(FaultyHandler):
    """Answers MAIL FROM only after ``delay_s``."""

    def __init__(self, maildir: Path, *, delay_s: float) -> None:
        super().__init__(maildir)
        self.delay_s = delay_s

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        await asyncio.sleep(self.delay_s)
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


class Opened:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, tenant_id: str) -> None:
        self.count += 1


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    with sink_starter(tmp_path) as start:
        yield start


@pytest.fixture
def opened() -> Opened:
    return Opened()


@pytest.fixture
def pool(opened: Opened) -> Iterator[SmtpPool]:
    running = SmtpPool(timeout_ms=3000, on_connect=opened)
    yield running
    running.close()


def test_a_staged_send_reaches_the_server_only_when_delivered(
    start_sink: Callable[..., Sink], pool: SmtpPool, opened: Opened
) -> None:
    sink = start_sink()
    with pool.staged("acme", server_of(sink), message("b@example.com")) as staged:
        assert staged is not None
        assert sink.handler.received == []
        delivery = staged.deliver()
    assert delivery.accepted == ("b@example.com",)
    assert [r.rcpt_tos for r in sink.handler.received] == [["b@example.com"]]
    pool.deliver("acme", server_of(sink), message("c@example.com", n=2))
    assert opened.count == 1


def test_a_staged_send_left_undelivered_is_reset_and_its_connection_reused(
    start_sink: Callable[..., Sink], pool: SmtpPool, opened: Opened
) -> None:
    sink = start_sink()
    with (
        pytest.raises(TimeoutError),
        pool.staged("acme", server_of(sink), message("b@example.com")) as staged,
    ):
        assert staged is not None
        raise TimeoutError("no series slot in time")
    pool.deliver("acme", server_of(sink), message("c@example.com", n=2))
    assert [r.rcpt_tos for r in sink.handler.received] == [["c@example.com"]]
    assert opened.count == 1


def test_bulk_sends_waiting_with_staged_envelopes_leave_a_connection_for_receipts(
    start_sink: Callable[..., Sink], opened: Opened
) -> None:
    sink = start_sink()
    server = server_of(sink, max_connections=3)
    pool = SmtpPool(timeout_ms=200, on_connect=opened)  # waits up to 0.4 s for a connection
    try:
        with (
            pool.staged("acme", server, message("b1@example.com", n=1)) as first,
            pool.staged("acme", server, message("b2@example.com", n=2)) as second,
            pool.staged("acme", server, message("b3@example.com", n=3)) as third,
        ):
            assert first is not None and second is not None
            assert third is None
            pool.deliver("acme", server, message("receipt@example.com", n=4))
    finally:
        pool.close()
    assert [r.rcpt_tos for r in sink.handler.received] == [["receipt@example.com"]]


def test_a_bulk_send_waits_for_a_connection_to_stage_on_rather_than_sending_unstaged(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink()
    server = server_of(sink, max_connections=2)
    staged_later: list[bool] = []

    def second_send() -> None:
        with pool.staged("acme", server, message("b2@example.com", n=2)) as staged:
            staged_later.append(staged is not None)
            if staged is not None:
                staged.deliver()

    with pool.staged("acme", server, message("b1@example.com", n=1)) as first:
        assert first is not None
        waiting = threading.Thread(target=second_send)
        waiting.start()
        first.deliver()
    waiting.join()
    assert staged_later == [True]
    assert len(sink.handler.received) == 2


def test_a_receipt_stages_on_the_last_free_connection_but_waits_for_none(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink()
    server = server_of(sink, max_connections=2)
    with (
        pool.staged("acme", server, message("bulk@example.com", n=1)) as bulk,
        pool.staged("acme", server, message("r1@example.com", n=2), priority=True) as receipt,
        pool.staged("acme", server, message("r2@example.com", n=3), priority=True) as later_receipt,
    ):
        assert bulk is not None and receipt is not None
        assert later_receipt is None
        receipt.deliver()
    assert [r.rcpt_tos for r in sink.handler.received] == [["r1@example.com"]]


def test_a_tenant_with_one_connection_sends_unstaged(start_sink: Callable[..., Sink], pool: SmtpPool) -> None:
    sink = start_sink()
    with pool.staged("acme", server_of(sink, max_connections=1), message("b@example.com")) as staged:
        assert staged is None


def test_partial_refusal_and_a_452_continue_as_in_an_unstaged_send(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    refusing = start_sink(RefuseRecipients, refuse={"nobody@example.com"})
    with pool.staged("acme", server_of(refusing), message("a@example.com", "nobody@example.com")) as staged:
        assert staged is not None
        delivery = staged.deliver()
    assert delivery.accepted == ("a@example.com",)
    assert str(delivery.refused["nobody@example.com"]) == "550 5.1.1 No such user"

    limited = start_sink(RecipientLimit, per_transaction=2)
    three = message("x@example.com", "y@example.com", "z@example.com", n=2)
    with pool.staged("other", server_of(limited), three) as staged:
        assert staged is not None
        delivery = staged.deliver()
    assert delivery.accepted == ("x@example.com", "y@example.com", "z@example.com")
    assert [r.rcpt_tos for r in limited.handler.received] == [
        ["x@example.com", "y@example.com"],
        ["z@example.com"],
    ]


def test_an_envelope_refused_entirely_is_reported_without_asking_the_server_again(
    start_sink: Callable[..., Sink], opened: Opened
) -> None:
    sink = start_sink(RefuseRecipients, refuse={"nobody@example.com"})
    server = server_of(sink, max_connections=2)
    pool = SmtpPool(timeout_ms=200, on_connect=opened)
    try:
        with pool.staged("acme", server, message("nobody@example.com")) as staged:
            assert staged is not None
            failure = staged.deliver().failure()
        assert isinstance(failure, SmtpRejected)
        assert failure.reason == "recipients_refused"
        assert sink.handler.mail_commands == ["a@acme.example"]
        # The connection went back exactly once: one bulk send can stage, a second cannot.
        with (
            pool.staged("acme", server, message("a@example.com", n=2)) as first,
            pool.staged("acme", server, message("b@example.com", n=3)) as second,
        ):
            assert first is not None
            assert second is None
    finally:
        pool.close()


def test_a_server_slow_to_accept_the_envelope_is_not_waited_for(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(SlowEnvelope, delay_s=2.0)
    with pool.staged("acme", server_of(sink), message("b@example.com")) as staged:
        assert staged is None
