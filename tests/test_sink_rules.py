"""The sink's ``RecipientRules`` handler answers RCPT TO per address, as a test scripts it."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker.testbed.sink import Sink
from worker.testbed.sink.faults import RecipientRules

MESSAGE = b"Subject: hello\r\nMessage-ID: <rules@test.postbote>\r\n\r\nhi\r\n"

StartSink = Callable[..., tuple[Sink, RecipientRules]]


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator[StartSink]:
    """Start a sink with a ``RecipientRules`` handler built from the given options; stopped after the test."""
    started: list[Sink] = []

    def start(**options: Any) -> tuple[Sink, RecipientRules]:
        maildir = tmp_path / f"maildir-{len(started)}"
        handler = RecipientRules(maildir, **options)
        started.append(Sink(maildir, handler=handler))
        return started[-1], handler

    yield start
    for sink in started:
        sink.stop()


def connect(sink: Sink) -> smtplib.SMTP:
    client = smtplib.SMTP(sink.host, sink.port, timeout=5)
    client.ehlo("test.postbote")
    return client


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_greylisted_address_is_refused_until_its_script_accepts_it(start_sink: StartSink) -> None:
    sink, handler = start_sink(rules={"grey@example.org": ["451 4.7.1 greylisted", None]})
    with connect(sink) as client:
        client.mail("sender@test.postbote")
        assert client.rcpt("grey@example.org") == (451, b"4.7.1 greylisted")
        assert client.rcpt("other@example.org")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    with connect(sink) as client:
        client.mail("sender@test.postbote")
        assert client.rcpt("Grey@Example.org")[0] == 250
        assert client.data(MESSAGE)[0] == 250
    assert handler.rcpt_seen["grey@example.org"] == 2
    assert handler.delivered_to("grey@example.org") == 1


def test_an_unknown_user_is_refused_every_time(start_sink: StartSink) -> None:
    sink, handler = start_sink(rules={"nobody@example.org": ["550 5.1.1 user unknown"]})
    for _ in range(2):
        with connect(sink) as client:
            client.mail("sender@test.postbote")
            for _ in range(3):
                assert client.rcpt("nobody@example.org") == (550, b"5.1.1 user unknown")
    assert handler.rcpt_seen["nobody@example.org"] == 6


def test_a_refused_address_is_accepted_once_the_test_changes_its_rules(start_sink: StartSink) -> None:
    sink, handler = start_sink(rules={"later@example.org": ["451 4.7.1 greylisted"]})
    with connect(sink) as client:
        client.mail("sender@test.postbote")
        assert client.rcpt("later@example.org")[0] == 451
        handler.rules["later@example.org"] = [None]
        assert client.rcpt("later@example.org")[0] == 250


def test_a_recipient_beyond_the_transaction_limit_gets_452_without_using_its_script(
    start_sink: StartSink,
) -> None:
    sink, _ = start_sink(rules={"c@example.org": ["451 4.7.1 greylisted", None]}, per_transaction=2)
    with connect(sink) as client:
        client.mail("sender@test.postbote")
        assert client.rcpt("a@example.org")[0] == 250
        assert client.rcpt("b@example.org")[0] == 250
        assert client.rcpt("c@example.org") == (452, b"4.5.3 Too many recipients")
        client.rset()
        client.mail("sender@test.postbote")
        assert client.rcpt("c@example.org")[0] == 451
        assert client.rcpt("c@example.org")[0] == 250


def test_a_421_reply_hangs_up_the_connection(start_sink: StartSink) -> None:
    sink, _ = start_sink(rules={"busy@example.org": ["421 4.7.0 too busy, closing"]})
    with connect(sink) as client:
        client.mail("sender@test.postbote")
        assert client.rcpt("busy@example.org")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_the_connection_counters_see_simultaneous_connections_and_their_end(start_sink: StartSink) -> None:
    sink, handler = start_sink()
    with connect(sink), connect(sink):
        assert (handler.open_connections, handler.max_open_connections) == (2, 2)
    assert wait_until(lambda: handler.open_connections == 0)
    assert handler.max_open_connections == 2
    handler.reset_connection_peak()
    assert handler.max_open_connections == 0
    with connect(sink):
        assert (handler.open_connections, handler.max_open_connections) == (1, 1)


def test_delivered_to_counts_the_stored_messages_naming_an_address(start_sink: StartSink) -> None:
    sink, handler = start_sink(rules={"gone@example.org": ["550 5.1.1 user unknown"]})
    with connect(sink) as client:
        client.sendmail("sender@test.postbote", ["A@Example.org", "b@example.org"], MESSAGE)
        refused = client.sendmail("sender@test.postbote", ["a@example.org", "gone@example.org"], MESSAGE)
    assert refused == {"gone@example.org": (550, b"5.1.1 user unknown")}
    assert handler.delivered_to("a@example.org") == 2
    assert handler.delivered_to("B@EXAMPLE.ORG") == 1
    assert handler.delivered_to("gone@example.org") == 0
