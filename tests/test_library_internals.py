"""Each library internal ``worker/library_internals.py`` relies on is still there and still does
what the worker needs: an upgrade that changes one fails here, naming it and the checked range."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import platform
import smtplib
import socket
import ssl
import tomllib
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import dkim
import dramatiq
import pika
import pika.channel
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from dkim.canonicalization import CanonicalizationPolicy
from dramatiq.brokers.rabbitmq import RabbitmqBroker, _RabbitmqMessage
from dramatiq.brokers.stub import StubBroker
from packaging.requirements import Requirement
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.io_services_utils import _AsyncTransportBase

from tests.support.services import ADMIN_URL, BROKER_URL
from worker.library_internals import (
    PSYCOPG_WAIT_INTERVAL_S,
    RABBITMQ_DECLARATIONS,
    PsycopgWaitTimeout,
    RabbitmqBrokerBase,
    RabbitmqConsumerBase,
    blank_dkim_b_tag,
    delivery_tag,
    dkimpy_relaxed_headers,
    fold_dkim_header,
    hash_dkim_headers,
    pika_read_size,
    rabbitmq_message,
    set_delay_prefetch,
    set_smtp_timeout,
    smtp_socket,
    smtp_socket_closed,
    underlying_channel,
    unread_input,
    use_utf8_commands,
)
from worker.runtime import broker
from worker.testbed.sink import RecordingHandler, Sink
from worker.testbed.sink.tls import Certificates, make_certificates

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def changed(internal: str, distribution: str) -> str:
    """The failure message: which internal changed, in which installed version, and the checked range."""
    if distribution == "python":
        where = f"Python {platform.python_version()}"
        checked = f"requires-python {PYPROJECT['project']['requires-python']}"
    else:
        where = f"{distribution} {version(distribution)}"
        pins = {r.name: r.specifier for r in map(Requirement, PYPROJECT["project"]["dependencies"])}
        checked = f"checked range {pins[distribution]}"
    return (
        f"{internal} changed in {where} ({checked} in pyproject.toml): adapt worker/library_internals.py "
        "or keep the old version"
    )


def parameters(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def names_used_by(function: Callable[..., Any]) -> set[str]:
    """The attribute and global names ``function``'s own code refers to."""
    return set(function.__code__.co_names)


# pika


def test_pika_reads_as_many_bytes_per_recv_as_the_worker_sets() -> None:
    internal = "pika's _AsyncTransportBase._MAX_RECV_BYTES"
    assert "_MAX_RECV_BYTES" in names_used_by(_AsyncTransportBase._consume), changed(internal, "pika")
    overriding = [c.__name__ for c in _subclasses(_AsyncTransportBase) if "_MAX_RECV_BYTES" in vars(c)]
    assert overriding == [], changed(internal, "pika")
    assert pika_read_size() == 64 * 1024  # set when worker.runtime.broker was imported


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_a_blocking_channel_still_wraps_an_asynchronous_one() -> None:
    internal = "pika's BlockingChannel._impl"
    assert "_impl" in names_used_by(BlockingChannel.__init__), changed(internal, "pika")
    assert parameters(pika.channel.Channel.basic_ack) == ["self", "delivery_tag", "multiple"], changed(
        "pika's Channel.basic_ack", "pika"
    )
    assert parameters(pika.channel.Channel.basic_nack) == ["self", "delivery_tag", "multiple", "requeue"], (
        changed("pika's Channel.basic_nack", "pika")
    )
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        channel = underlying_channel(connection.channel())
        assert isinstance(channel, pika.channel.Channel), changed(internal, "pika")
    finally:
        connection.close()


# dramatiq


def test_dramatiqs_rabbitmq_consumer_still_has_what_the_worker_overrides_and_uses() -> None:
    internal = "dramatiq's _RabbitmqConsumer"
    expected = ["self", "broker", "queue_name", "prefetch", "timeout"]
    assert parameters(RabbitmqConsumerBase.__init__) == expected, changed(f"{internal}.__init__", "dramatiq")
    for method in ("ack", "nack"):
        assert parameters(getattr(RabbitmqConsumerBase, method)) == ["self", "message"], changed(
            f"{internal}.{method}", "dramatiq"
        )
    attributes = {"connection", "channel", "known_tags", "logger"}
    assert attributes <= names_used_by(RabbitmqConsumerBase.__init__), changed(
        f"the attributes {internal}.__init__ sets", "dramatiq"
    )
    assert "known_tags" in names_used_by(RabbitmqConsumerBase.__next__), changed(
        f"{internal}.__next__ recording delivery tags", "dramatiq"
    )
    assert isinstance(inspect.getattr_static(RabbitmqBroker, "consumer_class"), property), changed(
        "dramatiq's RabbitmqBroker.consumer_class", "dramatiq"
    )
    assert "consumer_class" in names_used_by(RabbitmqBroker.consume), changed(
        "dramatiq's RabbitmqBroker.consume building its consumer from consumer_class", "dramatiq"
    )
    assert issubclass(broker._BatchedAcks, RabbitmqConsumerBase)


