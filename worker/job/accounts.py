"""Tenant settings from PostgreSQL, cached briefly so edits apply without a restart."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache
from pydantic import ValidationError

from schemas.job import DocumentType
from schemas.tenant import Dkim, Smtp
from worker.db import Connection, translated_errors
from worker.errors import ConfigurationError, UnknownTenant
from worker.job.addresses import address_key
from worker.runtime.secret_files import ReferenceRefused, confine_files
from worker.runtime.secrets_box import KeyRing, load_key_ring, unseal_secrets
from worker.settings import Settings

_SENDER_SETTING = {
    DocumentType.OFFER: "offer",
    DocumentType.ORDER: "order",
    DocumentType.INVOICE: "invoice",
    DocumentType.DUNNING: "invoice",
    DocumentType.RECEIPT: "receipt",
}


@dataclass(frozen=True)
class SecretAccess:
    """What a worker host may open of a tenant's settings: sealed secrets with ``ring``, files in
    ``secrets_dir`` (see :mod:`worker.runtime.secret_files`)."""

    ring: KeyRing | None = None
    secrets_dir: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretAccess:
        """The host's key ring and secrets directory.

        Raises:
          ConfigurationError: the key file is set but unreadable or holds no key.
        """
        return cls(load_key_ring(settings.secrets_key_file), settings.secrets_dir)

    def open(self, data: Any, *, tenant: str, column: str) -> Any:
        """A stored settings column of ``tenant`` (JSON data) with its secrets unsealed and its
        ``*_file`` paths confined to the tenant's secrets directory, ready for the models.

        Raises:
          ConfigurationError: a secret does not open, or a path lies outside the directory.
        """
        if data is None:
            return None
        try:
            return confine_files(
                unseal_secrets(data, self.ring, tenant=tenant),
                tenant=tenant,
                secrets_dir=self.secrets_dir,
                where=column,
            )
        except ReferenceRefused as e:
            raise ConfigurationError(f"tenant {tenant!r}: {e}") from None


@dataclass(frozen=True)
class Employee:
    id: str
    email: str
    name: str | None
    group_id: str | None
    signature_text: str | None
    signature_html: str | None
    granted: frozenset[str]
    """Address keys granted to the employee directly or through the group."""


@dataclass(frozen=True)
class Account:
    """One tenant: its SMTP account and the settings page's rules, as plain values."""

    id: str
    smtp: Smtp
    batch_size: int
    pause_ms: int
    archive_bcc: str | None
    senders: dict[str, str]
    use_user_mail_data: bool
    cc_clerk: bool
    dkim: Dkim | None
    employees: dict[str, Employee] = field(default_factory=dict)
    publishers: frozenset[str] | None = None
    """The RabbitMQ users that may publish for the tenant; ``None``: any."""
    verp_domain: str | None = None
    """``bounces.verp``: the envelope sender becomes ``bounce+<job>@<verp_domain>``."""
    dsn: bool = False
    """``bounces.dsn``: ask for delivery status notifications where the server offers DSN."""

    def sender_for(self, doc_type: DocumentType) -> str | None:
        """The configured sender address for a document type (dunning uses the invoice sender)."""
        setting = _SENDER_SETTING.get(doc_type)
        return self.senders.get(setting) if setting else None


