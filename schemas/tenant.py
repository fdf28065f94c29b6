"""The tenant file: one SMTP account with the settings page's rules, its groups and employees."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, model_validator

from schemas.event import EventType
from schemas.fields import Address, HeaderText, Identifier


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


TokenHelper = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
"""The name of an operator-configured token command."""


class Smtp(_Model):
    host: Annotated[HeaderText, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)] = 587
    security: Literal["starttls", "ssl", "none"] = "starttls"
    user: HeaderText | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    auth: Literal["password", "xoauth2"] = "password"
    token_file: Path | None = None
    token_helper: TokenHelper | None = None
    """The name of a token command the operator configured (``POSTBOTE_TOKEN_HELPERS``)."""
    helo: Annotated[HeaderText, Field(min_length=1, max_length=253)] | None = None
    ca_file: Path | None = None
    max_connections: Annotated[int, Field(ge=1, le=20)] = 3
    max_messages_per_connection: Annotated[int, Field(ge=1)] = 100

    @model_validator(mode="before")
    @classmethod
    def _no_token_command(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token_command" in data:
            raise ValueError(
                "token_command is not a tenant-file key: the operator names token commands in"
                " POSTBOTE_TOKEN_HELPERS, and the tenant refers to one with token_helper"
            )
        return data

    @model_validator(mode="after")
    def _one_secret(self) -> Smtp:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if self.auth == "xoauth2":
            if self.user is None:
                raise ValueError("auth xoauth2 needs user")
            if (self.token_file is None) == (self.token_helper is None):
                raise ValueError("auth xoauth2 needs exactly one of token_file or token_helper")
        return self


class Series(_Model):
    batch_size: Annotated[int, Field(ge=1, le=100000)] = 50
    pause_ms: Annotated[int, Field(ge=0, le=3600000)] = 1000


class Senders(_Model):
    offer: Address | None = None
    order: Address | None = None
    invoice: Address | None = None
    receipt: Address | None = None


Selector = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=63)]


def _exactly_one_key(private_key: SecretStr | None, private_key_file: Path | None) -> None:
    if (private_key is None) == (private_key_file is None):
        raise ValueError("give exactly one of private_key or private_key_file")


class DkimKey(_Model):
    """A further key of the tenant's DKIM domain, published under its own selector.

    The algorithm (rsa-sha256 or ed25519-sha256) follows from the key itself.
    """

    selector: Selector
    private_key: SecretStr | None = None
    private_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_key(self) -> DkimKey:
        _exactly_one_key(self.private_key, self.private_key_file)
        return self


class DkimNextKey(DkimKey):
    """The key that replaces the main one in a rotation.

    Without ``active_from`` it is only staged: ``postbote dkim check`` checks its
    DNS record, mails are not signed with it. From ``active_from`` on it signs
    instead of the main key, on every worker at once.
    """

    active_from: AwareDatetime | None = None


class Dkim(_Model):
    """DKIM signing of the tenant's mails.

    ``selector`` and ``private_key``/``private_key_file`` are the main key;
    ``extra`` keys add further signatures (say ed25519 next to rsa);
    ``next`` stages the main key's successor for a rotation.
    """

    domain: Annotated[HeaderText, Field(min_length=1, max_length=253)]
    selector: Selector
    private_key: SecretStr | None = None
    private_key_file: Path | None = None
    extra: list[DkimKey] = []
    next: DkimNextKey | None = None

    @model_validator(mode="after")
    def _one_key(self) -> Dkim:
        _exactly_one_key(self.private_key, self.private_key_file)
        selectors = [self.selector, *(k.selector for k in self.extra)]
        if self.next is not None:
            selectors.append(self.next.selector)
        if len(set(selectors)) != len(selectors):
            raise ValueError("every DKIM key needs its own selector")
        return self


class Group(_Model):
    id: Identifier
    name: HeaderText | None = None
    senders: list[Address] = []


class Employee(_Model):
    id: Identifier
    email: Address
    name: HeaderText | None = None
    group: Identifier | None = None
    signature_text: str | None = None
    signature_html: str | None = None
    senders: list[Address] = []


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _webhook_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{value!r} is not a URL: {e}") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("must be an https:// URL with a host")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
        raise ValueError("must be https:// (http:// only for 127.0.0.1, localhost or [::1])")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user or password: the URL is shown by the CLI")
    if parts.fragment or port == 0:
        raise ValueError("must have no #fragment and no port 0")
    return value


WebhookUrl = Annotated[
    str,
    Field(min_length=8, max_length=2000, pattern=r"^https?://[^\x00-\x20\x7f]+$"),
    AfterValidator(_webhook_url),
]
"""Where a webhook is posted: ``https://``, or ``http://`` to the loopback host only."""


