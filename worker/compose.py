"""Build the MIME message of a job: headers, text and HTML parts, attachments, 7-bit safe."""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.utils import format_datetime
from uuid import UUID

from schemas.constants import DOCUMENT_HEADER, JOB_HEADER
from schemas.job import Job
from worker.addresses import address_key, ascii_address, needs_smtputf8
from worker.senders import Sender

# 7bit transfer encodings only: a relay converting 8bit parts would break the DKIM body hash.
_POLICY = policy.SMTP.clone(cte_type="7bit")
_POLICY_UTF8 = policy.SMTPUTF8.clone(cte_type="7bit")


@dataclass(frozen=True)
class Composed:
    """A message ready to sign and send, with its explicit envelope."""

    data: bytes
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str
    smtputf8: bool


def message_id_for(job_id: UUID, sender: str) -> str:
    """Stable Message-ID: the same job always gets the same one, so a duplicate is recognisable."""
    return f"<{job_id}@{ascii_address(sender).rpartition('@')[2]}>"


def compose_message(
    job: Job, sender: Sender, cc: list[str], blind: list[str], *, now: datetime | None = None
) -> Composed:
    """The message bytes (CRLF line ends) and envelope; ``blind`` recipients never appear in a header."""
    headers_to = [ascii_address(a) for a in job.to]
    headers_cc = [ascii_address(a) for a in cc]
    envelope = _unique([*headers_to, *headers_cc, *(ascii_address(a) for a in blind)])
    mail_from = ascii_address(sender.address)
    smtputf8 = needs_smtputf8(mail_from) or any(needs_smtputf8(a) for a in envelope)

    msg = EmailMessage(policy=_POLICY_UTF8 if smtputf8 else _POLICY)
    msg["From"] = HeaderAddress(display_name=sender.name or "", addr_spec=mail_from)
    msg["To"] = ", ".join(headers_to)
    if headers_cc:
        msg["Cc"] = ", ".join(headers_cc)
    if job.reply_to:
        msg["Reply-To"] = ascii_address(job.reply_to)
    msg["Subject"] = job.subject
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    message_id = message_id_for(job.job_id, mail_from)
    msg["Message-ID"] = message_id
    msg[DOCUMENT_HEADER] = f"{job.document.type.value} {job.document.number}"
    msg[JOB_HEADER] = str(job.job_id)

    text = job.body.text
    if sender.signature_text:
        text = f"{text.rstrip()}\n\n-- \n{sender.signature_text}\n"
    msg.set_content(text)
    if job.body.html is not None:
        msg.add_alternative(_with_html_signature(job.body.html, sender), subtype="html")
    for attachment in job.attachments:
        maintype, _, subtype = attachment.content_type.partition("/")
        msg.add_attachment(
            attachment.content(), maintype=maintype, subtype=subtype, filename=attachment.filename
        )
    return Composed(
        data=msg.as_bytes(),
        mail_from=mail_from,
        recipients=tuple(envelope),
        message_id=message_id,
        smtputf8=smtputf8,
    )


def _with_html_signature(body: str, sender: Sender) -> str:
    if sender.signature_html:
        signature = sender.signature_html
    elif sender.signature_text:
        signature = html.escape(sender.signature_text).replace("\n", "<br>\n")
    else:
        return body
    block = f'<div class="signature">-- <br>\n{signature}</div>'
    lower = body.lower()
    end = lower.rfind("</body>")
    return f"{body[:end]}{block}\n{body[end:]}" if end >= 0 else f"{body}\n{block}"


def _unique(addresses: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for a in addresses:
        seen.setdefault(address_key(a), a)
    return list(seen.values())


__all__ = ["Composed", "compose_message", "message_id_for"]
