"""Sealing inline tenant secrets for the database: AES-256-GCM with a key ring kept outside it.

The key file (``POSTBOTE_SECRETS_KEY_FILE``) holds one key per line, url-safe base64 of 32
random bytes (``postbote secrets keygen``); ``#`` starts a comment. The first key seals, every
key unseals, so a rotation is: put a new key first on every host, ``postbote secrets rotate``,
then drop the old line.

A sealed value is stored as ``{"sealed": "v1.<key id>.<nonce and ciphertext>"}`` in place of the
plain string, so nothing can mistake one for a password. The tenant id and the field name are
the associated data: a sealed password copied into another tenant's row, or into another field,
does not open.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worker.errors import ConfigurationError

SECRET_FIELDS = frozenset({"password", "private_key"})
"""The tenant-file keys whose values are secrets: sealed wherever they occur in a tenant."""
SEALED = "sealed"
_VERSION = "v1"
_NONCE_BYTES = 12


class KeyRing:
    """The keys of a key file, read again when a sealed value names a key it does not hold."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keys: dict[str, AESGCM] = {}
        self._current = ""
        self.reload()

    @property
    def current_id(self) -> str:
        """The id of the key that seals."""
        return self._current

    def reload(self) -> None:
        """Read the key file again.

        Raises:
          ConfigurationError: the file is unreadable, empty, or a line is no key.
        """
        keys = read_key_file(self.path)
        with self._lock:
            self._keys = {key_id(k): AESGCM(k) for k in keys}
            self._current = key_id(keys[0])

    def seal(self, plaintext: str, *, tenant: str, field: str) -> dict[str, str]:
        """``plaintext`` sealed with the current key, bound to ``tenant`` and ``field``."""
        nonce = os.urandom(_NONCE_BYTES)
        with self._lock:
            kid, aead = self._current, self._keys[self._current]
        sealed = aead.encrypt(nonce, plaintext.encode("utf-8"), _context(tenant, field))
        token = base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
        return {SEALED: f"{_VERSION}.{kid}.{token}"}

    def unseal(self, value: dict[str, Any], *, tenant: str, field: str) -> str:
        """The plaintext of a sealed ``value`` of ``tenant``'s ``field``.

        Raises:
          ConfigurationError: the key is not in the key file, or the value does not open (another
            tenant's or field's, or altered).
        """
        version, kid, token = _parts(value, tenant, field)
        aead = self._key(kid)
        if aead is None:
            self.reload()
            aead = self._key(kid)
        if aead is None:
            raise ConfigurationError(
                f"tenant {tenant!r}: {field} is sealed with key {kid}, which is not in"
                f" {self.path}; add that key again, or apply the tenant file anew"
            )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            return aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _context(tenant, field)).decode(
                "utf-8"
            )
        except (InvalidTag, binascii.Error, ValueError, UnicodeDecodeError):
            raise ConfigurationError(
                f"tenant {tenant!r}: the sealed {field} does not open (altered, or another tenant's);"
                " apply the tenant file anew"
            ) from None

    def sealed_with(self, value: dict[str, Any]) -> str | None:
        """The key id a sealed value names (``None`` for anything else)."""
        sealed = value.get(SEALED)
        if not isinstance(sealed, str) or sealed.count(".") != 2:
            return None
        return sealed.split(".")[1]

    def _key(self, kid: str) -> AESGCM | None:
        with self._lock:
            return self._keys.get(kid)


def is_sealed(value: object) -> bool:
    """Whether a stored value is a sealed secret."""
    return isinstance(value, dict) and set(value) == {SEALED}


def generate_key() -> str:
    """A new key line: 32 random bytes, url-safe base64."""
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def key_id(key: bytes) -> str:
    """A short, public name of a key (not enough to guess it): the start of its SHA-256."""
    return hashlib.sha256(b"postbote secrets key\x00" + key).hexdigest()[:8]


