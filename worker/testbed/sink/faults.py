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

from worker.testbed.sink.server import RecordingHandler

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


class _ConnectionCountingSMTP(SMTP):
    """Tells its ``RecipientRules`` handler when the client's connection opens and closes."""

    _counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # STARTTLS calls this again for the same connection
        super().connection_made(transport)
        if first and isinstance(self.event_handler, RecipientRules):
            self._counted = True
            self.event_handler.connection_opened()

    def connection_lost(self, error: Exception | None) -> None:
        try:
            super().connection_lost(error)
        finally:
            if self._counted and isinstance(self.event_handler, RecipientRules):
                self._counted = False
                self.event_handler.connection_closed()


class RecipientRules(FaultyHandler):
    """Answers RCPT TO per address from a script of replies, like a greylisting or corporate gateway.

    ``rules[address]`` lists the replies to successive RCPTs naming that address, counted across
    all connections; ``None`` accepts, the last entry repeats, unlisted addresses are accepted,
    and a "421" reply also hangs up. Assigning a new list restarts that address's script.
    With ``per_transaction``, a RCPT beyond that many accepted recipients in one transaction gets
    452 without using up a script entry.
    """

    server_class = _ConnectionCountingSMTP

    def __init__(
        self,
        maildir: Path,
        *,
        rules: dict[str, list[str | None]] | None = None,
        per_transaction: int | None = None,
    ) -> None:
        super().__init__(maildir)
        self.rules: dict[str, list[str | None]] = rules if rules is not None else {}
        self.per_transaction = per_transaction
        self.rcpt_seen: Counter[str] = Counter()
        """RCPT commands per lowercased address, whatever the answer."""
        self.open_connections = 0
        self.max_open_connections = 0
        """The most connections open at once since ``reset_connection_peak()``."""
        self._positions: dict[str, tuple[list[str | None], int]] = {}

    def _script_for(self, key: str) -> list[str | None] | None:
        rules = list(self.rules.items())  # a test may add rules from its own thread meanwhile
        return next((script for address, script in rules if address.lower() == key), None)

    def _next_reply(self, key: str) -> str | None:
        script = self._script_for(key)
        if not script:
            return None
        played, used = self._positions.get(key, (script, 0))
        if played is not script:
            used = 0
        self._positions[key] = (script, used + 1)
        return script[min(used, len(script) - 1)]

    async def handle_RCPT(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        key = address.lower()
        with self._lock:
            self.rcpt_seen[key] += 1
            if self.per_transaction is not None and len(envelope.rcpt_tos) >= self.per_transaction:
                return "452 4.5.3 Too many recipients"
            reply = self._next_reply(key)
        if reply is None:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return "250 OK"
        if reply.startswith("421"):
            asyncio.get_running_loop().call_soon(_hang_up, server)
        return reply

    def delivered_to(self, address: str) -> int:
        """How many stored messages name ``address`` (any case) in their envelope."""
        key = address.lower()
        with self._lock:
            return sum(1 for record in self.received if any(r.lower() == key for r in record.rcpt_tos))

    def connection_opened(self) -> None:
        """Called by the server when a client connects."""
        with self._lock:
            self.open_connections += 1
            self.max_open_connections = max(self.max_open_connections, self.open_connections)

    def connection_closed(self) -> None:
        """Called by the server when a client's connection is gone."""
        with self._lock:
            self.open_connections -= 1

    def reset_connection_peak(self) -> None:
        """Starts ``max_open_connections`` afresh from the connections open now."""
        with self._lock:
            self.max_open_connections = self.open_connections


__all__ = [
    "DisconnectMidSession",
    "FaultyHandler",
    "RecipientLimit",
    "RecipientRules",
    "RefuseRecipients",
    "RejectAfterData",
    "SilentAfterData",
    "TemporaryFailures",
    "message_id_of",
]
