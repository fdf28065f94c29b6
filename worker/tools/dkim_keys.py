"""DKIM keys: generate a key pair, write it safely, publish it in DNS, check what DNS publishes."""

from __future__ import annotations

import base64
import binascii
import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import dns.exception
import dns.resolver
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from schemas.tenant import Dkim, DkimKey
from worker.job.signature import PrivateKey, load_private_key, read_private_key

Algorithm = Literal["rsa", "ed25519"]
DEFAULT_RSA_BITS = 2048
RSA_BITS_RANGE = (1024, 4096)
_DER = serialization.Encoding.DER
TXT_STRING_MAX = 255
"""A DNS character-string holds at most 255 bytes; longer TXT values are split into several."""


def generate_private_key(algorithm: Algorithm = "rsa", bits: int = DEFAULT_RSA_BITS) -> PrivateKey:
    """A new private key: RSA with ``bits`` bits (1024-4096), or Ed25519 (``bits`` ignored).

    Raises:
      ValueError: ``bits`` out of range for RSA.
    """
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    low, high = RSA_BITS_RANGE
    if not low <= bits <= high:
        raise ValueError(f"RSA key size must be between {low} and {high} bits, not {bits}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_key_pem(key: PrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM, readable by postbote, dkimpy, OpenDKIM and rspamd."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private_key(path: Path, pem: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``pem`` to it.

    Raises:
      FileExistsError: ``path`` exists; an existing key is never overwritten.
    """
    # O_EXCL: the key file is created here or not at all; 0o600 applies from the first byte on.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def key_file_name(domain: str, selector: str) -> str:
    """The file name ``keygen`` writes: ``SELECTOR.DOMAIN.private.pem``."""
    return f"{selector}.{domain}.private.pem"


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """The TXT record that publishes a DKIM public key."""

    name: str
    value: str

    @property
    def strings(self) -> list[str]:
        """``value`` split into character-strings of at most 255 bytes."""
        return [self.value[i : i + TXT_STRING_MAX] for i in range(0, len(self.value), TXT_STRING_MAX)]

    def zone_line(self, ttl: int = 3600) -> str:
        """The record as a zone-file line, each string quoted."""
        quoted = " ".join(f'"{s}"' for s in self.strings)
        return f"{self.name}. {ttl} IN TXT ( {quoted} )"


def dns_record(domain: str, selector: str, key: PrivateKey) -> DnsRecord:
    """The record for ``selector._domainkey.domain`` publishing ``key``'s public half."""
    return DnsRecord(record_name(domain, selector), record_value(key))


def record_name(domain: str, selector: str) -> str:
    """``selector._domainkey.domain``."""
    return f"{selector}._domainkey.{domain}"


def record_value(key: PrivateKey) -> str:
    """``v=DKIM1; k=rsa|ed25519; p=...`` for ``key``'s public half."""
    kind, public = _public_key_data(key)
    return f"v=DKIM1; k={kind}; p={base64.b64encode(public).decode('ascii')}"


def _public_key_data(key: PrivateKey) -> tuple[str, bytes]:
    # RFC 6376: RSA as DER SubjectPublicKeyInfo; RFC 8463: Ed25519 as the raw 32 bytes.
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(_DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return "rsa", der
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519", raw


class Resolver(Protocol):
    """What :func:`check_key` needs of a resolver; ``dns.resolver.Resolver`` is one."""

    def resolve(self, qname: str, rdtype: str) -> Iterable[Any]:
        """Answer a query; each TXT answer has ``strings`` (a sequence of bytes)."""
        ...


class Status(enum.StrEnum):
    """How the published record compares with the configured key."""

    MATCH = "match"
    MISMATCH = "mismatch"
    NO_RECORD = "no_record"
    DNS_ERROR = "dns_error"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of checking one selector."""

    role: str
    name: str
    status: Status
    detail: str

    @property
    def ok(self) -> bool:
        """True when DNS publishes exactly the configured key."""
        return self.status is Status.MATCH


def check_key(
    domain: str, selector: str, key: PrivateKey, resolver: Resolver | None = None, role: str = "main"
) -> CheckResult:
    """Look ``selector._domainkey.domain`` up and compare its public key with ``key``.

    Parameters:
      resolver: where to look; the system's resolver (``/etc/resolv.conf``) when omitted.
      role: which of the tenant's keys this is (``main``, ``extra``, ``next``), for the report.
    """
    name = record_name(domain, selector)

    def result(status: Status, detail: str) -> CheckResult:
        return CheckResult(role, name, status, detail)

    try:
        answer = (resolver or _system_resolver()).resolve(name, "TXT")
        records = [b"".join(rdata.strings) for rdata in answer]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return result(Status.NO_RECORD, f"no TXT record at {name}; publish the one keygen printed")
    except dns.exception.DNSException as e:
        return result(Status.DNS_ERROR, f"DNS lookup of {name} failed: {e}")
    dkim_records = [r for r in records if b"p=" in r]
    if not dkim_records:
        return result(Status.NO_RECORD, f"TXT record at {name} holds no DKIM key (no p= tag)")
    if len(dkim_records) > 1:
        return result(Status.MISMATCH, f"{len(dkim_records)} DKIM records at {name}; keep exactly one")
    try:
        kind, published = _published_key(dkim_records[0])
    except ValueError as e:
        return result(Status.MISMATCH, f"record at {name} is not a valid DKIM key record: {e}")
    expected_kind, expected = _public_key_data(key)
    if kind != expected_kind:
        return result(Status.MISMATCH, f"DNS publishes a k={kind} key, the configured key is {expected_kind}")
    if published != expected:
        return result(Status.MISMATCH, "DNS publishes another public key than the configured one")
    return result(Status.MATCH, f"DNS publishes the configured {kind} key")


def _published_key(record: bytes) -> tuple[str, bytes]:
    """``(k, public key bytes)`` of a DKIM TXT record, RSA normalised to DER SubjectPublicKeyInfo."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList as e:
        raise ValueError(str(e)) from None
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise ValueError("v= is not DKIM1")
    kind = tags.get(b"k", b"rsa").decode("ascii", "replace")
    p = b"".join(tags.get(b"p", b"").split())
    if not p:
        raise ValueError("p= is empty: the key is revoked")
    try:
        data = base64.b64decode(p, validate=True)
    except binascii.Error as e:
        raise ValueError(f"p= is not base64: {e}") from None
    if kind == "rsa":
        try:
            public = serialization.load_der_public_key(data)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise ValueError(f"p= is not an RSA public key: {e}") from None
        if not isinstance(public, rsa.RSAPublicKey):
            raise ValueError("k=rsa but p= holds another key type")
        data = public.public_bytes(_DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return kind, data


def _system_resolver() -> Resolver:
    return dns.resolver.Resolver()


def check_dkim(config: Dkim, resolver: Resolver | None = None) -> list[CheckResult]:
    """Check every configured key of a tenant (main, extra, next) against DNS; see :func:`check_key`.

    Raises:
      ConfigurationError: a configured private key is unreadable.
    """
    refs: list[tuple[str, Dkim | DkimKey]] = [("main", config), *(("extra", k) for k in config.extra)]
    if config.next is not None:
        refs.append(("next", config.next))
    return [
        check_key(
            config.domain,
            ref.selector,
            load_private_key(read_private_key(ref.private_key, ref.private_key_file)),
            resolver,
            role,
        )
        for role, ref in refs
    ]


__all__ = [
    "DEFAULT_RSA_BITS",
    "CheckResult",
    "DnsRecord",
    "Resolver",
    "Status",
    "check_dkim",
    "check_key",
    "dns_record",
    "generate_private_key",
    "key_file_name",
    "private_key_pem",
    "record_name",
    "record_value",
    "write_private_key",
]
