"""One report through the stages: parse, match, classify, record."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from worker.bounces.classify import BounceClass, classify
from worker.bounces.match import Match, match_report
from worker.bounces.parse import parse_report
from worker.bounces.record import record_bounce
from worker.db import Connection

logger = logging.getLogger(__name__)


@dataclass
class Ingested:
    """What one message turned out to be, and what recording it changed."""

    report: bool
    """The message is a bounce report."""
    recorded: list[tuple[Match, BounceClass, str]] = field(default_factory=list)
    """Each matched recipient, its class and the outcome of recording it."""

    @property
    def matched(self) -> bool:
        return bool(self.recorded)


def ingest_report(conn: Connection, data: bytes, *, tenant: str | None = None) -> Ingested:
    """Read one message and apply what it reports; a message that is no report, or that matches
    no job and recipient (of ``tenant``, when given), changes nothing."""
    try:
        report = parse_report(data)
    except Exception:
        # Anyone can mail the mailbox: a message no parser foresaw is left alone, and the next
        # one is read, rather than the watch stopping at it.
        logger.warning("a message could not be read as a bounce report; left alone", exc_info=True)
        return Ingested(report=False)
    if report is None:
        return Ingested(report=False)
    ingested = Ingested(report=True)
    for match in match_report(conn, report, tenant=tenant):
        bounce_class = classify(match.finding.action, match.finding.status)
        ingested.recorded.append((match, bounce_class, record_bounce(conn, report.key, match, bounce_class)))
    return ingested


__all__ = ["Ingested", "ingest_report"]
