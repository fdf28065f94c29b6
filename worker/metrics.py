"""Prometheus metrics. Labels stay bounded: tenant, document type, reason, queue — never addresses or ids.

With several worker processes the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
before any process imports this module (prometheus-client multiprocess mode).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from schemas import constants as names

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

MAILS_SENT = Counter(
    names.METRIC_MAILS_SENT.removesuffix("_total"),
    "Mails accepted by the SMTP server.",
    ["tenant", "doc_type"],
)
MAILS_FAILED = Counter(
    names.METRIC_MAILS_FAILED.removesuffix("_total"),
    "Jobs that failed for good, by reason.",
    ["tenant", "doc_type", "reason"],
)
SMTP_SEND_SECONDS = Histogram(
    names.METRIC_SMTP_SEND_SECONDS,
    "Time to hand one mail to the SMTP server.",
    ["tenant"],
    buckets=_LATENCY_BUCKETS,
)
DKIM_SIGN_SECONDS = Histogram(
    names.METRIC_DKIM_SIGN_SECONDS,
    "Time to DKIM-sign one mail.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
RATELIMIT_WAIT_SECONDS = Histogram(
    names.METRIC_RATELIMIT_WAIT_SECONDS,
    "Time a mail waited for a slot in its tenant's series.",
    ["tenant"],
    buckets=_WAIT_BUCKETS,
)
QUEUE_MESSAGES = Gauge(
    names.METRIC_QUEUE_MESSAGES,
    "Messages waiting, per queue (dead = dead-letter store).",
    ["queue"],
    multiprocess_mode="liveall",
)
QUEUE_OLDEST_AGE_SECONDS = Gauge(
    names.METRIC_QUEUE_OLDEST_AGE_SECONDS,
    "Age of the oldest waiting message, per queue.",
    ["queue"],
    multiprocess_mode="liveall",
)
DUPLICATES_PREVENTED = Counter(
    names.METRIC_DUPLICATES_PREVENTED.removesuffix("_total"),
    "Redelivered jobs acknowledged without sending, as the ledger said done.",
    ["tenant"],
)
POSSIBLE_DUPLICATES = Counter(
    names.METRIC_POSSIBLE_DUPLICATES.removesuffix("_total"),
    "Jobs sent again after a worker died holding the claim (same Message-ID).",
    ["tenant"],
)
RETRIES = Counter(
    names.METRIC_RETRIES.removesuffix("_total"),
    "Transient failures that will be retried.",
    ["tenant", "doc_type", "reason"],
)
DEAD_LETTERED = Counter(
    names.METRIC_DEAD_LETTERED.removesuffix("_total"),
    "Jobs moved to the dead-letter store, by reason.",
    ["tenant", "doc_type", "reason"],
)
SMTP_CONNECTIONS_OPENED = Counter(
    names.METRIC_SMTP_CONNECTIONS_OPENED.removesuffix("_total"),
    "SMTP connections opened (a series reuses them).",
    ["tenant"],
)

__all__ = [
    "DEAD_LETTERED",
    "DKIM_SIGN_SECONDS",
    "DUPLICATES_PREVENTED",
    "MAILS_FAILED",
    "MAILS_SENT",
    "POSSIBLE_DUPLICATES",
    "QUEUE_MESSAGES",
    "QUEUE_OLDEST_AGE_SECONDS",
    "RATELIMIT_WAIT_SECONDS",
    "RETRIES",
    "SMTP_CONNECTIONS_OPENED",
    "SMTP_SEND_SECONDS",
]
