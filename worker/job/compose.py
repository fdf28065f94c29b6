"""Build the MIME message of a job: headers, text and HTML parts, attachments, 7-bit safe.

The bytes are written directly rather than through ``email.message`` (which
parses every header it is given back into objects and costs milliseconds per
mail): text parts are quoted-printable, attachments keep the job's base64
wrapped at 76 columns, lines end in CRLF, and no line exceeds 78 characters
except where a header value cannot be folded. A relay therefore never has to
re-encode anything, which would break the DKIM body hash.
"""

from __future__ import annotations

import binascii
import html
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import encode_rfc2231, format_datetime, formataddr
from uuid import UUID

from schemas.constants import DOCUMENT_HEADER, JOB_HEADER
from schemas.job import Attachment, Job
from worker.job.addresses import ascii_address, needs_smtputf8
from worker.job.recipients import Recipients
from worker.job.senders import Sender

CRLF = b"\r\n"
_FOLD_AT = 78
_MAX_LINE = 998
"""RFC 5322's hard limit on a line, without its CRLF."""


@dataclass(frozen=True)
class Composed:
    """A message ready to sign and send, with its explicit envelope.

    ``data`` ends every line in CRLF and has no bare CR or LF: header values cannot hold
    control characters, text parts are normalized and base64 is checked, so signing
    and SMTP take the bytes as they are.
    """

    data: bytes
    mail_from: str
    recipients: tuple[str, ...]
    message_id: str
    smtputf8: bool
    internal: frozenset[str] = frozenset()
    """Recipients of internal copies: they go only in a transaction that reaches a customer-facing one."""
    envid: str | None = None
    """Set when the tenant asks for DSN (``bounces.dsn``): the ENVID, and ``RET=HDRS``,
    ``NOTIFY=FAILURE,DELAY`` and ``ORCPT`` per recipient, where the server offers DSN."""


def message_id_for(job_id: UUID, sender: str) -> str:
    """Stable Message-ID: the same job always gets the same one, so a duplicate is recognisable."""
    return f"<{job_id}@{ascii_address(sender).rpartition('@')[2]}>"


def compose_message(
    job: Job,
    sender: Sender,
    recipients: Recipients,
    *,
    now: datetime | None = None,
    verp_domain: str | None = None,
    dsn: bool = False,
) -> Composed:
    """The message bytes (CRLF line ends) and envelope; only ``recipients.cc`` and the job's
    ``to`` appear in a header. With ``verp_domain`` the envelope sender is the VERP return path
    ``bounce+<job id>@<verp_domain>`` (the From header stays the sender's); with ``dsn`` the
    transaction asks for delivery status notifications carrying the job id as ENVID."""
    headers_to = [ascii_address(a) for a in job.to]
    headers_cc = list(recipients.cc)
    envelope = tuple(r.address for r in recipients.envelope)
    internal = frozenset(r.address for r in recipients.envelope if not r.role.customer_facing)
    mail_from = ascii_address(sender.address)
    smtputf8 = needs_smtputf8(mail_from) or any(needs_smtputf8(a) for a in envelope)
    message_id = message_id_for(job.job_id, mail_from)

    headers = [
        b"From: " + _from(sender.name, mail_from),
        _address_list("To", headers_to),
    ]
    if headers_cc:
        headers.append(_address_list("Cc", headers_cc))
    if job.reply_to:
        headers.append(b"Reply-To: " + ascii_address(job.reply_to).encode())
    headers += [
        _text_header("Subject", job.subject),
        b"Date: " + format_datetime(now or datetime.now(UTC)).encode(),
        b"Message-ID: " + message_id.encode(),
        _text_header(DOCUMENT_HEADER, f"{job.document.type.value} {job.document.number}"),
        f"{JOB_HEADER}: {job.job_id}".encode(),
        b"MIME-Version: 1.0",
    ]
    part_headers, body = _body(job, sender)
    data = CRLF.join([*headers, *part_headers]) + CRLF + CRLF + body
    return Composed(
        data=data,
        mail_from=f"bounce+{job.job_id.hex}@{verp_domain}" if verp_domain else mail_from,
        recipients=envelope,
        message_id=message_id,
        smtputf8=smtputf8,
        internal=internal,
        envid=str(job.job_id) if dsn else None,
    )


def _body(job: Job, sender: Sender) -> tuple[list[bytes], bytes]:
    """Content headers and body of the top-level entity."""
    text = job.body.text
    if sender.signature_text:
        text = f"{text.rstrip()}\n\n-- \n{sender.signature_text}\n"
    content: tuple[list[bytes], bytes] = _text_part(text, "plain")
    if job.body.html is not None:
        content = _multipart(
            "alternative", [content, _text_part(_with_html_signature(job.body.html, sender), "html")]
        )
    if job.attachments:
        content = _multipart("mixed", [content, *(_attachment_part(a) for a in job.attachments)])
    return content


