"""Logging set-up and the one-line-per-job outcome record (JSON when ``POSTBOTE_LOG_FORMAT=json``)."""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from worker.vocabulary import LogOutcome

OUTCOME_LOGGER = logging.getLogger("postbote.outcome")

_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(value: object) -> str:
    """``str(value)`` safe for a terminal and a line-based log: control characters (C0 with
    ESC, CR, LF and tab; DEL; C1), line and paragraph separators, bidirectional controls and
    unpaired surrogates are written as escapes (``\\x1b``, ``\\n``, ``\\u202e``).

    For strings a publisher chose (tenant, document number, detail, ids) in human output:
    an escape sequence must not drive the operator's terminal, a line break must not forge
    a log line."""
    return _UNPRINTABLE.sub(_escape, str(value))


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _TextFormatter(logging.Formatter):
    """One line per record: the message and the fields escaped (:func:`printable`), a field
    value quoted where it has a space, quote or ``=``; a traceback follows indented, so no
    line of it starts like a record."""

    def format(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.msg, safe.args = printable(record.getMessage()), None
        safe.exc_info, safe.exc_text, safe.stack_info = None, None, None
        line = super().format(safe)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_field_value(v)}" for k, v in fields.items() if v is not None)
        trace = []
        if record.exc_info:
            trace.append(self.formatException(record.exc_info))
        elif record.exc_text:
            trace.append(record.exc_text)
        if record.stack_info:
            trace.append(self.formatStack(record.stack_info))
        for text in trace:
            line += "".join(f"\n  {printable(part)}" for part in text.splitlines())
        return line


def _field_value(value: object) -> str:
    text = printable(value)
    if text and not any(c in text for c in ' "='):
        return text
    return '"' + text.replace('"', '\\"') + '"'


class _HideMessageContents(logging.Filter):
    """dramatiq logs a failed or skipped message as its whole call, job body and attachments included:
    keep only the actor and the message id (the job id) of any message passed as a log argument."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, Message | MessageProxy) for a in record.args):
            record.args = tuple(
                f"{a.actor_name}[{a.message_id}]" if isinstance(a, Message | MessageProxy) else a
                for a in record.args
            )
        return True


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Log to stderr, one line per record: text, or one JSON object per line for ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"))
    handler.addFilter(_HideMessageContents())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pika").setLevel(logging.WARNING)


OUTCOME_FIELDS = ("job_id", "tenant", "document", "sender", "reason", "smtp_reply", "duration_ms")
"""The fields every outcome line has (``null`` in JSON, left out in text, when they do not apply)."""


_QUIET = frozenset({LogOutcome.SENT, LogOutcome.DUPLICATE_PREVENTED, LogOutcome.PARKED})


def log_outcome(outcome: LogOutcome, **fields: Any) -> None:
    """One line per job outcome: job id, tenant, document, sender, outcome, reason, SMTP reply, duration.

    Extra fields (``detail``, ``refused``, ``status``) are appended. Never pass
    message bodies or secrets here.
    """
    level = logging.INFO if outcome in _QUIET else logging.WARNING
    record = {"outcome": outcome, **dict.fromkeys(OUTCOME_FIELDS), **fields}
    OUTCOME_LOGGER.log(level, "job %s", outcome, extra={"fields": record})


__all__ = ["OUTCOME_FIELDS", "configure_logging", "log_outcome", "printable"]
