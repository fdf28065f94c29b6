"""The RFC 3463 class of a bounce, and how long it keeps the address on the suppression list.

``delayed`` is no bounce: the mail is still on its way, the recipient stays ``accepted``.
"""

from __future__ import annotations

from enum import StrEnum

_DAY_MS = 24 * 3600 * 1000


class BounceClass(StrEnum):
    INVALID_RECIPIENT = "invalid_recipient"
    """x.1.x: no such mailbox, bad address syntax, bad destination system."""
    MAILBOX_FULL = "mailbox_full"
    """x.2.2."""
    POLICY = "policy"
    """x.7.x: refused as spam, by policy or for authentication (SPF, DKIM, DMARC)."""
    ROUTING = "routing"
    """x.4.x: DNS or routing trouble."""
    OTHER = "other"
    DELAYED = "delayed"
    """``Action: delayed``: not a bounce."""


def classify(action: str, status: str | None) -> BounceClass:
    """The class of a report on one recipient (``action`` ``failed`` or ``delayed``)."""
    if action == "delayed":
        return BounceClass.DELAYED
    parts = (status or "").split(".")
    subject, detail = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
    if subject == "1":
        return BounceClass.INVALID_RECIPIENT
    if (subject, detail) == ("2", "2"):
        return BounceClass.MAILBOX_FULL
    if subject == "7":
        return BounceClass.POLICY
    if subject == "4":
        return BounceClass.ROUTING
    return BounceClass.OTHER


SUPPRESSED_FOR_MS: dict[BounceClass, int | None] = {
    BounceClass.INVALID_RECIPIENT: None,
    BounceClass.MAILBOX_FULL: 7 * _DAY_MS,
    BounceClass.ROUTING: 3 * _DAY_MS,
    BounceClass.OTHER: 1 * _DAY_MS,
}
"""How long a hard bounce of each class suppresses the address (``None``: until removed). A
policy refusal says nothing about the address, only about the sender, so it suppresses nothing."""


def suppression_of(bounce_class: BounceClass) -> tuple[bool, int | None]:
    """Whether a bounce of this class suppresses the address, and for how many milliseconds."""
    if bounce_class not in SUPPRESSED_FOR_MS:
        return False, None
    return True, SUPPRESSED_FOR_MS[bounce_class]


__all__ = ["SUPPRESSED_FOR_MS", "BounceClass", "classify", "suppression_of"]
