"""What a bounce report says: which recipients failed or were delayed, with which status, and the
identifiers of the original message it carries back.

RFC 3464 reports (``multipart/report; report-type=delivery-status``) are read field by field.
Other reports (Exchange, qmail, Exim, provider notices) go to flufl.bounce's detectors, but only
when the message comes from a mail system (null sender, ``MAILER-DAEMON``, ``postmaster``,
``Auto-Submitted``, ``X-Failed-Recipients``): a customer's reply is never read as a bounce.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.utils import getaddresses, parseaddr
from uuid import UUID

import flufl.bounce

from schemas.constants import JOB_HEADER

_UUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
_MESSAGE_ID = re.compile(rf"^<({_UUID})@[^>]+>$")
_BODY_JOB = re.compile(rf"^\s*{JOB_HEADER}:\s*({_UUID})\s*$", re.IGNORECASE | re.MULTILINE)
_BODY_MESSAGE_ID = re.compile(rf"^\s*Message-ID:\s*<({_UUID})@[^>\s]+>\s*$", re.IGNORECASE | re.MULTILINE)
_VERP = re.compile(r"\bbounce\+([0-9a-fA-F]{32})@", re.IGNORECASE)
_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_SMTP_CODE = re.compile(r"(?<!\d)([45]\d\d)(?:[ -]|$)")
_DIAGNOSTIC = re.compile(r"^\s*smtp\s*;\s*", re.IGNORECASE)
_MAIL_SYSTEMS = ("mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon")
_ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")


@dataclass(frozen=True)
class Finding:
    """One recipient a report is about."""

    address: str
    """``Final-Recipient``, or the address a detector found."""
    original: str | None
    """``Original-Recipient`` (the ORCPT the transaction gave), when the report has it."""
    action: str
    """``failed`` or ``delayed``."""
    status: str | None
    """The RFC 3463 status code, such as ``5.1.1``."""
    code: int | None
    """The SMTP reply code the remote server gave, when the report names it."""
    reply: str
    """What the remote server said (``Diagnostic-Code``), or the report's own words."""


@dataclass(frozen=True)
class Report:
    key: str
    """Identifies the report for idempotent ingest: a digest of its Message-ID, else of its bytes."""
    standard: bool
    """An RFC 3464 delivery status report."""
    findings: tuple[Finding, ...] = ()
    job_ids: frozenset[UUID] = field(default_factory=frozenset)
    """Job ids from the returned message's headers (Message-ID, ``X-Postbote-Job``)."""
    envid: UUID | None = None
    verp: UUID | None = None


def parse_report(data: bytes) -> Report | None:
    """The report in ``data``, or ``None`` when the message is no bounce report (a customer's
    reply, a newsletter, a read receipt)."""
    message = email.message_from_bytes(data, policy=email.policy.compat32)
    key = hashlib.sha256((message.get("Message-ID") or "").strip().encode() or data).hexdigest()
    verp = _verp_token(message)
    if _is_delivery_status(message):
        findings, envid = _delivery_status(message)
        returned = _returned_headers(message)
        return Report(key, True, findings, _job_ids(returned), envid, verp)
    if not _from_mail_system(message):
        return None
    findings = _detected(message)
    if not findings:
        return None
    text = _text_of(message)
    ids = _job_ids(_returned_headers(message))
    ids |= {UUID(m) for m in _BODY_JOB.findall(text)} | {UUID(m) for m in _BODY_MESSAGE_ID.findall(text)}
    return Report(key, False, findings, frozenset(ids), None, verp)


def _is_delivery_status(message: Message) -> bool:
    return (
        message.get_content_type() == "multipart/report"
        and (message.get_param("report-type") or "").lower() == "delivery-status"  # type: ignore[union-attr]
    )


def _delivery_status(message: Message) -> tuple[tuple[Finding, ...], UUID | None]:
    findings: list[Finding] = []
    envid = None
    for part in message.walk():
        if part.get_content_type() not in ("message/delivery-status", "message/global-delivery-status"):
            continue
        payload = part.get_payload()
        blocks = [b for b in payload if isinstance(b, Message)] if isinstance(payload, list) else []
        if not blocks:
            continue
        envid = _uuid(str(blocks[0].get("Original-Envelope-Id", "")).strip()) or envid
        for block in blocks[1:]:
            finding = _recipient_block(block)
            if finding is not None:
                findings.append(finding)
    return tuple(findings), envid


