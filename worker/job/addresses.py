"""E-mail address comparison and wire forms."""

from __future__ import annotations

import idna


def address_key(address: str) -> str:
    """Comparison key: the local part exact, the domain case-insensitive (as mail systems compare)."""
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def same_address(a: str, b: str) -> bool:
    return address_key(a) == address_key(b)


def ascii_address(address: str) -> str:
    """The address with its domain in punycode (IDNA 2008); the local part is left as it is."""
    local, _, domain = address.rpartition("@")
    if domain.isascii():
        return address
    return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"


def needs_smtputf8(address: str) -> bool:
    """True when the local part is not ASCII, so only an SMTPUTF8 server can take it."""
    return not address.rpartition("@")[0].isascii()


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


__all__ = ["address_key", "ascii_address", "domain_of", "needs_smtputf8", "same_address"]
