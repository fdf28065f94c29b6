"""Shared by the DKIM tests: test messages, DNS answers, the two independent verifiers."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from pathlib import Path

import dkim
import dns.name
import dns.rdata
import dns.resolver
import pytest

from worker.tools.dkim_keys import DnsRecord

PERL_VERIFIER = Path(__file__).with_name("dkim_verify.pl")
# Minimal but well-formed PDF so the attachment is real binary content.
PDF = (
    b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
    b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
    b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
    b"trailer<</Root 1 0 R>>\n%%EOF\n" + bytes(range(256)) * 40
)


def mail(subject: str = "Rechnung RE-2026-0001", body: str = "Anbei die Rechnung.\n") -> EmailMessage:
    """A plain text business mail as postbote composes it."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Anna Berg <rechnung@acme.example>"
    msg["To"] = "Kunde <kunde@example.com>"
    msg["Cc"] = "clerk@acme.example"
    msg["Reply-To"] = "anna@acme.example"
    msg["Subject"] = subject
    msg["Date"] = "Mon, 02 Mar 2026 10:00:00 +0100"
    msg["Message-ID"] = "<0b6f3c1e-7d1a-4e8e-9a8b-1c2d3e4f5a6b@acme.example>"
    msg.set_content(body)
    return msg


def plain() -> bytes:
    return mail().as_bytes()


def with_pdf() -> bytes:
    msg = mail()
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="RE-2026-0001.pdf")
    return msg.as_bytes()


def non_ascii_subject() -> bytes:
    subject = "Mahnung: Zahlung überfällig – Größe Ä Ö Ü ß, bitte prüfen Sie die Beträge."
    return mail(subject=subject).as_bytes()


def long_lines() -> bytes:
    line = "Sehr geehrte Damen und Herren, für die Lieferung berechnen wir Ihnen folgende Positionen. " * 5
    msg = mail()
    msg.set_content(line + "\n" + line + "\n", cte="quoted-printable")
    return msg.as_bytes()


MESSAGES = {
    "plain": plain,
    "pdf_attachment": with_pdf,
    "non_ascii_subject": non_ascii_subject,
    "long_lines": long_lines,
}


def txt_rdata(record: DnsRecord) -> dns.rdata.Rdata:
    """The record as a DNS server would serve it: parsed from its zone-file strings by dnspython."""
    quoted = " ".join(f'"{s}"' for s in record.strings)
    return dns.rdata.from_text("IN", "TXT", quoted)


class FakeResolver:
    """Answers TXT queries from ``records``; other names get NXDOMAIN, or ``error`` is raised."""

    def __init__(self, *records: DnsRecord, error: Exception | None = None) -> None:
        self.answers = {r.name: [txt_rdata(r)] for r in records}
        self.error = error
        self.queries: list[tuple[str, str]] = []

    def resolve(self, qname: str, rdtype: str) -> list[dns.rdata.Rdata]:
        self.queries.append((qname, rdtype))
        if self.error is not None:
            raise self.error
        if qname not in self.answers:
            raise dns.resolver.NXDOMAIN(qnames=[dns.name.from_text(qname)])
        return self.answers[qname]


def dkimpy_verify(message: bytes, *records: DnsRecord) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature, top to bottom, with DNS answered from ``records``."""
    published = {r.name: "".join(r.strings).encode() for r in records}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return published.get(name.decode().rstrip("."))

    d = dkim.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    return [bool(d.verify(idx=i, dnsfunc=dnsfunc)) for i in range(count)]


@dataclass(frozen=True)
class PerlVerdict:
    overall: str
    signatures: list[dict[str, str]]

    def by_algorithm(self, algorithm: str) -> dict[str, str]:
        return next(s for s in self.signatures if s["a"] == algorithm)


def perl_verify(message: bytes, *records: DnsRecord) -> PerlVerdict:
    """Mail::DKIM's verdict, via tests/support/dkim_verify.pl; fails the test when Mail::DKIM is missing."""
    try:
        done = subprocess.run(
            ["perl", str(PERL_VERIFIER), *(f"{r.name}={''.join(r.strings)}" for r in records)],
            input=message,
            capture_output=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        pytest.fail("perl is not installed; `make test` installs perl and libmail-dkim-perl")
    if done.returncode != 0:
        pytest.fail(f"Perl's Mail::DKIM verifier failed (is libmail-dkim-perl installed?): {done.stderr!r}")
    lines = done.stdout.decode().splitlines()
    signatures = []
    for line in lines[:-1]:
        result, a, d, s, detail = line.split(" ", 4)
        signatures.append({"result": result, "a": a[2:], "d": d[2:], "s": s[2:], "detail": detail})
    return PerlVerdict(lines[-1].removeprefix("overall "), signatures)


__all__ = [
    "MESSAGES",
    "PDF",
    "FakeResolver",
    "PerlVerdict",
    "dkimpy_verify",
    "long_lines",
    "mail",
    "non_ascii_subject",
    "perl_verify",
    "plain",
    "txt_rdata",
    "with_pdf",
]