class Webhook(_Model):
    """A URL that receives the tenant's delivery events, signed the Standard Webhooks way.

    ``secret_file`` holds the signing secret as ``whsec_<base64>``; the worker reads it before
    each round of deliveries, so it must exist on every worker host. ``events`` limits the event
    types sent; absent, every event is.
    """

    url: WebhookUrl
    secret_file: Path
    events: Annotated[list[EventType], Field(min_length=1)] | None = None


class Imap(_Model):
    """The mailbox the tenant's bounces arrive in (with Microsoft 365 or Gmail: the sender's own).

    The login fields mean what they mean under ``smtp``. ``processed_folder``: where matched
    reports are moved to; absent, they stay and are marked read. Other mail is never touched.
    """

    host: Annotated[HeaderText, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)] = 993
    security: Literal["ssl", "starttls", "none"] = "ssl"
    user: HeaderText
    password: SecretStr | None = None
    password_file: Path | None = None
    auth: Literal["password", "xoauth2"] = "password"
    token_file: Path | None = None
    token_helper: TokenHelper | None = None
    ca_file: Path | None = None
    folder: Annotated[HeaderText, Field(min_length=1, max_length=255)] = "INBOX"
    processed_folder: Annotated[HeaderText, Field(min_length=1, max_length=255)] | None = None
    poll_ms: Annotated[int, Field(ge=1000, le=3600000)] = 60000
    """How often the worker looks when the server offers no IDLE."""

    @model_validator(mode="after")
    def _one_secret(self) -> Imap:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or password_file, not both")
        if self.auth == "xoauth2" and (self.token_file is None) == (self.token_helper is None):
            raise ValueError("auth xoauth2 needs exactly one of token_file or token_helper")
        return self


class Bounces(_Model):
    """Where bounces arrive, and what the SMTP transaction asks of the relay.

    ``verp``: the envelope sender becomes ``bounce+<job>@<domain>`` (only where the relay lets
    the tenant use its own return path; Microsoft 365 and Gmail do not). ``dsn``: where the server
    offers DSN, ask for ``RET=HDRS``, ``ENVID``, ``NOTIFY=FAILURE,DELAY`` and ``ORCPT``.
    """

    imap: Imap | None = None
    verp: Annotated[HeaderText, Field(pattern=r"^[A-Za-z0-9.-]+$", max_length=253)] | None = None
    """The domain of the VERP return path; absent: no VERP."""
    dsn: bool = False


class Suppression(_Model):
    """What happens to a job with a suppressed address, per document type: ``hold`` (default; the
    job waits as ``held`` with an event) or ``send``."""

    offer: Literal["hold", "send"] = "hold"
    order: Literal["hold", "send"] = "hold"
    invoice: Literal["hold", "send"] = "hold"
    dunning: Literal["hold", "send"] = "hold"
    receipt: Literal["hold", "send"] = "hold"
    other: Literal["hold", "send"] = "hold"


BrokerUser = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]
"""A RabbitMQ user name."""


class Tenant(_Model):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")]
    smtp: Smtp
    series: Series = Series()
    archive_bcc: Address | None = None
    senders: Senders = Senders()
    use_user_mail_data: bool = False
    cc_clerk: bool = False
    dkim: Dkim | None = None
    groups: list[Group] = []
    employees: list[Employee] = []
    publishers: Annotated[list[BrokerUser], Field(max_length=100)] | None = None
    """The RabbitMQ users allowed to publish jobs for this tenant (RabbitMQ checks a message's
    ``user_id`` property against the connection's user); a job from anyone else is dead-lettered
    as ``publisher_not_permitted``. Absent: any publisher."""
    webhooks: Annotated[list[Webhook], Field(max_length=20)] = []
    """URLs that receive the tenant's delivery events over HTTP, each in the order they were written."""
    bounces: Bounces = Bounces()
    suppression: Suppression = Suppression()

    @model_validator(mode="after")
    def _references(self) -> Tenant:
        groups = [g.id for g in self.groups]
        if len(set(groups)) != len(groups):
            raise ValueError("group ids must be unique")
        employees = [e.id for e in self.employees]
        if len(set(employees)) != len(employees):
            raise ValueError("employee ids must be unique")
        for e in self.employees:
            if e.group is not None and e.group not in groups:
                raise ValueError(f"employee {e.id!r} names group {e.group!r}, which is not defined")
        urls = [w.url for w in self.webhooks]
        if len(set(urls)) != len(urls):
            raise ValueError("webhook urls must be unique")
        return self


class TenantFile(_Model):
    tenants: list[Tenant]

    @model_validator(mode="after")
    def _unique(self) -> TenantFile:
        ids = [t.id for t in self.tenants]
        if len(set(ids)) != len(ids):
            raise ValueError("tenant ids must be unique")
        return self


__all__ = [
    "Bounces",
    "Dkim",
    "DkimKey",
    "DkimNextKey",
    "Employee",
    "Group",
    "Imap",
    "Senders",
    "Series",
    "Smtp",
    "Suppression",
    "Tenant",
    "TenantFile",
    "Webhook",
]