def _recipient_block(block: Message) -> Finding | None:
    action = str(block.get("Action", "")).strip().lower()
    if action not in ("failed", "delayed"):
        return None
    final = _typed_address(block.get("Final-Recipient"))
    original = _typed_address(block.get("Original-Recipient"))
    address = final or original
    if address is None:
        return None
    status = str(block.get("Status", "")).strip() or None
    diagnostic = " ".join(str(block.get("Diagnostic-Code", "")).split())
    reply = _DIAGNOSTIC.sub("", diagnostic) or f"{action} ({status or 'no status'})"
    code = _SMTP_CODE.match(reply)
    return Finding(address, original, action, _status(status), int(code.group(1)) if code else None, reply)


def _typed_address(value: object) -> str | None:
    """``rfc822; kunde@example.com`` → ``kunde@example.com``."""
    if value is None:
        return None
    kind, _, address = str(value).partition(";")
    address = address.strip().strip("<>") if address else kind.strip().strip("<>")
    return address if "@" in address else None


def _status(value: str | None) -> str | None:
    if value is None:
        return None
    found = _ENHANCED.search(value)
    return ".".join(found.groups()) if found else None


def _returned_headers(message: Message) -> list[Message]:
    """The headers of the original message a report returns (``message/rfc822`` or
    ``text/rfc822-headers``)."""
    found: list[Message] = []
    for part in message.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                found.append(payload[0])
        elif kind in ("text/rfc822-headers", "message/global-headers"):
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                found.append(HeaderParser().parsestr(raw.decode("utf-8", "replace")))
    return found


def _job_ids(headers: list[Message]) -> frozenset[UUID]:
    ids: set[UUID] = set()
    for returned in headers:
        matched = _MESSAGE_ID.match(str(returned.get("Message-ID", "")).strip())
        if matched:
            ids.add(UUID(matched.group(1)))
        job = _uuid(str(returned.get(JOB_HEADER, "")).strip())
        if job is not None:
            ids.add(job)
    return frozenset(ids)


def _uuid(value: str) -> UUID | None:
    if not re.fullmatch(_UUID, value):
        return None
    return UUID(value)


def _verp_token(message: Message) -> UUID | None:
    """The job id in a VERP return path (``bounce+<job id, 32 hex digits>@domain``) the report was
    sent to."""
    for name in _ENVELOPE_HEADERS:
        for _, address in getaddresses([str(v) for v in message.get_all(name, [])]):
            found = _VERP.search(address)
            if found:
                return UUID(found.group(1))
    return None


def _from_mail_system(message: Message) -> bool:
    """Sent by a mail system rather than a person; an out-of-office notice (null sender too, but
    ``Auto-Submitted: auto-replied`` from a person's address) is not."""
    if message.get("X-Failed-Recipients"):
        return True
    local = parseaddr(str(message.get("From", "")))[1].partition("@")[0].lower()
    if local in _MAIL_SYSTEMS:
        return True
    replied = str(message.get("Auto-Submitted", "no")).strip().lower().startswith("auto-replied")
    return str(message.get("Return-Path", "")).strip() == "<>" and not replied


def _detected(message: Message) -> tuple[Finding, ...]:
    temporary, permanent = flufl.bounce.all_failures(message)
    text = _text_of(message)
    status = _status(text)
    code = _SMTP_CODE.search(text)
    reply = _reply_line(text)
    findings = []
    for action, addresses in (("failed", permanent), ("delayed", temporary)):
        for raw in sorted(addresses):
            address = raw.decode("ascii", "replace").strip().strip("<>")
            if "@" not in address:
                continue
            fallback = "5.0.0" if action == "failed" else "4.0.0"
            findings.append(
                Finding(
                    address, None, action, status or fallback, int(code.group(1)) if code else None, reply
                )
            )
    return tuple(findings)


def _text_of(message: Message) -> str:
    """The report's own text parts, without the message it returns."""
    texts: list[str] = []
    stack: list[Message] = [message]
    while stack:
        part = stack.pop(0)
        if part.is_multipart():
            stack.extend(p for p in part.get_payload() if isinstance(p, Message))
        elif part.get_content_maintype() == "text" and part.get_content_type() != "text/rfc822-headers":
            raw = part.get_payload(decode=True)
            if isinstance(raw, bytes):
                texts.append(raw.decode(part.get_content_charset() or "utf-8", "replace"))
    return "\n".join(texts)


def _reply_line(text: str) -> str:
    """The line of a report that carries the remote server's reply, else its first words."""
    for line in text.splitlines():
        if _ENHANCED.search(line) or _SMTP_CODE.search(line):
            return " ".join(line.split())[:500]
    return " ".join(text.split())[:200] or "bounced (no reason given)"


__all__ = ["Finding", "Report", "parse_report"]
