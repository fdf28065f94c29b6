"""Operator tasks around tenant secrets and database roles: rotate the sealing key, say which role
a connection runs as."""

from __future__ import annotations

import json
from dataclasses import dataclass

from worker.db import Connection, translated_errors
from worker.runtime.secrets_box import KeyRing, plain_secrets, reseal_secrets

SECRET_COLUMNS = ("smtp", "dkim", "bounces")
"""The ``tenants`` columns that may hold secrets (the tenant file's sections)."""
ROLES = ("postbote_worker", "postbote_operator")


@dataclass(frozen=True)
class Rotation:
    tenants: int
    """Tenants whose stored secrets changed."""
    secrets: int
    """Secrets sealed with the current key (those sealed with an older key, and plain ones)."""


@dataclass(frozen=True)
class DatabaseRole:
    name: str
    superuser: bool
    groups: tuple[str, ...]
    """Which of :data:`ROLES` it is a member of."""

    def describe(self) -> str:
        """One line for ``postbote check``."""
        if self.groups:
            return f"database role: {self.name} (member of {', '.join(self.groups)})"
        advice = "workers should log in as a member of postbote_worker, operators of postbote_operator"
        if self.superuser:
            return f"database role: {self.name} (superuser; {advice})"
        return f"database role: {self.name} (in neither postbote role; {advice})"


def rotate_secrets(conn: Connection, ring: KeyRing, *, dry_run: bool = False) -> Rotation:
    """Seal every stored tenant secret with the ring's current key, in one transaction.

    Raises:
      ConfigurationError: a stored secret does not open with any key of the ring.
    """
    tenants = secrets = 0
    columns = [c for c in SECRET_COLUMNS if _has_column(conn, c)]
    with translated_errors(), conn.transaction():
        rows = conn.execute(
            f"SELECT id, {', '.join(columns)} FROM tenants ORDER BY id FOR UPDATE"  # noqa: S608 - fixed names
        ).fetchall()
        for row in rows:
            changed = {}
            for column in columns:
                value, count = reseal_secrets(row[column], ring, tenant=str(row["id"]))
                if count:
                    changed[column] = value
                    secrets += count
            if changed:
                tenants += 1
                if not dry_run:
                    for column, value in changed.items():
                        conn.execute(
                            f"UPDATE tenants SET {column} = %s WHERE id = %s",  # noqa: S608 - fixed names
                            (json.dumps(value), row["id"]),
                        )
    return Rotation(tenants, secrets)


def unsealed_secrets(conn: Connection) -> int:
    """How many tenant secrets the database holds in plain text (written before sealing)."""
    columns = [c for c in SECRET_COLUMNS if _has_column(conn, c)]
    with translated_errors():
        rows = conn.execute(f"SELECT {', '.join(columns)} FROM tenants").fetchall()  # noqa: S608 - fixed names
    return sum(plain_secrets(row[c]) for row in rows for c in columns)


def database_role(conn: Connection) -> DatabaseRole:
    """The role the connection runs as and which postbote roles it is a member of."""
    with translated_errors():
        row = conn.execute(
            "SELECT current_user AS name, r.rolsuper AS superuser,"
            " ARRAY(SELECT g.rolname FROM pg_roles g WHERE g.rolname = ANY(%s)"
            "       AND pg_has_role(current_user, g.oid, 'MEMBER') ORDER BY g.rolname) AS groups"
            " FROM pg_roles r WHERE r.rolname = current_user",
            (list(ROLES),),
        ).fetchone()
    assert row is not None
    superuser = bool(row["superuser"])
    # A superuser is a member of every role; that says nothing about how it was meant to be used.
    groups = () if superuser else tuple(row["groups"])
    return DatabaseRole(str(row["name"]), superuser, groups)


def _has_column(conn: Connection, column: str) -> bool:
    with translated_errors():
        return (
            conn.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_name = 'tenants' AND column_name = %s",
                (column,),
            ).fetchone()
            is not None
        )


__all__ = [
    "ROLES",
    "SECRET_COLUMNS",
    "DatabaseRole",
    "Rotation",
    "database_role",
    "rotate_secrets",
    "unsealed_secrets",
]