def test_dramatiqs_rabbitmq_messages_still_carry_their_delivery_tag() -> None:
    internal = "dramatiq's _RabbitmqMessage._tag"
    assert "_RabbitmqMessage" in names_used_by(RabbitmqConsumerBase.__next__), changed(internal, "dramatiq")
    assert parameters(_RabbitmqMessage.__init__) == ["self", "redelivered", "tag", "message"], changed(
        "dramatiq's _RabbitmqMessage(redelivered, tag, message)", "dramatiq"
    )
    message = dramatiq.Message(queue_name="q", actor_name="a", args=(), kwargs={}, options={})
    assert delivery_tag(_RabbitmqMessage(False, 4711, message)) == 4711, changed(internal, "dramatiq")
    built = rabbitmq_message(True, 4712, message)
    assert isinstance(built, _RabbitmqMessage) and delivery_tag(built) == 4712, changed(internal, "dramatiq")
    assert built.redelivered and built.message_id == message.message_id, changed(internal, "dramatiq")


def test_dramatiqs_rabbitmq_consumer_still_reads_deliveries_as_the_worker_does() -> None:
    internal = "dramatiq's _RabbitmqConsumer.__next__"
    # What __init__ sets and __next__ reads, which broker._GuardedConsumer.__next__ reads the same way.
    assert {"broker", "queue_name", "iterator", "consume"} <= names_used_by(RabbitmqConsumerBase.__init__), (
        changed(f"{internal}: the consume iterator __init__ sets", "dramatiq")
    )
    used = names_used_by(RabbitmqConsumerBase.__next__)
    assert {"iterator", "known_tags", "queues_pending", "delivery_tag", "redelivered"} <= used, changed(
        internal, "dramatiq"
    )
    assert "inactivity_timeout" in parameters(BlockingChannel.consume), changed(
        "pika's BlockingChannel.consume", "pika"
    )
    assert RabbitmqConsumerBase.__next__ is not broker._BatchedAcks.__next__


def test_dramatiqs_worker_still_prefetches_its_delay_queues_by_delay_prefetch() -> None:
    internal = "dramatiq's Worker.delay_prefetch"
    assert "delay_prefetch" in names_used_by(dramatiq.Worker.__init__), changed(internal, "dramatiq")
    assert "delay_prefetch" in names_used_by(dramatiq.Worker._add_consumer), changed(internal, "dramatiq")
    stub = StubBroker()
    worker = dramatiq.Worker(stub, worker_threads=2)
    assert worker.delay_prefetch == 2000, changed(f"{internal} (1000 per thread by default)", "dramatiq")
    set_delay_prefetch(worker, 7)
    try:
        worker.start()
        stub.declare_queue("lane")
        assert worker.consumers["lane.DQ"].prefetch == 7, changed(internal, "dramatiq")
        assert worker.consumers["lane"].prefetch == 4, changed("dramatiq's Worker.queue_prefetch", "dramatiq")
    finally:
        worker.stop()


# dkimpy


def test_dkimpys_header_parser_and_relaxed_canonicalization_still_work_as_the_signer_expects() -> None:
    internal = "dkimpy's rfc822_parse and canonicalization.CanonicalizationPolicy"
    assert parameters(dkim.rfc822_parse) == ["message"], changed(internal, "dkimpy")
    assert parameters(CanonicalizationPolicy.from_c_value) == ["c"], changed(internal, "dkimpy")
    head = b"Subject:  Hi\r\n  there \r\nFrom: a@b\r\n\r\n"
    assert dkimpy_relaxed_headers(head) == [(b"subject", b"Hi there\r\n"), (b"from", b"a@b\r\n")], changed(
        internal, "dkimpy"
    )
    with pytest.raises(dkim.MessageFormatError):
        dkimpy_relaxed_headers(b"no header line\r\n\r\n")


