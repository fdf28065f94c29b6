"""The settings page's sender rules: which From a user may send a document with, and who else gets it."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.job import Job
from worker.errors import SenderNotPermitted, UnknownUser
from worker.job.accounts import Account, Employee
from worker.job.addresses import address_key, same_address


@dataclass(frozen=True)
class Sender:
    address: str
    name: str | None
    signature_text: str | None
    signature_html: str | None
    """The signature to append, set only when the user's own address is used and the tenant says so."""


def resolve_sender(job: Job, account: Account) -> Sender:
    """Pick the From address: explicit ``from`` → the document type's sender → the user's own address.

    The user may always send with their own address; any other address only when
    granted to the user directly or through the user's group.

    Raises:
      UnknownUser: the job's user is not an employee of the tenant.
      SenderNotPermitted: the chosen address is not granted to the user.
    """
    user = employee(account, job.user_id)
    address = job.from_ or account.sender_for(job.document.type) or user.email
    own = same_address(address, user.email)
    if not own and address_key(address) not in user.granted:
        raise SenderNotPermitted(
            f"user {user.id!r} may not send as {address!r} in tenant {account.id!r}: "
            "the address is neither the user's own nor granted to the user or the user's group",
            sender=address,
        )
    use_signature = own and account.use_user_mail_data
    return Sender(
        address=address,
        name=user.name if own else None,
        signature_text=user.signature_text if use_signature else None,
        signature_html=user.signature_html if use_signature else None,
    )


def employee(account: Account, employee_id: str) -> Employee:
    try:
        return account.employees[employee_id]
    except KeyError:
        raise UnknownUser(f"unknown user {employee_id!r} in tenant {account.id!r}") from None


__all__ = ["Sender", "employee", "resolve_sender"]
