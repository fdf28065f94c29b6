"""Tenant settings from PostgreSQL, cached briefly so edits apply without a restart."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from cachetools import TTLCache

from schemas.job import DocumentType
from schemas.tenant import Dkim, Smtp
from worker.db import Connection, translated_errors
from worker.errors import UnknownTenant
from worker.job.addresses import address_key

_SENDER_SETTING = {
    DocumentType.OFFER: "offer",
    DocumentType.ORDER: "order",
    DocumentType.INVOICE: "invoice",
    DocumentType.DUNNING: "invoice",
    DocumentType.RECEIPT: "receipt",
}


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

    def sender_for(self, doc_type: DocumentType) -> str | None:
        """The configured sender address for a document type (dunning uses the invoice sender)."""
        setting = _SENDER_SETTING.get(doc_type)
        return self.senders.get(setting) if setting else None


def load_account(conn: Connection, tenant_id: str) -> Account:
    """Read one tenant with employees and grants; ``UnknownTenant`` if there is none."""
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
    return Account(
        id=tenant_id,
        smtp=Smtp.model_validate(row["smtp"]),
        batch_size=int(row["batch_size"]),
        pause_ms=int(row["pause_ms"]),
        archive_bcc=_opt(row["archive_bcc"]),
        senders=senders,
        use_user_mail_data=bool(row["use_user_mail_data"]),
        cc_clerk=bool(row["cc_clerk"]),
        publishers=frozenset(row["publishers"]) if row["publishers"] is not None else None,
        dkim=Dkim.model_validate(row["dkim"]) if row["dkim"] else None,
        employees=employees,
    )


class AccountCache:
    """Accounts by tenant id, each kept for ``ttl_ms`` (the documented settings cache time).

    Safe to share between threads. Two threads missing the same tenant at once both read
    it; the later read is kept.
    """

    def __init__(self, connection: Callable[[], AbstractContextManager[Connection]], *, ttl_ms: int) -> None:
        self._connection = connection
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
            account = load_account(conn, tenant_id)
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


__all__ = ["Account", "AccountCache", "Employee", "load_account"]
