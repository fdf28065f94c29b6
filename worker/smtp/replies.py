"""What the SMTP server said, and the one place its answers become postbote errors.

2xx is success; 4xx, 421, timeouts and lost connections are transient; 5xx is
permanent. The code, the enhanced status code (RFC 3463) and the text are kept.
"""

from __future__ import annotations

import re
import smtplib
from dataclasses import dataclass

from worker.errors import (
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
    """What the server said: the accepted envelope recipients, the refused ones and the final reply."""

    accepted: tuple[str, ...]
    refused: dict[str, SmtpReply]
    reply: SmtpReply
    tls_version: str | None = None
    auth_method: str | None = None


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
