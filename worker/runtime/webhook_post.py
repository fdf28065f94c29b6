"""One webhook POST: the event as JSON, signed the Standard Webhooks way with the webhook's secret.

Used by the supervisor's sender (``worker.runtime.webhooks``) and by operators' resends
(``postbote events webhooks --resend``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook as Signer

from worker.errors import ConfigurationError
from worker.logs import printable
from worker.runtime.relay import OutboxEvent
from worker.runtime.secret_files import ReferenceRefused, confine
from worker.settings import Settings

_ERROR_BODY_BYTES = 200
_KEPT_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Target:
    """One configured webhook, as the tenant file gave it."""

    tenant_id: str
    url: str
    secret_file: Path
    events: list[str] | None


def targets_of(tenant_id: str, webhooks: list[dict[str, Any]]) -> dict[str, Target]:
    """The stored ``tenants.webhooks`` of a tenant, by URL."""
    return {
        str(w["url"]): Target(tenant_id, str(w["url"]), Path(w["secret_file"]), w.get("events"))
        for w in webhooks
    }


def open_client(settings: Settings) -> httpx.Client:
    """An HTTP client for webhook POSTs: ``webhook_timeout_ms`` to connect and to answer, no redirects."""
    return httpx.Client(
        timeout=httpx.Timeout(settings.webhook_timeout_ms / 1000),
        follow_redirects=False,
        headers={"user-agent": "postbote"},
    )


def target_signer(target: Target, secrets_dir: str | None) -> Signer:
    """The signer of ``target``'s ``secret_file``, which must lie in the tenant's secrets directory
    (checked again here: the file system may have changed since the tenant was applied).
    Raises ``ConfigurationError``."""
    try:
        path = confine(
            target.secret_file, field="webhooks.secret_file", tenant=target.tenant_id, secrets_dir=secrets_dir
        )
    except ReferenceRefused as e:
        raise ConfigurationError(f"tenant {target.tenant_id!r}: {e}") from None
    return read_signer(path)


def read_signer(path: Path) -> Signer:
    """The signer of a ``secret_file`` holding ``whsec_<base64>`` (at least 24 bytes); the secret
    never appears in an error. Raises ``ConfigurationError``."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(
            f"cannot read secret_file {path}: {getattr(e, 'strerror', None) or e}"
        ) from e
    problem = (
        f"secret_file {path} does not hold a Standard Webhooks secret (whsec_ and 24 to 64 bytes in base64)"
    )
    if not text.startswith("whsec_"):
        raise ConfigurationError(problem)
    encoded = text.removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(problem) from None
    if not 24 <= len(key) <= 64:
        raise ConfigurationError(problem)
    return Signer(key)


def event_document(row: dict[str, Any]) -> bytes:
    """An outbox row (``EVENT_COLUMNS``) as the event JSON, byte for byte what the relay publishes
    to ``<prefix>.events``. These bytes are what is signed and posted."""
    return OutboxEvent.from_row(row).encode()


def post_event(client: httpx.Client, url: str, signer: Signer, event_id: str, body: bytes) -> str | None:
    """POST one event with ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``.

    Returns ``None`` when the receiver answered 2xx, else what went wrong (without the secret).
    Redirects are not followed; an answer is read up to 64 KiB (so the connection can be kept), and
    200 bytes of an error answer are kept.
    """
    now = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        # As text: every version of the library signs a str as its UTF-8 bytes.
        "webhook-signature": signer.sign(event_id, now, body.decode()),
    }
    try:
        with client.stream("POST", url, content=body, headers=headers) as response:
            # A short answer read to its end keeps the connection for the next event.
            answer = _read_some(response, _KEPT_ANSWER_BYTES)
            if response.is_success:
                return None
    except httpx.TimeoutException as e:
        return f"no answer in time ({type(e).__name__})"
    except (httpx.HTTPError, OSError) as e:
        return f"{type(e).__name__}: {e}"[:300]
    text = " ".join(answer[:_ERROR_BODY_BYTES].decode("utf-8", "replace").split())
    return f"HTTP {response.status_code}" + (f": {text}" if text else "")


def _read_some(response: httpx.Response, limit: int) -> bytes:
    answer = b""
    for chunk in response.iter_bytes():
        answer += chunk
        if len(answer) >= limit:
            break
    return answer


def shown_url(url: str) -> str:
    """A URL for the log: without its query, which may carry a token."""
    return printable(url.split("?", 1)[0])


__all__ = [
    "Signer",
    "Target",
    "event_document",
    "open_client",
    "post_event",
    "read_signer",
    "target_signer",
    "shown_url",
    "targets_of",
]
