"""Load a tenant file (YAML or JSON) into PostgreSQL: one transaction, idempotent upsert.

A tenant file is one tenant administrator's input. Before anything is written, every tenant is
checked against the operator's :class:`TenantPolicy`: its ``*_file`` paths must lie in its
secrets directory, ``token_helper`` must name a configured helper, ``token_command`` is refused.
Inline secrets are sealed with the policy's key ring (:mod:`worker.runtime.secrets_box`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr

from schemas.tenant import Tenant, TenantFile
from worker.db import Connection, translated_errors
from worker.errors import ConfigurationError
from worker.job.breaker import reset_breaker
from worker.job.parking import release_parked
from worker.runtime.secret_files import refused_references
from worker.runtime.secrets_box import KeyRing, load_key_ring, seal_secrets
from worker.runtime.webhooks import track_webhooks
from worker.settings import Settings
from worker.vocabulary import Reason

_QUOTED = re.compile(r"'[^']{2,}'|\"[^\"]{2,}\"")


@dataclass(frozen=True)
class TenantPolicy:
    """What the operator allows a tenant file: the key ring that seals its inline secrets (none:
    inline secrets are refused), the secrets directory its files must lie in (none: files are
    refused) and the token helpers it may name."""

    ring: KeyRing | None = None
    secrets_dir: str | None = None
    token_helpers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> TenantPolicy:
        """The policy of ``POSTBOTE_SECRETS_KEY_FILE``, ``POSTBOTE_SECRETS_DIR`` and
        ``POSTBOTE_TOKEN_HELPERS``.

        Raises:
          ConfigurationError: the key file is set but unreadable or holds no key.
        """
        return cls(
            load_key_ring(settings.secrets_key_file), settings.secrets_dir, dict(settings.token_helpers)
        )


class TenantFileRefused(ValueError):
    """The tenant file asks for what the policy does not allow; nothing was applied."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class TenantChange:
    tenant: str
    action: str
    """``created``, ``updated`` or ``unchanged``."""
    details: list[str] = field(default_factory=list)


def read_tenant_file(path: Path) -> TenantFile:
    """Parse and validate a tenant file; raises ``ValueError`` or pydantic's ``ValidationError``."""
    text = path.read_text(encoding="utf-8")
    data: Any = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    return TenantFile.model_validate(data)


def parse_problem(error: yaml.YAMLError | json.JSONDecodeError) -> str:
    """Where and why a tenant file does not parse: line, column and problem, never the text
    there (which may be a password or a line of a PEM key)."""
    if isinstance(error, json.JSONDecodeError):
        return f"line {error.lineno}, column {error.colno}: {error.msg}"
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or "not valid YAML"
    # PyYAML quotes what it found in some problems (an alias name, a tag): names, not settings.
    problem = _QUOTED.sub("'…'", str(problem))
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def check_tenants(tenant_file: TenantFile, policy: TenantPolicy) -> list[str]:
    """What in the file the policy refuses, each problem naming the tenant and the field."""
    problems = []
    for tenant in tenant_file.tenants:
        for problem in refused_references(
            _reveal(tenant),
            tenant=tenant.id,
            secrets_dir=policy.secrets_dir,
            token_helpers=dict(policy.token_helpers),
        ):
            problems.append(f"tenant {tenant.id}: {problem}")
    return problems


def apply_tenants(
    conn: Connection, tenant_file: TenantFile, policy: TenantPolicy | None = None
) -> list[TenantChange]:
    """Upsert every tenant of the file with its groups, employees and grants in one transaction.

    Tenants not named in the file are left as they are. Groups, employees and
    grants of a named tenant are replaced by the file's. A tenant whose SMTP settings changed
    has its login breaker closed (:mod:`worker.job.breaker`), so its jobs held for a failing
    login go out when they come back, and ``release_parked`` is asked to release them now.

    Raises:
      TenantFileRefused: the policy (default: no key ring, no secrets directory, no token
        helpers) refuses a file reference or an inline secret; nothing is applied.
    """
    policy = policy or TenantPolicy()
    problems = check_tenants(tenant_file, policy)
    if problems:
        raise TenantFileRefused(problems)
    changes = []
    try:
        with translated_errors(), conn.transaction():
            for tenant in tenant_file.tenants:
                before = _snapshot(conn, tenant.id)
                _write(conn, tenant, policy, before["settings"] if before else {})
                after = _snapshot(conn, tenant.id)
                if (
                    before is not None
                    and after is not None
                    and before["settings"]["smtp"] != after["settings"]["smtp"]
                ):
                    reset_breaker(conn, tenant.id)
                    release_parked(conn, tenant=tenant.id, reason=Reason.LOGIN_FAILING)
                changes.append(_describe(tenant.id, before, after))
    except ConfigurationError as e:
        raise TenantFileRefused([str(e)]) from None
    return changes


def _reveal(model: BaseModel | None) -> dict[str, Any] | None:
    """The model as JSON data with secrets in clear (they are stored, never printed)."""
    if model is None:
        return None
    data: dict[str, Any] = _plain(model.model_dump(exclude_none=True))
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _sealed(
    model: BaseModel | None, policy: TenantPolicy, t: Tenant, stored: dict[str, Any], column: str
) -> str | None:
    """A settings column as stored: the model's JSON with its secrets sealed (``null`` for none)."""
    if model is None:
        return None
    sealed = seal_secrets(_reveal(model), policy.ring, tenant=t.id, previous=stored.get(column), where=column)
    return json.dumps(sealed)