def _text_part(text: str, subtype: str) -> tuple[list[bytes], bytes]:
    normalized = text.replace("\r\n", "\n").replace("\r", "\n").encode("utf-8")
    encoded = binascii.b2a_qp(normalized, istext=True).replace(b"\n", CRLF)
    if not encoded.endswith(CRLF):
        encoded += CRLF
    return (
        [
            f'Content-Type: text/{subtype}; charset="utf-8"'.encode(),
            b"Content-Transfer-Encoding: quoted-printable",
        ],
        encoded,
    )


def _attachment_part(attachment: Attachment) -> tuple[list[bytes], bytes]:
    data = attachment.content_base64.encode("ascii")
    lines = [data[i : i + 76] for i in range(0, len(data), 76)]
    return (
        [
            f"Content-Type: {attachment.content_type}".encode(),
            b"Content-Transfer-Encoding: base64",
            b"Content-Disposition: attachment;" + CRLF + b" " + _filename(attachment.filename),
        ],
        CRLF.join(lines) + CRLF,
    )


def _multipart(subtype: str, parts: list[tuple[list[bytes], bytes]]) -> tuple[list[bytes], bytes]:
    # "=_" cannot occur in quoted-printable or base64 text, so the boundary never collides.
    boundary = f"=_postbote_{secrets.token_hex(12)}".encode()
    chunks = []
    for headers, body in parts:
        # The CRLF before a delimiter belongs to the delimiter, not to the part's content.
        chunks += [b"--" + boundary + CRLF, CRLF.join(headers), CRLF + CRLF, body, CRLF]
    chunks.append(b"--" + boundary + b"--" + CRLF)
    return [
        f"Content-Type: multipart/{subtype};".encode() + CRLF + b' boundary="' + boundary + b'"'
    ], b"".join(chunks)


def _filename(name: str) -> bytes:
    if name.isascii():
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'filename="{quoted}"'.encode()
    encoded = encode_rfc2231(name, "utf-8")
    if len(encoded) <= _FOLD_AT - 12:
        return f"filename*={encoded}".encode()
    # RFC 2231 continuations: a long non-ASCII name would otherwise make a line a relay may split.
    chunks, rest = [], encoded
    while rest:
        cut = min(len(rest), _FOLD_AT - 16)
        if "%" in rest[max(0, cut - 2) : cut]:
            cut = rest.rindex("%", 0, cut)
        chunks.append(rest[:cut])
        rest = rest[cut:]
    return ";\r\n ".join(f"filename*{n}*={chunk}" for n, chunk in enumerate(chunks)).encode()


def _from(name: str | None, address: str) -> bytes:
    return formataddr((name or "", address), charset="utf-8").encode("utf-8")


def _text_header(name: str, value: str) -> bytes:
    """An unstructured header; non-ASCII text is RFC 2047 encoded, long text folded."""
    if value.isascii() and len(name) + 2 + len(value) <= _FOLD_AT:
        return f"{name}: {value}".encode()
    charset = "us-ascii" if value.isascii() else "utf-8"
    encoded = Header(value, charset, header_name=name, maxlinelen=_FOLD_AT).encode(linesep="\r\n")
    if any(len(line) > _MAX_LINE - len(name) - 2 for line in encoded.split("\r\n")):
        # A word too long to fold: encoded words can be split anywhere (RFC 2047).
        encoded = Header(value, "utf-8", header_name=name, maxlinelen=_FOLD_AT).encode(linesep="\r\n")
    return f"{name}: {encoded}".encode("ascii")


def _address_list(name: str, addresses: list[str]) -> bytes:
    """A To or Cc header, folded between addresses."""
    lines = [f"{name}: {addresses[0]}"]
    for address in addresses[1:]:
        if len(lines[-1]) + 2 + len(address) > _FOLD_AT:
            lines[-1] += ","
            lines.append(f" {address}")
        else:
            lines[-1] += f", {address}"
    return "\r\n".join(lines).encode("utf-8")


def _with_html_signature(body: str, sender: Sender) -> str:
    if sender.signature_html:
        signature = sender.signature_html
    elif sender.signature_text:
        signature = html.escape(sender.signature_text).replace("\n", "<br>\n")
    else:
        return body
    block = f'<div class="signature">-- <br>\n{signature}</div>'
    end = body.lower().rfind("</body>")
    return f"{body[:end]}{block}\n{body[end:]}" if end >= 0 else f"{body}\n{block}"


__all__ = ["Composed", "compose_message", "message_id_for"]
