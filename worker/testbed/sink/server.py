"""The embedded SMTP sink (aiosmtpd) for the demo and the tests: stores every message it accepts.

Each message goes to ``MAILDIR/<arrival ns>-<n>.eml``; ``MAILDIR/index.jsonl``
gets one line per message with envelope, arrival time and file name.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    arrived_at: float
    size: int
    file: str
    peer: str


class RecordingHandler:
    """Accepts every message, writes it to the maildir and remembers its envelope.

    Offers PIPELINING (RFC 2920) unless ``pipelining`` is false: aiosmtpd reads
    commands one line at a time, so pipelined commands are answered in order.
    """

    pipelining = True
    server_class: type[SMTP] = SMTP
    """The aiosmtpd ``SMTP`` (sub)class the ``Sink`` serves this handler with."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        maildir.mkdir(parents=True, exist_ok=True)
        self._index = (maildir / "index.jsonl").open("a", encoding="utf-8")
        self._lock = threading.Lock()
        self._count = 0
        self.received: list[Received] = []

    async def handle_EHLO(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        arrived = time.time()
        data = envelope.original_content or b""
        with self._lock:
            self._count += 1
            name = f"{time.time_ns()}-{self._count}.eml"
            (self.maildir / name).write_bytes(data)
            record = Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=[str(r) for r in envelope.rcpt_tos],
                arrived_at=arrived,
                size=len(data),
                file=name,
                peer=str(session.peer[0]) if session.peer else "",
            )
            self.received.append(record)
            self._index.write(json.dumps(asdict(record)) + "\n")
            self._index.flush()
        logger.info("received %s → %s (%d bytes)", record.mail_from, ",".join(record.rcpt_tos), record.size)
        return "250 2.0.0 Ok: queued"

    def close(self) -> None:
        self._index.close()


def read_index(maildir: Path) -> list[dict[str, Any]]:
    """The sink's records of what it received, oldest first."""
    index = maildir / "index.jsonl"
    if not index.exists():
        return []
    return [json.loads(line) for line in index.read_text().splitlines() if line.strip()]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class _Controller(Controller):
    def factory(self) -> SMTP:
        server_class: type[SMTP] = self.handler.server_class
        return server_class(self.handler, **self.SMTP_kwargs)


class Sink:
    """A running sink; ``stop()`` shuts it down."""

    def __init__(
        self,
        maildir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handler: RecordingHandler | None = None,
        **smtp_kwargs: Any,
    ) -> None:
        """``handler`` may be a ``RecordingHandler`` subclass that answers differently (faults);
        ``smtp_kwargs`` go to aiosmtpd's ``SMTP`` (``tls_context``, ``authenticator``, …)."""
        self.handler = handler or RecordingHandler(maildir)
        self.host = host
        self.port = port or free_port(host)
        self.controller = _Controller(
            self.handler, hostname=host, port=self.port, ready_timeout=10, **smtp_kwargs
        )
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()
        self.handler.close()


__all__ = ["Received", "RecordingHandler", "Sink", "free_port", "read_index"]
