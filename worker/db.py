"""PostgreSQL connections and migrations. psycopg errors become ``DatabaseUnavailable`` here.

Every connection postbote opens for its own work has TCP keepalives and a user timeout
(a server that vanished in an unclean failover is noticed within seconds, not the
kernel's quarter of an hour), a ``statement_timeout``, a limit on how long the client waits
for any answer (a server that is stopped but not gone, whose kernel still acknowledges every
packet, defeats keepalives; see ``AnswerLimited``), and no server-side prepared
statements (PgBouncer in transaction mode hands each transaction to another server
session, where a statement prepared in an earlier one does not exist).

``database_url`` may be a libpq multi-host URL; with ``target_session_attrs=read-write`` a
new connection finds the primary among the hosts (docs/high-availability.md). A connection
that still lands on a read-only server (a standby) is an outage, never a failed job.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import psycopg.conninfo
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from worker.errors import DatabaseUnavailable
from worker.library_internals import PSYCOPG_WAIT_INTERVAL_S, PsycopgWaitTimeout
from worker.settings import DEFAULT_STATEMENT_TIMEOUT_MS

# deploy/migrations, reached through the worker/migrations link (copied into wheels).
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

Connection = psycopg.Connection[dict[str, Any]]

KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    # Keepalives only probe an idle connection; this bounds a statement sent to a dead peer.
    "tcp_user_timeout": 20_000,
}
"""libpq options of every connection, unless the database URL sets them itself: an idle
connection to a vanished server is dropped after 10 + 3 × 5 = 25 s, a busy one after 20 s
without an acknowledgement."""

ANSWER_GRACE_MS = 5000
"""How much longer than ``statement_timeout`` the client waits for the server's answer before
it closes the connection itself (the server cancels a statement at ``statement_timeout``)."""

CONNECT_TIMEOUT_S = 5
"""How long opening a connection may take."""

Row = TypeVar("Row")


class AnswerLimited(psycopg.Connection[Row]):
    """A connection that stops waiting for the server after ``answer_limit_s`` seconds.

    A server stopped without closing its sockets (a frozen VM, a ``SIGSTOP``, a network
    partition behind a proxy) never answers, while its kernel, or the proxy, acknowledges what
    the client sends: neither keepalives nor ``tcp_user_timeout`` fire, and a thread would wait
    forever. Past the limit the connection is closed and ``psycopg.OperationalError`` raised,
    which ``translated_errors`` reports as an outage. ``None``: no limit.
    """

    answer_limit_s: float | None = None
    on_unanswered: Callable[[], None] | None = None
    """Called after the limit closed this connection: its pool drops the other connections to
    the same server, which would each make a thread wait the limit again."""

    def wait(self, gen: Any, interval: float = PSYCOPG_WAIT_INTERVAL_S, timeout: float | None = None) -> Any:
        limit = self.answer_limit_s
        if limit is None or timeout is not None:
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, limit)
        except PsycopgWaitTimeout as e:
            self.close()
            if self.on_unanswered is not None:
                self.on_unanswered()
            raise psycopg.OperationalError(
                f"the server did not answer within {limit:g} s; connection closed"
            ) from e


def answer_limit_s(statement_timeout_ms: int) -> float | None:
    """How long a connection with ``statement_timeout_ms`` waits for an answer (``None``: no
    statement timeout, so no limit either)."""
    return (statement_timeout_ms + ANSWER_GRACE_MS) / 1000 if statement_timeout_ms > 0 else None


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

# Class 42 ("syntax error or access rule violation") is mostly our own SQL being wrong, but
# these codes say the server is not (yet) the one the code expects: a revoked grant, a
# database not migrated, prepared statements lost behind a pooler.
_NOT_OUR_STATEMENT = frozenset(
    {
        "42501",  # insufficient_privilege
        "42P01",  # undefined_table
        "42703",  # undefined_column
        "42883",  # undefined_function
        "42704",  # undefined_object
        "42P05",  # duplicate_prepared_statement
        "42P03",  # duplicate_cursor
        "26000",  # invalid_sql_statement_name (a prepared statement that is gone)
        "34000",  # invalid_cursor_name
        "3F000",  # invalid_schema_name
        "3D000",  # invalid_catalog_name
    }
)


def connection_kwargs(
    database_url: str, *, statement_timeout_ms: int, application_name: str | None = None
) -> dict[str, Any]:
    """The psycopg and libpq options of a postbote connection to ``database_url``.

    What the URL sets itself wins: its keepalive settings, and a ``statement_timeout`` in
    its ``options``. ``statement_timeout_ms=0`` sends none (for a pooler that refuses the
    ``options`` startup parameter; set the timeout on the server's role instead). An
    ``application_name`` given here wins over the URL's: it names the session for postbote.
    """
    given = psycopg.conninfo.conninfo_to_dict(database_url)
    kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "prepare_threshold": None}
    if application_name is not None:
        kwargs["application_name"] = application_name
    kwargs.update({k: v for k, v in KEEPALIVES.items() if k not in given})
    options = str(given.get("options") or "")
    if statement_timeout_ms > 0 and "statement_timeout" not in options:
        kwargs["options"] = f"{options} -c statement_timeout={int(statement_timeout_ms)}".strip()
    return kwargs


def connect(
    database_url: str,
    *,
    autocommit: bool = False,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    application_name: str | None = None,
) -> Connection:
    """One connection with dict rows; ``DatabaseUnavailable`` when the server cannot be reached."""
    try:
        conn: AnswerLimited[dict[str, Any]] = AnswerLimited.connect(
            database_url,
            autocommit=autocommit,
            row_factory=dict_row,
            **connection_kwargs(
                database_url, statement_timeout_ms=statement_timeout_ms, application_name=application_name
            ),
        )
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"database unreachable: {_first_line(e)}") from e
    conn.answer_limit_s = answer_limit_s(statement_timeout_ms)
    return conn


def make_pool(
    database_url: str,
    *,
    max_size: int,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    application_name: str | None = None,
) -> ConnectionPool[Connection]:
    """A pool for a worker process: autocommit connections, opened lazily.

    Connections are not pinged on checkout (a round trip per use); one broken by
    a server restart fails its statement with ``DatabaseUnavailable``, which the
    retry policy treats as an outage, and the pool replaces it. So is a read-only
    one (a standby behind the URL, ``default_transaction_read_only``): it is dropped
    when it comes back to the pool, so the next one may find the new primary.
    """
    kwargs = connection_kwargs(
        database_url, statement_timeout_ms=statement_timeout_ms, application_name=application_name
    )
    limit = answer_limit_s(statement_timeout_ms)

    def configure(conn: Connection) -> None:
        if isinstance(conn, AnswerLimited):
            conn.answer_limit_s = limit
            conn.on_unanswered = pool.drain

    pool = WorkerPool(
        database_url,
        connection_class=AnswerLimited,
        min_size=0,
        max_size=max(1, max_size),
        kwargs={"row_factory": dict_row, "autocommit": True, **kwargs},
        configure=configure,
        open=True,
        name="postbote",
    )
    return pool


class WorkerPool(ConnectionPool[Connection]):
    """A pool whose connections go back in the thread that used them, checked for a read-only
    server on the way; a ``reset`` callback would hand every return to the pool's own threads."""

    def putconn(self, conn: Connection) -> None:
        if not conn.closed and read_only(conn):
            conn.close()
        super().putconn(conn)


def read_only(conn: Connection) -> bool:
    """Whether ``conn`` reached a read-only server (a standby, ``default_transaction_read_only``)."""
    # The server reports both (PostgreSQL 14 and later), so this costs no round trip.
    info = conn.info
    return info.parameter_status("in_hot_standby") == "on" or (
        info.parameter_status("default_transaction_read_only") == "on"
    )


def storable(text: str) -> str:
    """``text`` as PostgreSQL ``text`` and ``jsonb`` take it: NUL and unpaired surrogates
    (legal in JSON, refused by PostgreSQL) replaced by U+FFFD, visibly."""
    return _UNSTORABLE.sub("\ufffd", text)


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
    """Turn every driver error that is not the job's fault into ``DatabaseUnavailable``.

    The rule: an error is an outage (no attempt used, the message retried later) unless
    retrying the same job cannot help. Left as they are:

    - the values written were refused: ``DataError`` (SQLSTATE class 22: NUL or an
      unpaired surrogate, a number out of range), ``IntegrityError`` (class 23) and
      ``program_limit_exceeded`` (class 54: a value too big for a column or an index);
      the caller knows the data (``store_dead_job`` keeps such a message as raw bytes);
    - our own SQL is wrong: a ``ProgrammingError`` raised before sending, or a class-42
      error such as a syntax error or an ambiguous column. A bug, not an outage.

    Everything else is an outage: connection loss, server shutdown (``AdminShutdown``),
    a statement cancelled by ``statement_timeout``, lock timeouts, serialization failures
    and deadlocks, a read-only standby behind the URL (``ReadOnlySqlTransaction``),
    prepared statements or cursors lost behind PgBouncer, a revoked privilege, a database
    not migrated yet (undefined table, column or function), a full disk, pool exhaustion.
    """
    try:
        yield
    except psycopg.Error as e:
        if not is_outage(e):
            raise
        raise DatabaseUnavailable(f"database unavailable: {type(e).__name__}: {_first_line(e)}") from e


def is_outage(error: psycopg.Error) -> bool:
    """Whether ``error`` is an outage by the rule of :func:`translated_errors`."""
    state = error.sqlstate or ""
    if isinstance(error, psycopg.DataError | psycopg.IntegrityError) or state.startswith("54"):
        return False
    if isinstance(error, psycopg.ProgrammingError):
        return state in _NOT_OUR_STATEMENT
    return True


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
    if isinstance(conn, AnswerLimited):
        conn.answer_limit_s = None  # a migration may take longer than any statement of the job path
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
            # A migration may take longer than any statement of the job path.
            conn.execute("SET LOCAL statement_timeout = 0")
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
    "ANSWER_GRACE_MS",
    "CONNECT_TIMEOUT_S",
    "KEEPALIVES",
    "AnswerLimited",
    "Connection",
    "answer_limit_s",
    "connect",
    "connection_kwargs",
    "drop_database",
    "ensure_database",
    "is_outage",
    "make_pool",
    "migrations",
    "read_only",
    "storable",
    "translated_errors",
    "upgrade",
]
