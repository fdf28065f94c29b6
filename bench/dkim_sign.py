"""Milliseconds per DKIM signature: stock dkimpy against postbote's signing stage.

Signs a ~30 KB invoice mail (text and a PDF attachment) with RSA-2048 and with
Ed25519, and prints both figures and the speed-up measured in this run::

    python bench/dkim_sign.py [--seconds 1.0]

Stock dkimpy parses the PEM key and computes RSA in pure Python for every
mail; postbote parses the key once and signs through OpenSSL.
"""

from __future__ import annotations

import argparse
import base64
import functools
import statistics
import sys
import time
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from importlib.metadata import version
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import machine  # noqa: E402
from worker.job.signature import (  # noqa: E402
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    DkimSigner,
    PrivateKey,
    SigningKey,
    sign_message,
)
from worker.tools.dkim_keys import generate_private_key, private_key_pem  # noqa: E402

DOMAIN, SELECTOR = b"acme.example", b"s2026"


def invoice_mail(size: int = 30_000) -> bytes:
    """A realistic invoice mail of about ``size`` bytes."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = "Rechnung <rechnung@acme.example>"
    msg["To"] = "kunde@example.com"
    msg["Subject"] = "Rechnung RE-2026-0001"
    msg["Date"] = "Mon, 02 Mar 2026 10:00:00 +0100"
    msg["Message-ID"] = "<bench@acme.example>"
    msg.set_content("Sehr geehrte Damen und Herren,\n\nanbei erhalten Sie Ihre Rechnung.\n" * 20)
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * ((size * 3 // 4 - 2000) // 256)
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="RE-2026-0001.pdf")
    return msg.as_bytes()


def stock_signer(message: bytes, key: PrivateKey) -> Callable[[], bytes]:
    """Stock dkimpy as it is usually called: key material in, header out, per mail."""
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm, material = b"rsa-sha256", private_key_pem(key)
    else:
        raw = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        algorithm, material = b"ed25519-sha256", base64.b64encode(raw)

    def sign() -> bytes:
        d = dkim.DKIM(message, signature_algorithm=algorithm)
        d.should_sign, d.frozen_sign = set(SIGNED_HEADERS), set(OVERSIGNED_HEADERS)
        header: bytes = d.sign(SELECTOR, DOMAIN, material, canonicalize=(b"relaxed", b"relaxed"))
        return header + message

    return sign


def ms_per_call(stock: Callable[[], bytes], fast: Callable[[], bytes], seconds: float) -> tuple[float, float]:
    """Median ms per call of each, over five rounds that alternate between the two against drift."""
    rounds: dict[Callable[[], bytes], list[float]] = {stock: [], fast: []}
    calls = {fn: _calls_in(fn, seconds / 10) for fn in rounds}
    for _ in range(5):
        for fn, times in rounds.items():
            t0 = time.perf_counter()
            for _ in range(calls[fn]):
                fn()
            times.append((time.perf_counter() - t0) / calls[fn] * 1000)
    return statistics.median(rounds[stock]), statistics.median(rounds[fast])


def _calls_in(fn: Callable[[], bytes], seconds: float) -> int:
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return max(calls, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per figure (default 1.0)")
    args = parser.parse_args()
    message = invoice_mail()
    print(machine())
    print(f"message: {len(message)} bytes; dkimpy {version('dkimpy')}; median of 5 rounds\n")
    print(f"{'algorithm':<14}{'stock dkimpy':>14}{'postbote':>12}{'speed-up':>10}")
    keys = (("rsa-2048", generate_private_key("rsa", 2048)), ("ed25519", generate_private_key("ed25519")))
    for label, key in keys:
        fast_signer = DkimSigner((SigningKey(DOMAIN, SELECTOR, key),))
        fast_sign = functools.partial(sign_message, message, fast_signer)
        stock, fast = ms_per_call(stock_signer(message, key), fast_sign, args.seconds)
        print(f"{label:<14}{stock:>11.3f} ms{fast:>9.3f} ms{stock / fast:>9.1f}x")


if __name__ == "__main__":
    main()
