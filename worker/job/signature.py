"""The DKIM stage: prepend DKIM-Signature headers to a composed message.

Signatures are relaxed/relaxed, rsa-sha256 or ed25519-sha256 (from the key),
without ``l=``, over :data:`SIGNED_HEADERS` with From signed once more than it
occurs, so that no second From can be added.

dkimpy's own ``DKIM.sign`` parses the PEM key and computes RSA in pure
Python for every mail (~10 ms). Here the key is parsed once, by
``cryptography``, and :func:`sign_message` mirrors ``DKIM.sign`` and
``DomainSigner.gen_header`` (dkimpy 1.1.8) step by step with dkimpy's own
parsing, canonicalisation, header selection and folding (helpers outside its
public API, reached through :mod:`worker.library_internals`); only the private-key
operation goes to OpenSSL. RSA PKCS#1 v1.5 and Ed25519 are deterministic, so
the result is byte for byte what stock dkimpy produces; tests/test_dkim_signing.py
pins that.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from pydantic import SecretStr

from schemas.tenant import Dkim, DkimKey
from worker.errors import ConfigurationError, DkimFailed
from worker.library_internals import (
    blank_dkim_b_tag,
    dkimpy_relaxed_headers,
    fold_dkim_header,
    hash_dkim_headers,
)

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
)
"""Header fields signed as often as they occur (lower case, as in ``h=``)."""

OVERSIGNED_HEADERS = (b"from",)
"""Header fields listed once more in ``h=`` than they occur."""

MIN_RSA_BITS = 1024
_HEADER_NAME = b"DKIM-Signature"
_NAMELEN = len(_HEADER_NAME)
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP_RUN = re.compile(rb"[\t ]{2,}|\t")
_RSA_PADDING = padding.PKCS1v15()
_PREHASHED_SHA256 = Prehashed(hashes.SHA256())


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One parsed private key with the domain and selector it signs for."""

    domain: bytes
    selector: bytes
    key: PrivateKey

    @property
    def algorithm(self) -> bytes:
        """The ``a=`` value: ``rsa-sha256`` or ``ed25519-sha256``."""
        return b"rsa-sha256" if isinstance(self.key, rsa.RSAPrivateKey) else b"ed25519-sha256"

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a SHA-256 digest of the canonical headers as DKIM requires for this algorithm."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(digest, _RSA_PADDING, _PREHASHED_SHA256)
        # RFC 8463: ed25519-sha256 signs the SHA-256 digest itself (PureEdDSA over 32 bytes).
        return self.key.sign(digest)


@dataclass(frozen=True, slots=True)
class DkimSigner:
    """The keys of one tenant, built once by :func:`load_signer` and reused for every mail.

    Parameters:
      keys: signing keys used now; each adds one DKIM-Signature.
      next_keys: the keys used instead from ``next_from`` (Unix time) on.
    """

    keys: tuple[SigningKey, ...]
    next_keys: tuple[SigningKey, ...] = ()
    next_from: float | None = None

    def keys_at(self, now: float) -> tuple[SigningKey, ...]:
        """The keys that sign a mail sent at ``now``."""
        if self.next_keys and self.next_from is not None and now >= self.next_from:
            return self.next_keys
        return self.keys