def test_dkimpys_header_hashing_still_hashes_selected_headers_then_the_blank_signature() -> None:
    internal = "dkimpy's hash_headers"
    expected_parameters = ["hasher", "canonicalize_headers", "headers", "include_headers", "sigheader", "sig"]
    assert parameters(dkim.hash_headers) == expected_parameters, changed(internal, "dkimpy")
    hasher = hashlib.sha256()
    canonical = [(b"from", b"a@b\r\n"), (b"subject", b"Hi\r\n")]
    hash_dkim_headers(hasher, canonical, (b"subject", b"from"), (b"DKIM-Signature", b" v=1;  b=abc"))
    hashed = b"subject:Hi\r\nfrom:a@b\r\ndkim-signature:v=1; b="
    assert hasher.digest() == hashlib.sha256(hashed).digest(), changed(internal, "dkimpy")


def test_dkimpys_b_tag_pattern_still_blanks_the_signature_data() -> None:
    internal = "dkimpy's RE_BTAG"
    assert dkim.RE_BTAG.groups == 1, changed(internal, "dkimpy")
    blanked = blank_dkim_b_tag(b"v=1; bh=abc=; b=0000\r\n 0000")
    assert blanked == b"v=1; bh=abc=; b=", changed(internal, "dkimpy")


def test_dkimpys_folding_still_breaks_at_72_columns_with_the_name_counted() -> None:
    internal = "dkimpy's fold"
    assert parameters(dkim.fold) == ["header", "namelen", "linesep"], changed(internal, "dkimpy")
    value = b"x" * 30 + b" " + b"y" * 50
    assert fold_dkim_header(value, 14) == b"x" * 30 + b"\r\n " + b"y" * 50, changed(internal, "dkimpy")


# smtplib


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def starttls_sink(tmp_path: Path, certificates: Certificates) -> Iterator[Sink]:
    sink = Sink(tmp_path / "maildir", tls_context=certificates.server_context())
    yield sink
    sink.stop()


def test_smtplib_encodes_commands_with_its_command_encoding() -> None:
    internal = "smtplib's SMTP.command_encoding"
    ours, theirs = socket.socketpair()
    client = smtplib.SMTP()
    client.sock = ours
    try:
        use_utf8_commands(client)
        command = "MAIL FROM:<jörg@acme.example> SMTPUTF8\r\n"
        client.send(command)
        assert theirs.recv(100) == command.encode("utf-8"), changed(internal, "python")
        theirs.sendall(b"250 2.0.0 Ok\r\n")
        assert client.rset() == (250, b"2.0.0 Ok")
        with pytest.raises(UnicodeEncodeError):  # rset() went back to ASCII, as the pool expects
            client.send("RCPT TO:<jörg@acme.example>\r\n")
    finally:
        client.close()
        theirs.close()


def test_smtplib_keeps_its_socket_in_sock_until_closed(
    certificates: Certificates, starttls_sink: Sink
) -> None:
    internal = "smtplib's SMTP.sock"
    client = smtplib.SMTP(starttls_sink.host, starttls_sink.port, timeout=5)
    try:
        plain = smtp_socket(client)
        assert type(plain) is socket.socket, changed(internal, "python")
        client.starttls(context=ssl.create_default_context(cafile=certificates.ca_file))
        encrypted = smtp_socket(client)
        assert isinstance(encrypted, ssl.SSLSocket), changed(f"{internal} after STARTTLS", "python")
        assert encrypted.version() is not None
        assert not smtp_socket_closed(client)
        client.quit()
        assert smtp_socket_closed(client), changed(f"{internal} after close", "python")
    finally:
        client.close()


def test_smtplib_connects_with_its_timeout_attribute(starttls_sink: Sink) -> None:
    internal = "smtplib's SMTP.timeout"
    assert "timeout" in names_used_by(smtplib.SMTP.connect), changed(internal, "python")
    client = smtplib.SMTP(timeout=30)
    set_smtp_timeout(client, 2.5)
    client.connect(starttls_sink.host, starttls_sink.port)
    try:
        sock = smtp_socket(client)
        assert sock is not None and sock.gettimeout() == 2.5, changed(internal, "python")
        set_smtp_timeout(client, 4.0)
        assert sock.gettimeout() == 4.0, changed(internal, "python")
    finally:
        client.quit()