def read_key_file(path: Path) -> list[bytes]:
    """The keys of a key file, the sealing key first.

    Raises:
      ConfigurationError: unreadable, no key, or a line that is no key (the line's number is
        named, never its content).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigurationError(f"cannot read POSTBOTE_SECRETS_KEY_FILE {path}: {reason}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = base64.urlsafe_b64decode(line + "=" * (-len(line) % 4))
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise ConfigurationError(
                f"POSTBOTE_SECRETS_KEY_FILE {path}, line {number}: not a key"
                " (32 bytes in url-safe base64, as 'postbote secrets keygen' prints)"
            )
        keys.append(key)
    if not keys:
        raise ConfigurationError(f"POSTBOTE_SECRETS_KEY_FILE {path} holds no key")
    return keys


def load_key_ring(path: Path | None) -> KeyRing | None:
    """The key ring of ``POSTBOTE_SECRETS_KEY_FILE``; ``None`` when none is configured."""
    return KeyRing(path) if path is not None else None


def seal_secrets(
    data: Any, ring: KeyRing | None, *, tenant: str, previous: Any = None, where: str = ""
) -> Any:
    """``data`` (a tenant's settings as JSON data) with every secret field sealed.

    A secret whose value in ``previous`` (the stored settings) unseals to the same plaintext keeps
    its stored sealed value, so applying an unchanged file changes nothing.

    Raises:
      ConfigurationError: a secret is given inline and no key ring is configured.
    """
    if isinstance(data, list):
        old = previous if isinstance(previous, list) else []
        return [
            seal_secrets(
                v, ring, tenant=tenant, previous=old[i] if i < len(old) else None, where=f"{where}[{i}]"
            )
            for i, v in enumerate(data)
        ]
    if not isinstance(data, dict):
        return data
    before = previous if isinstance(previous, dict) else {}
    sealed: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key in SECRET_FIELDS and isinstance(value, str):
            if ring is None:
                raise ConfigurationError(
                    f"{path}: an inline secret needs a sealing key; set POSTBOTE_SECRETS_KEY_FILE to a"
                    f" file made by 'postbote secrets keygen', or give {key}_file instead"
                )
            sealed[key] = _reuse(before.get(key), value, ring, tenant=tenant, field=key)
        else:
            sealed[key] = seal_secrets(value, ring, tenant=tenant, previous=before.get(key), where=path)
    return sealed


def unseal_secrets(data: Any, ring: KeyRing | None, *, tenant: str) -> Any:
    """``data`` as stored with every sealed secret opened (for the models that use it).

    A secret stored in plain text (written before sealing existed) is passed through;
    ``postbote secrets rotate`` seals it.

    Raises:
      ConfigurationError: a sealed secret and no key ring, or it does not open.
    """
    if isinstance(data, list):
        return [unseal_secrets(v, ring, tenant=tenant) for v in data]
    if not isinstance(data, dict):
        return data
    opened: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECRET_FIELDS and is_sealed(value):
            if ring is None:
                raise ConfigurationError(
                    f"tenant {tenant!r}: {key} is sealed and POSTBOTE_SECRETS_KEY_FILE is not set on this host"
                )
            opened[key] = ring.unseal(value, tenant=tenant, field=key)
        else:
            opened[key] = unseal_secrets(value, ring, tenant=tenant)
    return opened


def reseal_secrets(data: Any, ring: KeyRing, *, tenant: str) -> tuple[Any, int]:
    """``data`` with every secret not sealed with the current key sealed with it (plain ones
    too); returns the new data and how many secrets changed."""
    if isinstance(data, list):
        items = [reseal_secrets(v, ring, tenant=tenant) for v in data]
        return [v for v, _ in items], sum(n for _, n in items)
    if not isinstance(data, dict):
        return data, 0
    changed = 0
    result: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECRET_FIELDS and isinstance(value, str | dict):
            if isinstance(value, dict) and ring.sealed_with(value) == ring.current_id:
                result[key] = value
                continue
            plain = ring.unseal(value, tenant=tenant, field=key) if isinstance(value, dict) else value
            result[key] = ring.seal(plain, tenant=tenant, field=key)
            changed += 1
        else:
            result[key], n = reseal_secrets(value, ring, tenant=tenant)
            changed += n
    return result, changed


def plain_secrets(data: Any) -> int:
    """How many secrets ``data`` (as stored) holds in plain text."""
    if isinstance(data, list):
        return sum(plain_secrets(v) for v in data)
    if not isinstance(data, dict):
        return 0
    return sum(
        1 if key in SECRET_FIELDS and isinstance(value, str) else plain_secrets(value)
        for key, value in data.items()
    )


def _reuse(stored: Any, plaintext: str, ring: KeyRing, *, tenant: str, field: str) -> dict[str, str]:
    if is_sealed(stored) and ring.sealed_with(stored) == ring.current_id:
        try:
            if ring.unseal(stored, tenant=tenant, field=field) == plaintext:
                return dict(stored)
        except ConfigurationError:
            pass
    return ring.seal(plaintext, tenant=tenant, field=field)


def _parts(value: dict[str, Any], tenant: str, field: str) -> tuple[str, str, str]:
    sealed = value.get(SEALED)
    parts = sealed.split(".") if isinstance(sealed, str) else []
    if len(parts) != 3 or parts[0] != _VERSION:
        raise ConfigurationError(f"tenant {tenant!r}: the sealed {field} is not in a known format")
    return parts[0], parts[1], parts[2]


def _context(tenant: str, field: str) -> bytes:
    return f"postbote/{tenant}/{field}".encode()


__all__ = [
    "SECRET_FIELDS",
    "KeyRing",
    "generate_key",
    "is_sealed",
    "key_id",
    "load_key_ring",
    "plain_secrets",
    "read_key_file",
    "reseal_secrets",
    "seal_secrets",
    "unseal_secrets",
]
