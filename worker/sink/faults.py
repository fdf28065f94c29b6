"""Sink handlers that misbehave on demand, for the fault tests and for trying a client by hand.

Each is a ``RecordingHandler``: whatever it finally accepts is stored and
recorded like any other message, so a test can count what really arrived.
Counters that decide when to misbehave are kept per Message-ID, which is
stable across retries of the same job.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from worker.sink.server import RecordingHandler

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.IGNORECASE | re.MULTILINE)


def message_id_of(data: bytes) -> str:
    """The Message-ID header of raw message bytes ('' when there is none)."""
    match = _MESSAGE_ID.search(data)
    return match.group(1).decode("ascii", "replace") if match else ""


def _hang_up(server: SMTP) -> None:
    if server.transport is not None:
        server.transport.close()


class FaultyHandler(RecordingHandler):
    """Base of the fault variants: records every MAIL and AUTH attempt it sees."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.mail_commands: list[str] = []
        self.data_seen: Counter[str] = Counter()
        """DATA transactions per Message-ID, answered or not."""

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self.mail_commands.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    def count_data(self, envelope: Envelope) -> int:
        """Counts this DATA for its Message-ID; returns how many there were, this one included."""
        key = message_id_of(envelope.original_content or b"")
        self.data_seen[key] += 1
        return self.data_seen[key]


class DisconnectMidSession(FaultyHandler):
    """After ``after`` messages on one connection, answers the next MAIL with 421 and hangs up."""

    def __init__(self, maildir: Path, *, after: int = 2) -> None:
        super().__init__(maildir)
        self.after = after
        self._per_session: Counter[int] = Counter()
        self.disconnects = 0

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        await super().handle_MAIL(server, session, envelope, address, mail_options)
        if self._per_session[id(session)] >= self.after:
            self.disconnects += 1
            asyncio.get_running_loop().call_soon(_hang_up, server)
            return "421 4.3.2 Service shutting down, closing transmission channel"
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        self._per_session[id(session)] += 1
        return await super().handle_DATA(server, session, envelope)


class TemporaryFailures(FaultyHandler):
    """Answers DATA with 451 the first ``times`` times for each message, then accepts it."""

    def __init__(self, maildir: Path, *, times: int = 2) -> None:
        super().__init__(maildir)
        self.times = times

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        if self.count_data(envelope) <= self.times:
            return "451 4.3.0 Temporary local problem, try again later"
        return await super().handle_DATA(server, session, envelope)


class RefuseRecipients(FaultyHandler):
    """Refuses the given recipients at RCPT with ``reply``; takes the others."""

    def __init__(self, maildir: Path, *, refuse: set[str], reply: str = "550 5.1.1 No such user") -> None:
        super().__init__(maildir)
        self.refuse = refuse
        self.reply = reply

    async def handle_RCPT(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"


class RecipientLimit(FaultyHandler):
    """Answers 452 "too many recipients" after ``per_transaction`` recipients in one transaction."""

    def __init__(self, maildir: Path, *, per_transaction: int = 2) -> None:
        super().__init__(maildir)
        self.per_transaction = per_transaction

    async def handle_RCPT(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.per_transaction:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"


class RejectAfterData(FaultyHandler):
    """Takes the whole message, then rejects it with a 5xx (content filter)."""

    def __init__(self, maildir: Path, *, reply: str = "554 5.7.1 Message rejected: content policy") -> None:
        super().__init__(maildir)
        self.reply = reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        self.count_data(envelope)
        return self.reply


class SilentAfterData(FaultyHandler):
    """Never answers the final dot of the first ``times`` transactions of each message (the
    connection is dropped after ``silence_s``, nothing is stored); then accepts it."""

    def __init__(self, maildir: Path, *, times: int = 1, silence_s: float = 5.0) -> None:
        super().__init__(maildir)
        self.times = times
        self.silence_s = silence_s
        self.silences = 0
        """Silences over (connection dropped); stop the sink only when all are, or it leaks them."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        if self.count_data(envelope) <= self.times:
            try:
                await asyncio.sleep(self.silence_s)
                _hang_up(server)
            finally:  # also when aiosmtpd cancels us because the client hung up first
                self.silences += 1
            return "451 4.4.2 too late, the client is gone"
        return await super().handle_DATA(server, session, envelope)


__all__ = [
    "DisconnectMidSession",
    "FaultyHandler",
    "RecipientLimit",
    "RefuseRecipients",
    "RejectAfterData",
    "SilentAfterData",
    "TemporaryFailures",
    "message_id_of",
]
