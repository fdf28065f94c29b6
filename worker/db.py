"""PostgreSQL connections and migrations. psycopg errors become ``DatabaseUnavailable`` here."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from worker.errors import DatabaseUnavailable

# deploy/migrations, reached through the worker/migrations link (copied into wheels).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

Connection = psycopg.Connection[dict[str, Any]]


def connect(database_url: str, *, autocommit: bool = False) -> Connection:
    """One connection with dict rows; ``DatabaseUnavailable`` when the server cannot be reached."""
    try:
        return psycopg.connect(database_url, autocommit=autocommit, row_factory=dict_row, connect_timeout=5)
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"database unreachable: {_first_line(e)}") from e


def make_pool(database_url: str, *, max_size: int) -> ConnectionPool[Connection]:
    """A pool for a worker process: autocommit connections, opened lazily.

    Connections are not pinged on checkout (a round trip per use); one broken by
    a server restart fails its statement with ``DatabaseUnavailable``, which the
    retry policy treats as an outage, and the pool replaces it.
    """
    return ConnectionPool(
        database_url,
        min_size=0,
        max_size=max(1, max_size),
        kwargs={"row_factory": dict_row, "connect_timeout": 5, "autocommit": True},
        open=True,
        name="postbote",
    )


def ensure_database(database_url: str) -> bool:
    """Create the database named in ``database_url`` if it does not exist; True when it was created."""
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    name = str(info.get("dbname") or "")
    if not name:
        return False
    admin = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                return False
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            return True
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"database unreachable: {_first_line(e)}") from e


def drop_database(database_url: str) -> None:
    """Drop the database named in ``database_url`` if it exists, closing its sessions (tests, benchmarks)."""
    name = str(psycopg.conninfo.conninfo_to_dict(database_url).get("dbname") or "")
    admin = psycopg.conninfo.make_conninfo(database_url, dbname="postgres")
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextmanager
def translated_errors() -> Iterator[None]:
    """Turn driver errors about the server's reachability into ``DatabaseUnavailable``."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as e:
        raise DatabaseUnavailable(f"database unavailable: {_first_line(e)}") from e
    except PoolTimeout as e:
        raise DatabaseUnavailable(f"database unavailable: {_first_line(e)}") from e


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in order of their names (``0001_init.sql`` …)."""
    return [Migration(p.stem, p.read_text()) for p in sorted(directory.glob("*.sql"))]


def upgrade(conn: Connection, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction; returns their versions.

    A lock keeps two concurrent upgrades from applying the same file twice; a
    recorded migration whose file changed since is an error, not silently skipped.
    """
    applied: list[str] = []
    with conn.transaction():
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for migration in migrations(directory):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('postbote.migrations'))")
            row = conn.execute(
                "SELECT checksum FROM schema_migrations WHERE version = %s", (migration.version,)
            ).fetchone()
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise RuntimeError(
                        f"migration {migration.version} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, checksum) VALUES (%s, %s)",
                (migration.version, migration.checksum),
            )
            applied.append(migration.version)
    return applied


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


__all__ = [
    "Connection",
    "connect",
    "drop_database",
    "ensure_database",
    "make_pool",
    "migrations",
    "translated_errors",
    "upgrade",
]
