"""Seals on the options a worker puts on a message, so publishers cannot forge them.

Anything with publish rights on the vhost writes to postbote's queues, and a dramatiq
message carries its own options: the attempt counts, the ``eta`` of a delayed retry, an
outcome waiting to be recorded, the publisher. Only workers may set them. Each message a
worker enqueues (a retry, a deferral, dramatiq moving a due message out of a ``.DQ``
queue) is sealed with an HMAC-SHA256 under a key only workers hold: it lives in
PostgreSQL (``worker_keys``), which publishers do not reach. The worker's consumer
verifies the seal of every message that has options and processes a message whose seal
does not verify as if it had none (see ``worker.runtime.broker``).

The seal covers the message id, its timestamp, its options (all but the seal) and its
arguments, so it cannot be moved to another job or kept with options changed. Messages
a publisher sends have no options and cost no verification.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware, MiddlewareError

from worker.db import connect, translated_errors

logger = logging.getLogger(__name__)

SEAL = "seal"
"""Message option: the seal over the message's other options (hex HMAC-SHA256)."""

KEY_NAME = "message_seal"
"""The row of ``worker_keys`` holding the sealing key."""

_CONTEXT = b"postbote message seal v1\0"


def load_seal_key(database_url: str, name: str = KEY_NAME) -> bytes:
    """The installation's sealing key (row ``name`` of ``worker_keys``), created on first use.

    Concurrent workers agree on one key: each offers a fresh random key, the first insert
    wins, and all read back the row that won.

    Raises:
      DatabaseUnavailable: the database cannot be reached.
    """
    with connect(database_url, autocommit=True) as conn, translated_errors():
        conn.execute(
            "INSERT INTO worker_keys (name, key) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (name, secrets.token_bytes(32)),
        )
        row = conn.execute("SELECT key FROM worker_keys WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return bytes(row["key"])


class Sealer:
    """Seals and verifies the options of messages with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a sealing key has at least 16 bytes")
        self._key = key

    def seal(self, message: dramatiq.Message[Any]) -> str:
        """The seal of ``message`` as it is now (its own ``seal`` option left out)."""
        return self._mac(
            message.message_id,
            message.message_timestamp,
            {k: v for k, v in message.options.items() if k != SEAL},
            message.args,
            message.kwargs,
        )

    def verify(
        self,
        message_id: str,
        message_timestamp: Any,
        options: dict[str, Any],
        args: Any,
        kwargs: Any,
    ) -> bool:
        """Whether ``options`` carry a seal this key made over exactly these fields."""
        seal = options.get(SEAL)
        if not isinstance(seal, str):
            return False
        try:
            expected = self._mac(
                message_id, message_timestamp, {k: v for k, v in options.items() if k != SEAL}, args, kwargs
            )
        except (TypeError, ValueError, RecursionError):
            return False
        return hmac.compare_digest(seal, expected)

    def _mac(self, message_id: str, timestamp: Any, options: dict[str, Any], args: Any, kwargs: Any) -> str:
        # The arguments are digested on their own: the options' JSON stays small to compare.
        arguments = hashlib.sha256(_canonical([args, kwargs])).digest()
        mac = hmac.new(self._key, _CONTEXT, hashlib.sha256)
        mac.update(_canonical([message_id, timestamp, options]))
        mac.update(arguments)
        return mac.hexdigest()


def _canonical(value: Any) -> bytes:
    """One byte string per JSON value, whatever the key order: tuples and lists alike, as they
    come back from the wire."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class SealOptions(Middleware):
    """Seals every message its broker enqueues.

    ``RabbitmqBroker.enqueue`` calls ``before_enqueue`` after it has set a delayed message's
    ``eta`` and ``.DQ`` queue, and before it encodes the message; this middleware must come
    after any other that changes options there.
    """

    def __init__(self, sealer: Sealer) -> None:
        self.sealer = sealer

    def before_enqueue(
        self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None
    ) -> None:
        try:
            message.options[SEAL] = self.sealer.seal(message)
        except (TypeError, ValueError, RecursionError) as e:
            # dramatiq logs and ignores other errors of a middleware; an unsealed retry would
            # lose its options (and an outcome waiting to be recorded) on its next delivery.
            raise SealingFailed(f"cannot seal message {message.message_id}: {e}") from e


class SealingFailed(MiddlewareError):
    """A message could not be sealed, so it is not enqueued."""


__all__ = ["KEY_NAME", "SEAL", "SealOptions", "Sealer", "SealingFailed", "load_seal_key"]
