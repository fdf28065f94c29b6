"""What the SMTP server said, and the one place its answers become postbote errors.

2xx is success; 4xx, 421, timeouts and lost connections are transient; 5xx is
permanent. The code, the enhanced status code (RFC 3463) and the text are kept.
"""

from __future__ import annotations

import re
import smtplib
from dataclasses import dataclass

from worker.errors import (
    RecipientsRefused,
    SmtpConnectionError,
    SmtpRejected,
    SmtpTemporaryFailure,
    SmtpTimeout,
)

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*")


@dataclass(frozen=True)
class SmtpReply:
    code: int
    enhanced: str | None
    text: str

    @classmethod
    def parse(cls, code: int, message: bytes | str) -> SmtpReply:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        text = " ".join(text.split())
        match = _ENHANCED.match(text)
        return cls(code, match.group(1) if match else None, text[match.end() :] if match else text)

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code) if self.code else None, self.enhanced, self.text) if p)


@dataclass(frozen=True)
class Delivery:
    """What the server said to one attempt, recipient by recipient.

    ``accepted`` took the message (their transaction's DATA was answered 2xx, ``reply``).
    ``refused`` were answered with a refusal, temporary (4xx) or permanent (5xx): at
    RCPT TO, or by their transaction's DATA reply. Recipients in neither were not
    answered: the attempt ended first (``error``: a lost connection, a timeout, a
    refused MAIL FROM), or they are internal copies held back because no
    customer-facing recipient was accepted.
    """

    accepted: tuple[str, ...]
    refused: dict[str, SmtpReply]
    reply: SmtpReply | None
    error: SmtpTemporaryFailure | SmtpRejected | SmtpConnectionError | None = None
    tls_version: str | None = None
    auth_method: str | None = None
    dsn: bool | None = None
    """Whether the server offered the DSN extension (RFC 3461); ``None`` when not asked."""

    def failure(self) -> SmtpTemporaryFailure | SmtpRejected | SmtpConnectionError | None:
        """The error of an attempt that reached nobody (``None`` when someone took the message)."""
        if self.accepted:
            return None
        if self.error is not None:
            return self.error
        if not self.refused:
            return SmtpConnectionError("no recipient was tried")
        transient = [r for r in self.refused.values() if r.code < 500]
        worst = transient[0] if transient else next(iter(self.refused.values()))
        summary = "; ".join(f"{a}: {r}" for a, r in self.refused.items())
        if transient:
            return SmtpTemporaryFailure(f"no recipient accepted: {summary}", smtp_reply=str(worst))
        return RecipientsRefused(f"every recipient refused: {summary}", smtp_reply=str(worst))


def _translate(error: BaseException, stage: str) -> SmtpTemporaryFailure | SmtpRejected | SmtpConnectionError:
    if isinstance(error, SmtpTemporaryFailure | SmtpRejected):
        return error
    if isinstance(error, smtplib.SMTPResponseException):
        return _classify(SmtpReply.parse(error.smtp_code, error.smtp_error), stage)
    if isinstance(error, TimeoutError) or isinstance(error.__context__, TimeoutError):
        after = " after the final dot; the server may have taken the mail" if stage == "DATA" else ""
        return SmtpTimeout(f"{stage}: no answer in time{after}")
    return SmtpConnectionError(f"{stage}: connection lost: {error or type(error).__name__}")


def _expect(answer: tuple[int, bytes], stage: str, client: smtplib.SMTP) -> SmtpReply:
    reply = SmtpReply.parse(*answer)
    if 200 <= reply.code < 300:
        return reply
    raise _classify(reply, stage)


def _classify(reply: SmtpReply, stage: str) -> SmtpTemporaryFailure | SmtpRejected:
    text = f"{stage}: {reply}"
    if reply.code >= 500:
        return SmtpRejected(text, smtp_reply=str(reply))
    return SmtpTemporaryFailure(text, smtp_reply=str(reply))
