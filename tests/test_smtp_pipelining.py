"""PIPELINING (RFC 2920) against a real aiosmtpd sink: one write for the envelope and DATA when
the server offers it, one command at a time when it does not, the same outcomes either way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.smtp import message, server_of, sink_starter
from worker.errors import SmtpRejected, SmtpTemporaryFailure
from worker.job.compose import Composed
from worker.job.smtp import Delivery, SmtpPool
from worker.library_internals import unread_input
from worker.testbed.sink import Sink
from worker.testbed.sink.faults import FaultyHandler, RecipientLimit, RefuseRecipients, TemporaryFailures


class BufferAtMail(FaultyHandler):
    """Remembers what the client had already sent behind each MAIL FROM when it was read."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.behind_mail: list[bytes] = []

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.behind_mail.append(unread_input(server))
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


class RejectSender(FaultyHandler):
    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        return "550 5.7.1 Sender not allowed"


def deliver(pool: SmtpPool, sink: Sink, composed: Composed) -> Delivery:
    """Deliver and raise the failure of an attempt that reached nobody, as the worker judges it."""
    delivery = pool.deliver("acme", server_of(sink), composed)
    failure = delivery.failure()
    if failure is not None:
        raise failure
    return delivery


@pytest.fixture(params=[True, False], ids=["pipelining", "one-by-one"])
def start_sink(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    with sink_starter(tmp_path, pipelining=request.param) as start:
        yield start


@pytest.fixture
def pool() -> Iterator[SmtpPool]:
    running = SmtpPool(timeout_ms=3000)
    yield running
    running.close()


def test_the_envelope_and_data_go_in_one_write_only_to_a_server_offering_pipelining(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(BufferAtMail)
    for n in (1, 2):
        delivery = pool.deliver(
            "acme", server_of(sink), message("b@example.com", "archiv@acme.example", n=n, body=".Hallo")
        )
        assert delivery.accepted == ("b@example.com", "archiv@acme.example")
        assert str(delivery.reply) == "250 2.0.0 Ok: queued"
    pipelined = b"RCPT TO:<b@example.com>\r\nRCPT TO:<archiv@acme.example>\r\nDATA\r\n"
    offered = sink.handler.pipelining
    assert sink.handler.behind_mail == [pipelined if offered else b""] * 2
    received = sink.handler.received
    assert [r.rcpt_tos for r in received] == [["b@example.com", "archiv@acme.example"]] * 2
    assert all((sink.handler.maildir / r.file).read_bytes().endswith(b"\r\n.Hallo\r\n") for r in received)


def test_a_refused_recipient_leaves_the_others_and_the_connection_usable(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(RefuseRecipients, refuse={"weg@example.com"})
    delivery = pool.deliver(
        "acme", server_of(sink), message("eins@example.com", "weg@example.com", "drei@example.com")
    )
    assert delivery.accepted == ("eins@example.com", "drei@example.com")
    assert {a: str(r) for a, r in delivery.refused.items()} == {"weg@example.com": "550 5.1.1 No such user"}
    pool.deliver("acme", server_of(sink), message("vier@example.com", n=2))
    assert [r.rcpt_tos for r in sink.handler.received] == [
        ["eins@example.com", "drei@example.com"],
        ["vier@example.com"],
    ]


def test_452_too_many_recipients_continues_in_further_transactions_in_order(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(RecipientLimit, per_transaction=2)
    recipients = [f"empfaenger{n}@example.com" for n in range(5)]
    delivery = pool.deliver("acme", server_of(sink), message(*recipients))
    assert delivery.accepted == tuple(recipients)
    assert delivery.refused == {}
    assert [r.rcpt_tos for r in sink.handler.received] == [recipients[:2], recipients[2:4], recipients[4:]]


def test_every_recipient_refused_is_permanent_and_nothing_is_sent(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(RefuseRecipients, refuse={"weg@example.com", "auch@example.com"})
    with pytest.raises(SmtpRejected, match="every recipient refused") as refused:
        deliver(pool, sink, message("weg@example.com", "auch@example.com"))
    assert refused.value.smtp_reply == "550 5.1.1 No such user"
    pool.deliver("acme", server_of(sink), message("da@example.com", n=2))
    assert [r.rcpt_tos for r in sink.handler.received] == [["da@example.com"]]


def test_a_refused_sender_is_permanent_with_the_servers_reply(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(RejectSender)
    with pytest.raises(SmtpRejected, match="MAIL FROM: 550 5.7.1 Sender not allowed"):
        deliver(pool, sink, message("b@example.com"))
    assert sink.handler.received == []


def test_a_temporary_refusal_after_data_is_transient_and_the_next_mail_goes_through(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(TemporaryFailures, times=1)
    with pytest.raises(SmtpTemporaryFailure, match="DATA: 451"):
        deliver(pool, sink, message("b@example.com"))
    pool.deliver("acme", server_of(sink), message("b@example.com"))
    assert [r.rcpt_tos for r in sink.handler.received] == [["b@example.com"]]


def test_a_non_ascii_local_part_goes_out_with_smtputf8(
    start_sink: Callable[..., Sink], pool: SmtpPool
) -> None:
    sink = start_sink(smtp_kwargs={"enable_SMTPUTF8": True})
    data = b"From: a@acme.example\r\nTo: j\xc3\xbcrgen@example.com\r\nSubject: 1\r\n\r\nHallo\r\n"
    utf8 = Composed(data, "a@acme.example", ("jürgen@example.com",), "<1@acme.example>", smtputf8=True)
    delivery = pool.deliver("acme", server_of(sink), utf8)
    assert delivery.accepted == ("jürgen@example.com",)
    [received] = sink.handler.received
    assert received.rcpt_tos == ["jürgen@example.com"]
    pool.deliver("acme", server_of(sink), message("b@example.com", n=2))
    assert [r.rcpt_tos for r in sink.handler.received][1] == ["b@example.com"]
