"""Prometheus metrics. Labels stay bounded: tenant, document type, reason, queue — never addresses or ids.

The supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory before it
spawns the worker processes, so every object here writes to per-process files
that ``/metrics`` adds up (prometheus-client multiprocess mode). The queue gauges
(``postbote_queue_*``) are not here: the supervisor alone computes them
(``worker.runtime.queue_gauges``), so they are counted once per host. Nor are the restart
counters (``postbote_worker_restarts_total``, ``postbote_thread_restarts_total``): the supervisor
counts what it restarts (``worker.runtime.watchdog.RestartCounts``), nor the delivery-event
series (``postbote_events_published_total``, ``postbote_events_lag_seconds``): the event relay
runs in the supervisor and counts what it publishes (``worker.runtime.relay.RelayMetrics``), nor
``postbote_webhook_deliveries_total``: the supervisor's webhook sender counts what it posts
(``worker.runtime.webhooks.WebhookCounts``).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from schemas import constants as names

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

MAILS_SENT = Counter(
    names.METRIC_MAILS_SENT.removesuffix("_total"),
    "Jobs that ended sent or partial (some customer-facing recipient accepted the mail).",
    ["tenant", "doc_type"],
)
RECIPIENTS = Counter(
    names.METRIC_RECIPIENTS.removesuffix("_total"),
    "Envelope recipients that accepted the mail or were refused for good, by role (to, cc, bcc, clerk, archive).",
    ["tenant", "role", "outcome"],
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

UNSEALED_OPTIONS = Counter(
    names.METRIC_UNSEALED_OPTIONS.removesuffix("_total"),
    "Messages whose options had no valid seal (forged, or from another installation); "
    "they were processed without them.",
    ["queue"],
)

DRAMATIQ_MESSAGES = Counter(
    names.DRAMATIQ_MESSAGES.removesuffix("_total"),
    "The total number of messages processed.",
    ["queue_name", "actor_name"],
)
DRAMATIQ_MESSAGE_ERRORS = Counter(
    names.DRAMATIQ_MESSAGE_ERRORS.removesuffix("_total"),
    "The total number of errored messages.",
    ["queue_name", "actor_name"],
)
DRAMATIQ_MESSAGE_RETRIES = Counter(
    names.DRAMATIQ_MESSAGE_RETRIES.removesuffix("_total"),
    "The total number of retried messages.",
    ["queue_name", "actor_name"],
)
DRAMATIQ_MESSAGE_REJECTS = Counter(
    names.DRAMATIQ_MESSAGE_REJECTS.removesuffix("_total"),
    "The total number of dead-lettered messages.",
    ["queue_name", "actor_name"],
)
DRAMATIQ_MESSAGES_IN_PROGRESS = Gauge(
    names.DRAMATIQ_MESSAGES_IN_PROGRESS,
    "The number of messages in progress.",
    ["queue_name", "actor_name"],
    multiprocess_mode="livesum",
)
DRAMATIQ_DELAYED_MESSAGES_IN_PROGRESS = Gauge(
    names.DRAMATIQ_DELAYED_MESSAGES_IN_PROGRESS,
    "The number of delayed messages in memory.",
    ["queue_name", "actor_name"],
    multiprocess_mode="livesum",
)
DRAMATIQ_MESSAGE_DURATION = Histogram(
    names.DRAMATIQ_MESSAGE_DURATION,
    "The time spent processing messages.",
    ["queue_name", "actor_name"],
    buckets=(5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000, 30000, 60000, 600000),
)

__all__ = [
    "DEAD_LETTERED",
    "DKIM_SIGN_SECONDS",
    "DRAMATIQ_DELAYED_MESSAGES_IN_PROGRESS",
    "DRAMATIQ_MESSAGES",
    "DRAMATIQ_MESSAGES_IN_PROGRESS",
    "DRAMATIQ_MESSAGE_DURATION",
    "DRAMATIQ_MESSAGE_ERRORS",
    "DRAMATIQ_MESSAGE_REJECTS",
    "DRAMATIQ_MESSAGE_RETRIES",
    "DUPLICATES_PREVENTED",
    "MAILS_FAILED",
    "MAILS_SENT",
    "POSSIBLE_DUPLICATES",
    "RATELIMIT_WAIT_SECONDS",
    "RECIPIENTS",
    "RETRIES",
    "SMTP_CONNECTIONS_OPENED",
    "SMTP_SEND_SECONDS",
    "UNSEALED_OPTIONS",
]
