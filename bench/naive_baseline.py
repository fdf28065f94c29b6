"""The obvious worker, for comparison: a dramatiq actor that looks the sender up in PostgreSQL,
builds the mail with ``EmailMessage``, signs it with stock ``dkim.sign`` and opens a new SMTP
connection per mail. Run by bench/throughput.py as ``python -m dramatiq naive_baseline --path bench``.

Configured through ``NAIVE_*`` environment variables set by the benchmark.
"""

from __future__ import annotations

import base64
import os
import smtplib
import threading
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

import dkim
import dramatiq
import psycopg
from dramatiq.brokers.rabbitmq import RabbitmqBroker

broker = RabbitmqBroker(
    url=os.environ.get("NAIVE_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"), confirm_delivery=True
)
dramatiq.set_broker(broker)
_local = threading.local()


def _db() -> psycopg.Connection[Any]:
    conn = getattr(_local, "conn", None)
    if conn is None:
        conn = _local.conn = psycopg.connect(os.environ["NAIVE_DATABASE_URL"], autocommit=True)
    return conn


@dramatiq.actor(queue_name=os.environ.get("NAIVE_QUEUE", "naive"), actor_name="naive_send", max_retries=3)
def naive_send(job: dict[str, Any]) -> None:
    row = (
        _db()
        .execute(
            "SELECT t.sender_invoice, t.archive_bcc, e.email FROM tenants t JOIN employees e"
            " ON e.tenant_id = t.id AND e.id = %s WHERE t.id = %s",
            (job["user_id"], job["tenant"]),
        )
        .fetchone()
    )
    assert row is not None
    sender, archive, own = row
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = sender or own
    msg["To"] = ", ".join(job["to"])
    msg["Subject"] = job["subject"]
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = f"<{job['job_id']}@acme.example>" if job.get("job_id") else make_msgid()
    msg.set_content(job["body"]["text"])
    if job["body"].get("html"):
        msg.add_alternative(job["body"]["html"], subtype="html")
    for a in job.get("attachments", []):
        maintype, _, subtype = a["content_type"].partition("/")
        msg.add_attachment(
            base64.b64decode(a["content_base64"]), maintype=maintype, subtype=subtype, filename=a["filename"]
        )
    data = msg.as_bytes()
    signature = dkim.sign(
        data,
        os.environ["NAIVE_DKIM_SELECTOR"].encode(),
        os.environ["NAIVE_DKIM_DOMAIN"].encode(),
        os.environ["NAIVE_DKIM_KEY"].encode(),
    )
    with smtplib.SMTP(os.environ["NAIVE_SMTP_HOST"], int(os.environ["NAIVE_SMTP_PORT"]), timeout=30) as smtp:
        smtp.sendmail(sender or own, [*job["to"], archive], signature + data)