def load_account(conn: Connection, tenant_id: str, access: SecretAccess) -> Account:
    """Read one tenant with employees and grants, its secrets opened with ``access``.

    Raises:
      UnknownTenant: there is none.
      ConfigurationError: its stored settings do not open or validate on this host.
    """
    with translated_errors():
        row = conn.execute("SELECT * FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
        if row is None:
            raise UnknownTenant(f"unknown tenant {tenant_id!r}")
        grants: dict[tuple[str, str], set[str]] = {}
        for g in conn.execute(
            "SELECT 'group' AS kind, group_id AS owner, address FROM group_senders WHERE tenant_id = %s"
            " UNION ALL "
            "SELECT 'employee', employee_id, address FROM employee_senders WHERE tenant_id = %s",
            (tenant_id, tenant_id),
        ):
            grants.setdefault((str(g["kind"]), str(g["owner"])), set()).add(address_key(str(g["address"])))
        employees = {}
        for e in conn.execute("SELECT * FROM employees WHERE tenant_id = %s", (tenant_id,)):
            own = grants.get(("employee", str(e["id"])), set())
            via_group = grants.get(("group", str(e["group_id"])), set()) if e["group_id"] else set()
            employees[str(e["id"])] = Employee(
                id=str(e["id"]),
                email=str(e["email"]),
                name=_opt(e["name"]),
                group_id=_opt(e["group_id"]),
                signature_text=_opt(e["signature_text"]),
                signature_html=_opt(e["signature_html"]),
                granted=frozenset(own | via_group),
            )
    senders = {
        kind: str(row[f"sender_{kind}"])
        for kind in ("offer", "order", "invoice", "receipt")
        if row[f"sender_{kind}"]
    }
    try:
        smtp = Smtp.model_validate(access.open(row["smtp"], tenant=tenant_id, column="smtp"))
        dkim = (
            Dkim.model_validate(access.open(row["dkim"], tenant=tenant_id, column="dkim"))
            if row["dkim"]
            else None
        )
    except ValidationError as e:
        # Locations and messages only: pydantic's full text would echo the input, secrets included.
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigurationError(
            f"tenant {tenant_id!r} has settings this version cannot use ({problems}); apply its tenant file anew"
        ) from None
    return Account(
        id=tenant_id,
        smtp=smtp,
        batch_size=int(row["batch_size"]),
        pause_ms=int(row["pause_ms"]),
        archive_bcc=_opt(row["archive_bcc"]),
        senders=senders,
        use_user_mail_data=bool(row["use_user_mail_data"]),
        cc_clerk=bool(row["cc_clerk"]),
        publishers=frozenset(row["publishers"]) if row["publishers"] is not None else None,
        dkim=dkim,
        employees=employees,
        verp_domain=(row["bounces"] or {}).get("verp"),
        dsn=bool((row["bounces"] or {}).get("dsn")),
    )


class AccountCache:
    """Accounts by tenant id, each kept for ``ttl_ms`` (the documented settings cache time).

    Safe to share between threads. Two threads missing the same tenant at once both read
    it; the later read is kept.
    """

    def __init__(
        self,
        connection: Callable[[], AbstractContextManager[Connection]],
        *,
        ttl_ms: int,
        access: SecretAccess | None = None,
    ) -> None:
        self._connection = connection
        self._access = access or SecretAccess()
        self._lock = threading.Lock()  # a TTLCache is not thread-safe; even a read reorders it
        # No size bound, as many tenants as the worker serves: each insert drops the expired ones.
        self._accounts: TTLCache[str, Account] = TTLCache(maxsize=math.inf, ttl=ttl_ms / 1000)
        self._known: set[str] = set()

    def get(self, tenant_id: str) -> Account:
        """The tenant's account, read again once ``ttl_ms`` have passed since it was last read.

        Raises:
          UnknownTenant: no such tenant.
          DatabaseUnavailable: the database cannot be reached.
        """
        try:
            with self._lock:
                return self._accounts[tenant_id]
        except KeyError:
            pass
        with self._connection() as conn:
            account = load_account(conn, tenant_id, self._access)
        with self._lock:
            self._accounts[tenant_id] = account
            self._known.add(tenant_id)
        return account

    def known(self, tenant_id: str) -> bool:
        """Whether this process has loaded the tenant: a job's ``tenant`` is a metric label only
        then, so publishers cannot create series at will."""
        return tenant_id in self._known


def _opt(value: object) -> str | None:
    return None if value is None else str(value)


__all__ = ["Account", "AccountCache", "Employee", "SecretAccess", "load_account"]
