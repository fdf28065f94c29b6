"""A sink that answers DATA only after a delay: a slow SMTP server that keeps a send in flight."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from worker.testbed.sink.server import RecordingHandler


class SlowHandler(RecordingHandler):
    """Records like ``RecordingHandler``, but holds every DATA reply back for ``delay_s`` seconds.

    ``data_started`` is set as soon as a message's DATA arrives, i.e. while its send is in flight.
    """

    def __init__(self, maildir: Path, delay_s: float = 2.0) -> None:
        super().__init__(maildir)
        self.delay_s = delay_s
        self.data_started = threading.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        self.data_started.set()
        await asyncio.sleep(self.delay_s)
        return await super().handle_DATA(server, session, envelope)


__all__ = ["SlowHandler"]