def load_private_key(data: bytes) -> PrivateKey:
    """Parse a DKIM private key: PEM (PKCS#1 or PKCS#8, RSA or Ed25519) or dknewkey's base64 Ed25519 seed.

    Raises:
      ConfigurationError: the key is unreadable, encrypted, of another type or RSA below 1024 bits.
    """
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = ed25519.Ed25519PrivateKey.from_private_bytes(base64.b64decode(data.strip(), validate=True))
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigurationError(f"DKIM private key is not a readable RSA or Ed25519 key: {e}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigurationError(f"DKIM RSA key has {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ConfigurationError(f"DKIM private key is a {type(key).__name__}; only RSA and Ed25519 sign DKIM")


def read_private_key(private_key: SecretStr | None, private_key_file: Path | None) -> bytes:
    """The key material as configured: inline, or read from ``private_key_file``."""
    if private_key is not None:
        return private_key.get_secret_value().encode()
    if private_key_file is None:
        raise ConfigurationError("DKIM key has neither private_key nor private_key_file")
    try:
        return private_key_file.read_bytes()
    except OSError as e:
        raise ConfigurationError(f"cannot read DKIM key file {private_key_file}: {e.strerror}") from None


def load_key(domain: str, selector: str, data: bytes) -> SigningKey:
    """Parse ``data`` with :func:`load_private_key` into a key for ``selector._domainkey.domain``."""
    return SigningKey(domain.encode("ascii"), selector.encode("ascii"), load_private_key(data))


def load_signer(config: Dkim) -> DkimSigner:
    """Build a tenant's signer: main key, ``extra`` keys and, when set, the ``next`` key's switch-over.

    Raises:
      ConfigurationError: a key file is unreadable or a key invalid.
    """
    main = _load_configured(config.domain, config)
    extra = tuple(_load_configured(config.domain, k) for k in config.extra)
    if config.next is None or config.next.active_from is None:
        return DkimSigner((main, *extra))
    successor = _load_configured(config.domain, config.next)
    return DkimSigner((main, *extra), (successor, *extra), config.next.active_from.timestamp())


def _load_configured(domain: str, ref: Dkim | DkimKey) -> SigningKey:
    return load_key(domain, ref.selector, read_private_key(ref.private_key, ref.private_key_file))


def sign_message(message: bytes, signer: DkimSigner, *, now: float | None = None) -> bytes:
    """Return ``message`` with one DKIM-Signature header per key prepended: the bytes to send.

    Parameters:
      message: the composed message, CRLF line ends, 7-bit safe.
      signer: from :func:`load_signer`.
      now: Unix time for ``t=`` and for choosing the keys; the current time when omitted.

    Raises:
      DkimFailed: the message cannot be signed, e.g. it has no From.
    """
    if now is None:
        now = time.time()
    end = message.find(b"\r\n\r\n")
    head, body = (message[: end + 4], message[end + 4 :]) if end >= 0 else (message, b"")
    canonical = relaxed_headers(head)
    include = signed_header_names(canonical)
    if b"from" not in include:
        raise DkimFailed("cannot DKIM-sign a message without a From header")
    bodyhash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
    timestamp = str(int(now)).encode("ascii")
    signatures = [
        _signature_header(key, canonical, include, bodyhash, timestamp) for key in signer.keys_at(now)
    ]
    return b"".join(signatures) + message


def relaxed_body(body: bytes) -> bytes:
    """The relaxed body canonicalization (RFC 6376 3.4.4), byte for byte as dkimpy computes it.

    dkimpy runs its regular expressions over every body; these run only when the
    body has something to change, which base64 and quoted-printable rarely do.
    Without tabs, all there is to change lies before the last space, so the
    base64 of attachments at the end is not searched through.
    """
    if b"\t" in body:
        body = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(b"\r\n", body))
    else:
        if body.find(b" \r\n", 0, body.rfind(b" ") + 3) >= 0:
            body = _TRAILING_WSP.sub(b"\r\n", body)
        if body.find(b"  ", 0, body.rfind(b" ") + 2) >= 0:
            body = _WSP_RUN.sub(b" ", body)
    end = len(body)
    while body.endswith(b"\r\n", 0, end):
        end -= 2
    if end == len(body):
        return body + b"\r\n" if body else b""
    return body[: end + 2] if end else b""


def relaxed_headers(head: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of ``head`` in relaxed canonical form (RFC 6376 3.4.2), as dkimpy's
    ``rfc822_parse`` and ``canonicalize_headers`` give them.

    A header block with only CRLF line ends, no VT or FF and plain field names is done
    here in one pass; any other goes through dkimpy itself.

    Raises:
      DkimFailed: a line is no header field.
    """
    fields = _plain_fields(head)
    if fields is not None:
        return [(name.lower(), b" ".join(b" ".join(value).split()) + b"\r\n") for name, value in fields]
    try:
        return dkimpy_relaxed_headers(head)
    except dkim.MessageFormatError as e:
        raise DkimFailed(f"cannot DKIM-sign: {e}") from None


def _plain_fields(head: bytes) -> list[tuple[bytes, list[bytes]]] | None:
    """Each field's name and its lines, or ``None`` when dkimpy's parser must decide."""
    crlf = head.count(b"\r\n")
    if head.count(b"\r") != crlf or head.count(b"\n") != crlf or b"\x0b" in head or b"\x0c" in head:
        return None
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in head.split(b"\r\n"):
        if not line:
            break
        if line[0] in (0x09, 0x20):
            if not fields:
                return None
            fields[-1][1].append(line)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name):
            return None
        fields.append((name, [value]))
    return fields


def signed_header_names(headers: Sequence[Sequence[bytes]]) -> tuple[bytes, ...]:
    """The ``h=`` list for parsed ``headers``, as dkimpy's ``default_sign_headers`` orders it."""
    present = [name.lower() for name, _ in headers if name.lower() in SIGNED_HEADERS]
    return (*present, *(name for name in present if name in OVERSIGNED_HEADERS))


def _signature_header(
    key: SigningKey,
    canonical_headers: list[tuple[bytes, bytes]],
    include: tuple[bytes, ...],
    bodyhash: bytes,
    timestamp: bytes,
) -> bytes:
    # Mirrors dkimpy's DKIM.sign + DomainSigner.gen_header; keep tag order and folding identical.
    fields = [
        (b"v", b"1"),
        (b"a", key.algorithm),
        (b"c", b"relaxed/relaxed"),
        (b"d", key.domain),
        (b"i", b"@" + key.domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector),
        (b"t", timestamp),
        (b"h", b" : ".join(include)),
        (b"bh", bodyhash),
        # dkimpy's placeholder forces b= onto its own line, so folding after signing keeps the rest.
        (b"b", b"0" * 60),
    ]
    value = fold_dkim_header(b"; ".join(b"=".join(f) for f in fields), _NAMELEN)
    value = blank_dkim_b_tag(value)
    hasher = hashlib.sha256()
    sigheader = (_HEADER_NAME, b" " + value)
    hash_dkim_headers(hasher, canonical_headers, include, sigheader)
    fields[-1] = (b"b", base64.b64encode(key.sign_digest(hasher.digest())))
    value = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
    return _HEADER_NAME + b": " + fold_dkim_header(value, _NAMELEN)


__all__ = [
    "OVERSIGNED_HEADERS",
    "SIGNED_HEADERS",
    "DkimSigner",
    "PrivateKey",
    "SigningKey",
    "load_key",
    "load_private_key",
    "load_signer",
    "read_private_key",
    "sign_message",
    "signed_header_names",
]
