"""The SMTP side of the tests: sinks started per test, what a sink received, a server entry for
one, a tiny message."""

from __future__ import annotations

import email
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email import policy
from pathlib import Path
from typing import Any

from schemas.tenant import Smtp
from worker.job.compose import Composed
from worker.testbed.sink import RecordingHandler, Sink


@contextmanager
def sink_starter(tmp_path: Path, *, pipelining: bool = True) -> Iterator[Callable[..., Sink]]:
    """``start(handler_class, smtp_kwargs, **options)`` runs a sink with that handler (and those
    arguments for aiosmtpd's ``SMTP``); all stop at the end."""
    started: list[Sink] = []

    def start(
        handler: type[RecordingHandler] = RecordingHandler,
        smtp_kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Sink:
        maildir = tmp_path / f"maildir-{len(started)}"
        recording = handler(maildir, **options)
        recording.pipelining = pipelining
        sink = Sink(maildir, handler=recording, **(smtp_kwargs or {}))
        started.append(sink)
        return sink

    try:
        yield start
    finally:
        for sink in started:
            sink.stop()


def server_of(sink: Sink, **fields: Any) -> Smtp:
    return Smtp(host=sink.host, port=sink.port, security="none", helo="test.postbote", **fields)


def message(*recipients: str, n: int = 1, body: str = "Hallo") -> Composed:
    data = f"From: a@acme.example\r\nTo: {', '.join(recipients)}\r\nSubject: {n}\r\n\r\n{body}\r\n".encode()
    return Composed(data, "a@acme.example", recipients, f"<{n}@acme.example>", smtputf8=False)


def received_messages(sink: Sink, timeout: float = 10, count: int = 1) -> list[tuple[Any, Any]]:
    """(envelope record, parsed message) for what the sink received, waiting for ``count`` of them."""
    deadline = time.monotonic() + timeout
    while len(sink.handler.received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    out = []
    for record in list(sink.handler.received):
        data = (sink.handler.maildir / record.file).read_bytes()
        out.append((record, email.message_from_bytes(data, policy=policy.default)))
    return out


__all__ = ["message", "received_messages", "server_of", "sink_starter"]
