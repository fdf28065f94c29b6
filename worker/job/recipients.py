"""Who gets a job's mail, and in which role: the job's own recipients, the clerk and the archive.

The job's ``to``, ``cc`` and ``bcc`` are customer-facing: they decide the job's
outcome. The clerk (``cc_clerk``) and the archive (``archive_bcc``) get internal
copies, which only ever travel with a customer-facing recipient.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.job import Job
from worker.job.accounts import Account
from worker.job.addresses import address_key, ascii_address
from worker.job.senders import employee
from worker.vocabulary import Role


@dataclass(frozen=True)
class Recipient:
    address: str
    """As it goes into the envelope (domain in punycode)."""
    role: Role


@dataclass(frozen=True)
class Recipients:
    cc: tuple[str, ...]
    """The Cc header: the job's own, with the clerk added where the rule asks."""
    envelope: tuple[Recipient, ...]
    """Each address once, customer-facing first; an address in two roles keeps the first."""


def customer_recipients(job: Job) -> Recipients:
    """The job's own recipients only."""
    return _recipients(job, list(job.cc), [])


def recipients_for(job: Job, account: Account) -> Recipients:
    """The job's recipients with the tenant's internal copies.

    The clerk becomes CC when ``cc_clerk`` is set and someone else sends the
    document. The archive address goes only into the envelope, never into a header.
    """
    cc = list(job.cc)
    internal: list[Recipient] = []
    if account.cc_clerk and job.clerk_id and job.clerk_id != job.user_id:
        clerk = employee(account, job.clerk_id)
        present = {address_key(a) for a in (*job.to, *cc, *job.bcc)}
        if address_key(clerk.email) not in present:
            cc.append(clerk.email)
            internal.append(Recipient(clerk.email, Role.CLERK))
    if account.archive_bcc:
        internal.append(Recipient(account.archive_bcc, Role.ARCHIVE))
    return _recipients(job, cc, internal)


def _recipients(job: Job, cc: list[str], internal: list[Recipient]) -> Recipients:
    wanted = [
        *(Recipient(a, Role.TO) for a in job.to),
        *(Recipient(a, Role.CC) for a in job.cc),
        *(Recipient(a, Role.BCC) for a in job.bcc),
        *internal,
    ]
    envelope: dict[str, Recipient] = {}
    for r in wanted:
        address = ascii_address(r.address)
        envelope.setdefault(address_key(address), Recipient(address, r.role))
    return Recipients(tuple(ascii_address(a) for a in cc), tuple(envelope.values()))


__all__ = ["Recipient", "Recipients", "customer_recipients", "recipients_for"]
