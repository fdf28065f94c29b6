"""Logging set-up and the one-line-per-job outcome record (JSON when ``POSTBOTE_LOG_FORMAT=json``)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from dramatiq.broker import MessageProxy
from dramatiq.message import Message

from worker.vocabulary import LogOutcome

OUTCOME_LOGGER = logging.getLogger("postbote.outcome")


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
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return line


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


_QUIET = frozenset({LogOutcome.SENT, LogOutcome.DUPLICATE_PREVENTED, LogOutcome.DEFERRED_SERIES})


def log_outcome(outcome: LogOutcome, **fields: Any) -> None:
    """One line per job outcome: job id, tenant, document, sender, outcome, reason, SMTP reply, duration.

    Extra fields (``detail``, ``refused``, ``status``) are appended. Never pass
    message bodies or secrets here.
    """
    level = logging.INFO if outcome in _QUIET else logging.WARNING
    record = {"outcome": outcome, **dict.fromkeys(OUTCOME_FIELDS), **fields}
    OUTCOME_LOGGER.log(level, "job %s", outcome, extra={"fields": record})


__all__ = ["OUTCOME_FIELDS", "configure_logging", "log_outcome"]