def _write(conn: Connection, t: Tenant, policy: TenantPolicy, stored: dict[str, Any]) -> None:
    conn.execute(
        """
        INSERT INTO tenants (id, smtp, batch_size, pause_ms, archive_bcc, sender_offer, sender_order,
                             sender_invoice, sender_receipt, use_user_mail_data, cc_clerk, dkim, publishers)
        VALUES (%(id)s, %(smtp)s, %(batch_size)s, %(pause_ms)s, %(archive_bcc)s, %(offer)s, %(order)s,
                %(invoice)s, %(receipt)s, %(use_user_mail_data)s, %(cc_clerk)s, %(dkim)s, %(publishers)s)
        ON CONFLICT (id) DO UPDATE SET
            smtp = EXCLUDED.smtp, batch_size = EXCLUDED.batch_size, pause_ms = EXCLUDED.pause_ms,
            archive_bcc = EXCLUDED.archive_bcc, sender_offer = EXCLUDED.sender_offer,
            sender_order = EXCLUDED.sender_order, sender_invoice = EXCLUDED.sender_invoice,
            sender_receipt = EXCLUDED.sender_receipt, use_user_mail_data = EXCLUDED.use_user_mail_data,
            cc_clerk = EXCLUDED.cc_clerk, dkim = EXCLUDED.dkim, publishers = EXCLUDED.publishers,
            updated_at = now()
        """,
        {
            "id": t.id,
            "smtp": _sealed(t.smtp, policy, t, stored, "smtp"),
            "batch_size": t.series.batch_size,
            "pause_ms": t.series.pause_ms,
            "archive_bcc": t.archive_bcc,
            "offer": t.senders.offer,
            "order": t.senders.order,
            "invoice": t.senders.invoice,
            "receipt": t.senders.receipt,
            "use_user_mail_data": t.use_user_mail_data,
            "cc_clerk": t.cc_clerk,
            "dkim": _sealed(t.dkim, policy, t, stored, "dkim"),
            "publishers": t.publishers,
        },
    )
    conn.execute(
        "UPDATE tenants SET webhooks = %s WHERE id = %s",
        (json.dumps([_reveal(w) for w in t.webhooks]), t.id),
    )
    track_webhooks(conn, t.id, [w.url for w in t.webhooks])
    conn.execute(
        "UPDATE tenants SET bounces = %s, suppression = %s WHERE id = %s",
        (_sealed(t.bounces, policy, t, stored, "bounces"), json.dumps(_reveal(t.suppression)), t.id),
    )
    conn.execute("DELETE FROM employees WHERE tenant_id = %s", (t.id,))
    conn.execute("DELETE FROM employee_groups WHERE tenant_id = %s", (t.id,))
    for g in t.groups:
        conn.execute(
            "INSERT INTO employee_groups (tenant_id, id, name) VALUES (%s, %s, %s)", (t.id, g.id, g.name)
        )
        for address in dict.fromkeys(g.senders):
            conn.execute(
                "INSERT INTO group_senders (tenant_id, group_id, address) VALUES (%s, %s, %s)",
                (t.id, g.id, address),
            )
    for e in t.employees:
        conn.execute(
            "INSERT INTO employees (tenant_id, id, email, name, group_id, signature_text, signature_html)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (t.id, e.id, e.email, e.name, e.group, e.signature_text, e.signature_html),
        )
        for address in dict.fromkeys(e.senders):
            conn.execute(
                "INSERT INTO employee_senders (tenant_id, employee_id, address) VALUES (%s, %s, %s)",
                (t.id, e.id, address),
            )


def _snapshot(conn: Connection, tenant_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        "SELECT smtp, batch_size, pause_ms, archive_bcc, sender_offer, sender_order, sender_invoice,"
        " sender_receipt, use_user_mail_data, cc_clerk, dkim, publishers, webhooks, bounces, suppression"
        " FROM tenants WHERE id = %s",
        (tenant_id,),
    ).fetchone()
    if row is None:
        return None
    groups = {
        str(r["id"]): (r["name"], sorted(r["senders"] or []))
        for r in conn.execute(
            "SELECT g.id, g.name, array_remove(array_agg(s.address), NULL) AS senders"
            " FROM employee_groups g LEFT JOIN group_senders s"
            " ON s.tenant_id = g.tenant_id AND s.group_id = g.id"
            " WHERE g.tenant_id = %s GROUP BY g.id, g.name",
            (tenant_id,),
        )
    }
    employees = {
        str(r.pop("id")): r
        for r in conn.execute(
            "SELECT e.id, e.email, e.name, e.group_id, e.signature_text, e.signature_html,"
            " array_remove(array_agg(s.address ORDER BY s.address), NULL) AS senders"
            " FROM employees e LEFT JOIN employee_senders s"
            " ON s.tenant_id = e.tenant_id AND s.employee_id = e.id"
            " WHERE e.tenant_id = %s GROUP BY e.tenant_id, e.id",
            (tenant_id,),
        )
    }
    return {"settings": dict(row), "groups": groups, "employees": employees}


def _describe(tenant_id: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> TenantChange:
    assert after is not None
    if before is None:
        return TenantChange(
            tenant_id, "created", [f"{len(after['groups'])} groups", f"{len(after['employees'])} employees"]
        )
    details = []
    if before["settings"] != after["settings"]:
        changed = sorted(k for k in after["settings"] if before["settings"][k] != after["settings"][k])
        details.append("settings changed: " + ", ".join(changed))
    for kind in ("groups", "employees"):
        old, new = before[kind], after[kind]
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(k for k in set(old) & set(new) if old[k] != new[k])
        for label, ids in (("added", added), ("removed", removed), ("changed", changed)):
            if ids:
                details.append(f"{kind} {label}: {', '.join(ids)}")
    return TenantChange(tenant_id, "updated" if details else "unchanged", details)


__all__ = [
    "TenantChange",
    "TenantFileRefused",
    "TenantPolicy",
    "apply_tenants",
    "check_tenants",
    "parse_problem",
    "read_tenant_file",
]