def test_smtplibs_low_level_methods_keep_their_signatures() -> None:
    for method, expected in [
        (smtplib.SMTP.send, ["self", "s"]),
        (smtplib.SMTP.getreply, ["self"]),
        (smtplib.SMTP.close, ["self"]),
    ]:
        assert parameters(method) == expected, changed(f"smtplib's SMTP.{method.__name__}", "python")


# aiosmtpd


class _UnreadAtMail(RecordingHandler):
    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.unread: list[bytes] = []

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.unread.append(unread_input(server))
        envelope.mail_from = address
        return "250 OK"


def test_a_sink_handler_sees_what_a_pipelining_client_sent_behind_the_command(tmp_path: Path) -> None:
    handler = _UnreadAtMail(tmp_path)
    sink = Sink(tmp_path, handler=handler)
    try:
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
            client.ehlo()
            client.send("MAIL FROM:<a@acme.example>\r\nRCPT TO:<b@example.com>\r\n")
            assert [client.getreply()[0] for _ in range(2)] == [250, 250]
    finally:
        sink.stop()
    assert handler.unread == [b"RCPT TO:<b@example.com>\r\n"], changed(
        "aiosmtpd's SMTP._reader (an asyncio.StreamReader) and its _buffer", "aiosmtpd"
    )


def test_aiosmtpd_calls_connection_made_again_after_starttls(
    tmp_path: Path, certificates: Certificates
) -> None:
    transport_already_set: dict[int, list[bool]] = {}  # per connection (the sink's start probes one too)

    class Watching(SMTP):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport_already_set.setdefault(id(self), []).append(self.transport is not None)
            super().connection_made(transport)

    class Handler(RecordingHandler):
        server_class = Watching

    sink = Sink(tmp_path, handler=Handler(tmp_path), tls_context=certificates.server_context())
    try:
        with smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
            client.starttls(context=ssl.create_default_context(cafile=certificates.ca_file))
            client.ehlo()
    finally:
        sink.stop()
    internal = "aiosmtpd's SMTP.connection_made on STARTTLS (faults._ConnectionCountingSMTP counts on it)"
    assert [False, True] in transport_already_set.values(), changed(internal, "aiosmtpd")


def test_dramatiqs_rabbitmq_broker_still_declares_a_lane_through_the_three_methods_the_worker_overrides() -> (
    None
):
    internal = "dramatiq's RabbitmqBroker._declare_queue/_declare_dq_queue/_declare_xq_queue"
    for name in RABBITMQ_DECLARATIONS:
        assert parameters(getattr(RabbitmqBrokerBase, name)) == ["self", "queue_name"], changed(
            internal, "dramatiq"
        )
        assert getattr(broker._Broker, name) is not getattr(RabbitmqBrokerBase, name)
    declared: list[tuple[str, str]] = []

    class Recording(RabbitmqBrokerBase):  # type: ignore[misc]
        def _declare_queue(self, queue_name: str) -> None:
            declared.append(("queue", queue_name))

        def _declare_dq_queue(self, queue_name: str) -> None:
            declared.append(("delay", queue_name))

        def _declare_xq_queue(self, queue_name: str) -> None:
            declared.append(("dead", queue_name))

    recording = Recording(url=BROKER_URL)
    recording.declare_queue("lane", ensure=True)  # the overrides touch no channel: nothing is declared
    assert declared == [("queue", "lane"), ("delay", "lane"), ("dead", "lane")], changed(internal, "dramatiq")
    assert "lane" not in recording.queues_pending, changed(internal, "dramatiq")


def test_psycopg_still_waits_for_every_statement_through_connection_wait() -> None:
    import psycopg

    from worker.db import AnswerLimited

    internal = "psycopg's Connection.wait(gen, interval, timeout) and errors._WaitTimeout"
    assert parameters(psycopg.Connection.wait) == ["self", "gen", "interval", "timeout"], changed(
        internal, "psycopg"
    )
    assert issubclass(PsycopgWaitTimeout, psycopg.OperationalError), changed(internal, "psycopg")
    assert psycopg.Connection.wait.__defaults__ == (PSYCOPG_WAIT_INTERVAL_S, None), changed(
        internal, "psycopg"
    )
    with AnswerLimited.connect(ADMIN_URL, autocommit=True) as conn:
        conn.answer_limit_s = 0.3
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError, match="did not answer within 0.3 s"):
            conn.execute("SELECT pg_sleep(5)")
        assert conn.closed, changed(internal, "psycopg")
