"""Logging set-up and the one-line-per-job outcome record (JSON when ``POSTBOTE_LOG_FORMAT=json``)."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

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


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("pika").setLevel(logging.WARNING)


def log_outcome(outcome: str, **fields: Any) -> None:
    """One line per job outcome: job id, tenant, document, sender, outcome, reason, SMTP reply, duration.

    Never pass message bodies or secrets here.
    """
    level = logging.INFO if outcome in ("sent", "duplicate_prevented") else logging.WARNING
    OUTCOME_LOGGER.log(level, "job %s", outcome, extra={"fields": {"outcome": outcome, **fields}})


__all__ = ["configure_logging", "log_outcome"]
