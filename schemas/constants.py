"""Names shared by the producer, the workers and operators' tooling."""

DOCUMENTS_QUEUE = "documents"
RECEIPTS_QUEUE = "receipts"
LANES = (DOCUMENTS_QUEUE, RECEIPTS_QUEUE)

SEND_DOCUMENT_ACTOR = "send_document"
SEND_RECEIPT_ACTOR = "send_receipt"

DOCUMENT_HEADER = "X-Postbote-Document"
JOB_HEADER = "X-Postbote-Job"

DEFAULT_MAX_JOB_BYTES = 20 * 1024 * 1024

METRIC_MAILS_SENT = "postbote_mails_sent_total"
METRIC_MAILS_FAILED = "postbote_mails_failed_total"
METRIC_SMTP_SEND_SECONDS = "postbote_smtp_send_seconds"
METRIC_DKIM_SIGN_SECONDS = "postbote_dkim_sign_seconds"
METRIC_RATELIMIT_WAIT_SECONDS = "postbote_ratelimit_wait_seconds"
METRIC_QUEUE_MESSAGES = "postbote_queue_messages"


def queue_name(prefix: str, lane: str) -> str:
    """The RabbitMQ queue of a lane (``documents`` or ``receipts``) under a prefix."""
    return f"{prefix}.{lane}" if prefix else lane


def lane_queues(prefix: str) -> list[str]:
    """The RabbitMQ queues of both lanes under a prefix."""
    return [queue_name(prefix, lane) for lane in LANES]


def lane_of(doc_type: str) -> str:
    """Receipts have their own lane so they never wait behind a bulk run."""
    return RECEIPTS_QUEUE if doc_type == "receipt" else DOCUMENTS_QUEUE


def actor_of(lane: str) -> str:
    return SEND_RECEIPT_ACTOR if lane == RECEIPTS_QUEUE else SEND_DOCUMENT_ACTOR


EVENTS_EXCHANGE = "events"


def events_exchange(prefix: str) -> str:
    """The durable topic exchange delivery events are published to, under a prefix."""
    return f"{prefix}.{EVENTS_EXCHANGE}" if prefix else EVENTS_EXCHANGE


def event_routing_key(tenant: str, doc_type: str, event_type: str) -> str:
    """``<tenant>.<doc_type>.<event type>``, e.g. ``acme.invoice.sent``."""
    return f"{tenant}.{doc_type}.{event_type}"


METRIC_QUEUE_OLDEST_AGE_SECONDS = "postbote_queue_oldest_age_seconds"
METRIC_JOBS_PARKED = "postbote_jobs_parked"
METRIC_TENANT_PAUSED_SECONDS = "postbote_tenant_paused_seconds"
METRIC_DUPLICATES_PREVENTED = "postbote_duplicates_prevented_total"
METRIC_POSSIBLE_DUPLICATES = "postbote_possible_duplicates_total"
METRIC_RETRIES = "postbote_retries_total"
METRIC_DEAD_LETTERED = "postbote_dead_lettered_total"
METRIC_SMTP_CONNECTIONS_OPENED = "postbote_smtp_connections_opened_total"
METRIC_RECIPIENTS = "postbote_recipients_total"
METRIC_UNSEALED_OPTIONS = "postbote_unsealed_options_total"
METRIC_WORKER_RESTARTS = "postbote_worker_restarts_total"
METRIC_THREAD_RESTARTS = "postbote_thread_restarts_total"
METRIC_WEBHOOK_DELIVERIES = "postbote_webhook_deliveries_total"
METRIC_EVENTS_PUBLISHED = "postbote_events_published_total"
METRIC_EVENTS_LAG_SECONDS = "postbote_events_lag_seconds"
METRIC_BOUNCES = "postbote_bounces_total"
METRIC_LOGIN_FAILING = "postbote_login_failing"

DEAD_LETTER_QUEUE_LABEL = "dead"
"""The ``queue`` label of the dead-letter store (the PostgreSQL table ``dead_letters``)."""

# dramatiq's own metrics, under the names its Prometheus middleware uses, so
# dashboards written for dramatiq work unchanged.
DRAMATIQ_MESSAGES = "dramatiq_messages_total"
DRAMATIQ_MESSAGE_ERRORS = "dramatiq_message_errors_total"
DRAMATIQ_MESSAGE_RETRIES = "dramatiq_message_retries_total"
DRAMATIQ_MESSAGE_REJECTS = "dramatiq_message_rejects_total"
DRAMATIQ_MESSAGES_IN_PROGRESS = "dramatiq_messages_inprogress"
DRAMATIQ_DELAYED_MESSAGES_IN_PROGRESS = "dramatiq_delayed_messages_inprogress"
DRAMATIQ_MESSAGE_DURATION = "dramatiq_message_duration_milliseconds"
