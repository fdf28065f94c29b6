"""One test mail through a tenant's SMTP account, sent at once (not through RabbitMQ).

The same stages as a job (compose, DKIM, SMTP), with the settings page's
advice for the sender: the SMTP user by default. Only the given recipient
gets it; the archive address does not.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime

from pydantic import TypeAdapter, ValidationError

from schemas.fields import Address
from schemas.job import Job
from worker.errors import ConfigurationError, PostboteError, SenderNotPermitted
from worker.job.accounts import Account
from worker.job.addresses import address_key, same_address
from worker.job.compose import compose_message
from worker.job.recipients import customer_recipients
from worker.job.senders import Sender
from worker.job.signature import load_signer, sign_message
from worker.job.smtp import SmtpPool
from worker.job.smtp.oauth import TokenHelpers
from worker.tools.testmail_hints import failure_hints, success_notes

_ADDRESS: TypeAdapter[str] = TypeAdapter(Address)


@dataclass(frozen=True)
class Outcome:
    """What happened to the test mail, with hints that match a failure (or notes on success)."""

    tenant: str
    server: str
    security: str
    sender: str
    recipient: str
    smtp_user: str | None
    sent: bool
    message_id: str | None = None
    dkim: tuple[str, ...] = ()
    """One ``d=… s=…`` per DKIM-Signature the mail carries."""
    tls_version: str | None = None
    auth_method: str | None = None
    reply: str | None = None
    reason: str | None = None
    error: str | None = None
    hints: tuple[str, ...] = ()
    dsn: bool | None = None
    """Whether the server offers DSN, so ``bounces.dsn`` can ask for reports carrying the job id."""


def check_address(value: str) -> str:
    """``value`` as a normalised address; ``ValueError`` naming the problem otherwise."""
    try:
        return _ADDRESS.validate_python(value)
    except ValidationError as e:
        raise ValueError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def permitted_senders(account: Account) -> list[str]:
    """Addresses the tenant may send with: the SMTP user, every employee's own, every granted one."""
    found: dict[str, str] = {}
    user = account.smtp.user
    if user is not None and "@" in user:
        found[address_key(user)] = user
    for employee in account.employees.values():
        found.setdefault(address_key(employee.email), employee.email)
        for granted in sorted(employee.granted):
            found.setdefault(granted, granted)
    return list(found.values())


def default_sender(account: Account) -> str:
    """The SMTP user, the sender the settings page advises for a test mail.

    Raises:
      ConfigurationError: the tenant has no SMTP user, or it is not an e-mail address.
    """
    user = account.smtp.user
    if user is None:
        raise ConfigurationError(f"tenant {account.id!r} has no SMTP user to send as; give --from")
    try:
        return check_address(user)
    except ValueError:
        raise ConfigurationError(
            f"the SMTP user {user!r} of tenant {account.id!r} is not an e-mail address; give --from"
        ) from None


def check_sender(account: Account, sender: str) -> None:
    """Raise ``SenderNotPermitted`` unless the tenant may send as ``sender``.

    A test mail has no sending user, so the whole tenant counts: the SMTP user,
    an employee's own address, or an address granted to any employee directly or
    through a group.
    """
    permitted = permitted_senders(account)
    if not any(same_address(sender, a) for a in permitted):
        some = ", ".join(permitted[:10]) + (", …" if len(permitted) > 10 else "")
        raise SenderNotPermitted(
            f"tenant {account.id!r} may not send as {sender!r}: it is neither the SMTP user,"
            " nor an employee's address, nor granted to an employee or group"
            f" (permitted: {some or 'none'})",
            sender=sender,
        )


def send_test_mail(
    account: Account,
    *,
    sender: str,
    to: str,
    timeout_ms: int,
    now: datetime | None = None,
    token_helpers: TokenHelpers | None = None,
) -> Outcome:
    """Check the sender, compose, sign (when the tenant has DKIM) and send one test mail.

    Failures come back as an ``Outcome`` with the reason and matching hints; no
    ``PostboteError`` escapes.
    """
    smtp = account.smtp
    now = now or datetime.now(UTC)
    base = Outcome(
        tenant=account.id,
        server=f"{smtp.host}:{smtp.port}",
        security=smtp.security,
        sender=sender,
        recipient=to,
        smtp_user=smtp.user,
        sent=False,
    )
    try:
        check_sender(account, sender)
        job = _job(account, sender, to, now)
        message = compose_message(job, Sender(sender, None, None, None), customer_recipients(job), now=now)
        base = replace(base, message_id=message.message_id)
        if account.dkim is not None:
            signer = load_signer(account.dkim)
            signed_at = now.timestamp()
            message = replace(message, data=sign_message(message.data, signer, now=signed_at))
            keys = signer.keys_at(signed_at)
            base = replace(base, dkim=tuple(f"d={k.domain.decode()} s={k.selector.decode()}" for k in keys))
        pool = SmtpPool(timeout_ms=timeout_ms, token_helpers=token_helpers)
        try:
            delivery = pool.deliver(account.id, smtp, message)
        finally:
            pool.close()
        failure = delivery.failure()
        if failure is not None:
            raise failure
    except PostboteError as e:
        return replace(base, reason=e.reason, error=str(e), hints=failure_hints(e, account, sender=sender))
    return replace(
        base,
        sent=True,
        tls_version=delivery.tls_version,
        auth_method=delivery.auth_method,
        reply=str(delivery.reply),
        dsn=delivery.dsn,
        hints=success_notes(account, signed=bool(base.dkim)),
    )


def _job(account: Account, sender: str, to: str, now: datetime) -> Job:
    smtp = account.smtp
    text = (
        f"This is a test mail from postbote for tenant {account.id}.\n\n"
        f"It went from {sender} through {smtp.host}:{smtp.port} (security: {smtp.security})"
        f" at {now.isoformat(timespec='seconds')}.\n"
        "If you read it, the tenant's SMTP account works. Nothing else was sent.\n"
    )
    return Job.model_validate(
        {
            "tenant": account.id,
            "document": {"type": "other", "number": "test-mail"},
            "user_id": "test-mail",
            "to": [to],
            "subject": f"postbote test mail ({account.id})",
            "body": {"text": text},
        }
    )


__all__ = [
    "Outcome",
    "check_address",
    "check_sender",
    "default_sender",
    "permitted_senders",
    "send_test_mail",
]
