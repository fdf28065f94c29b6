"""Realistic sample documents for the demo, the tests and the benchmarks: jobs with a generated PDF."""

from __future__ import annotations

import base64
import os
import zlib
from typing import Any
from uuid import uuid4


def make_pdf(title: str, lines: list[str], *, padding_bytes: int = 0) -> bytes:
    """A small valid one-page PDF with ``title`` and ``lines``; ``padding_bytes`` of random
    data in an extra stream make every file distinct and of a realistic size."""
    text = ["BT", "/F1 16 Tf", "56 780 Td", f"({_pdf_escape(title)}) Tj", "/F1 10 Tf"]
    for line in lines:
        text += ["0 -16 Td", f"({_pdf_escape(line)}) Tj"]
    text.append("ET")
    content = zlib.compress("\n".join(text).encode("latin-1", "replace"))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    if padding_bytes:
        noise = os.urandom(padding_bytes)
        objects.append(b"<< /Length %d >>\nstream\n" % len(noise) + noise + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def _pdf_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


_TITLES = {
    "invoice": ("Rechnung", "RE"),
    "offer": ("Angebot", "AN"),
    "order": ("Auftragsbestätigung", "AB"),
    "dunning": ("Zahlungserinnerung", "MA"),
    "receipt": ("Kassenbeleg", "KB"),
    "other": ("Dokument", "DO"),
}


def make_job(
    tenant: str,
    doc_type: str,
    number: int,
    *,
    user_id: str,
    to: str,
    clerk_id: str | None = None,
    padding_bytes: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """A job as an ERP module would publish it, with a PDF of the document attached."""
    title, prefix = _TITLES[doc_type]
    doc_number = f"{prefix}-2026-{number:05d}"
    pdf = make_pdf(
        f"{title} {doc_number}",
        [
            f"Kunde: {to}",
            "Pos. 1  Beratung  8 h  à 95,00 €  760,00 €",
            "Summe netto 760,00 €",
            "USt 19 % 144,40 €",
            "Gesamtbetrag 904,40 €",
        ],
        padding_bytes=padding_bytes,
    )
    job: dict[str, Any] = {
        "job_id": str(uuid4()),
        "tenant": tenant,
        "document": {"type": doc_type, "number": doc_number},
        "user_id": user_id,
        "to": [to],
        "subject": f"{title} {doc_number}",
        "body": {
            "text": f"Sehr geehrte Damen und Herren,\n\nanbei erhalten Sie {title} {doc_number}.\n\n"
            "Mit freundlichen Grüßen",
            "html": f"<html><body><p>Sehr geehrte Damen und Herren,</p><p>anbei erhalten Sie "
            f"<b>{title} {doc_number}</b>.</p><p>Mit freundlichen Grüßen</p></body></html>",
        },
        "attachments": [
            {
                "filename": f"{doc_number}.pdf",
                "content_type": "application/pdf",
                "content_base64": base64.b64encode(pdf).decode("ascii"),
            }
        ],
    }
    if clerk_id:
        job["clerk_id"] = clerk_id
    job.update(extra)
    return job


__all__ = ["make_job", "make_pdf"]
