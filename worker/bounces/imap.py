"""The tenant's mailbox over IMAP (imapclient): new messages since the last look, each ingested.

A message is read with ``BODY.PEEK[]``, so reading marks nothing. Only a message that matched a
job is changed: moved to ``processed_folder``, or marked read when there is none. Everything else
(customer replies, unmatched reports) stays exactly as it was; a cursor per folder (the highest
UID looked at, for its UIDVALIDITY) keeps it from being read again.

The login is the SMTP login's code: password, ``password_file``, or an XOAUTH2 token from
``token_file``/``token_command``.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import imapclient
import imapclient.exceptions

from schemas.tenant import Bounces, Imap, Smtp
from worker.bounces.ingest import ingest_report
from worker.db import Connection, translated_errors
from worker.errors import ConfigurationError, PostboteError
from worker.job.accounts import SecretAccess
from worker.job.smtp.connect import _login_for, _tls_context
from worker.job.smtp.oauth import TokenHelpers
from worker.settings import Settings

logger = logging.getLogger(__name__)

_BATCH = 50
_READ_BYTES = 256 * 1024
"""How much of a message is read: a report's status and the returned headers come first; a
customer's attachment after them is not needed (nor held in memory)."""
_FIRST_LOOK_DAYS = 7
"""A folder never looked at before is read from this many days back, not from its first message."""


class MailboxUnavailable(PostboteError):
    """The IMAP server cannot be reached, refused the login, or broke off."""


@dataclass
class Pass:
    """What one look at the folder found."""

    read: int = 0
    reports: int = 0
    matched: int = 0
    recorded: int = 0
    """Recipients whose ledger state a report changed (``bounced`` or ``delayed``)."""


def load_bounces(conn: Connection, tenant: str, access: SecretAccess) -> Bounces | None:
    """The tenant's ``bounces`` settings, secrets opened with ``access``; ``None`` when there is no
    such tenant."""
    with translated_errors():
        row = conn.execute("SELECT bounces FROM tenants WHERE id = %s", (tenant,)).fetchone()
    if row is None:
        return None
    return Bounces.model_validate(access.open(row["bounces"], tenant=tenant, column="bounces") or {})


def token_helpers_of(settings: Settings) -> TokenHelpers:
    return TokenHelpers(settings.token_helpers, settings.token_helper_timeout_ms / 1000)


class Mailbox:
    """One open IMAP connection to a tenant's bounce folder."""

    def __init__(
        self, tenant: str, imap: Imap, *, timeout_s: float, token_helpers: TokenHelpers | None = None
    ) -> None:
        self.tenant = tenant
        self.imap = imap
        self.client = _connect(imap, timeout_s=timeout_s)
        try:
            _log_in(self.client, imap, token_helpers)
            if imap.processed_folder and not self.client.folder_exists(imap.processed_folder):
                self.client.create_folder(imap.processed_folder)
            info = self.client.select_folder(imap.folder)
        except (imapclient.exceptions.IMAPClientError, OSError) as e:
            self.close()
            raise MailboxUnavailable(f"IMAP {imap.host}:{imap.port} folder {imap.folder!r}: {e}") from e
        except BaseException:
            self.close()
            raise
        self.uidvalidity = int(info[b"UIDVALIDITY"])
        self.idle = self.client.has_capability("IDLE")
        self.move = self.client.has_capability("MOVE")

    def close(self) -> None:
        try:
            self.client.logout()
        except (imapclient.exceptions.IMAPClientError, OSError):
            self.client.shutdown()

    def look(self, conn: Connection) -> Pass:
        """Ingest every message that arrived since the last look."""
        done = Pass()
        try:
            with translated_errors():
                self._look(conn, done)
        except (imapclient.exceptions.IMAPClientError, OSError) as e:
            raise MailboxUnavailable(f"IMAP {self.imap.host}:{self.imap.port}: {e}") from e
        return done

    def _look(self, conn: Connection, done: Pass) -> None:
        after = _cursor(conn, self.tenant, self.imap.folder, self.uidvalidity)
        if after is None:
            since = date.today() - timedelta(days=_FIRST_LOOK_DAYS)
            uids = sorted(self.client.search(["SINCE", since]))
        else:
            uids = sorted(u for u in self.client.search(["UID", f"{after + 1}:*"]) if u > after)
        for start in range(0, len(uids), _BATCH):
            batch = uids[start : start + _BATCH]
            fetched = self.client.fetch(batch, [f"BODY.PEEK[]<0.{_READ_BYTES}>"])
            matched = []
            for uid in batch:
                parts = fetched.get(uid, {})
                data = parts.get(b"BODY[]<0>", parts.get(b"BODY[]"))
                if not isinstance(data, bytes):
                    continue
                done.read += 1
                ingested = ingest_report(conn, data, tenant=self.tenant)
                done.reports += ingested.report
                if ingested.matched:
                    done.matched += 1
                    matched.append(uid)
                    done.recorded += sum(o in ("bounced", "delayed") for _, _, o in ingested.recorded)
            self._file(matched)
            _advance(conn, self.tenant, self.imap.folder, self.uidvalidity, batch[-1])

    def wait(self, timeout_s: float) -> None:
        """Until the server says something changed (IDLE), or ``timeout_s`` passed."""
        if not self.idle:
            return
        try:
            self.client.idle()
            try:
                self.client.idle_check(timeout=timeout_s)
            finally:
                self.client.idle_done()
        except (imapclient.exceptions.IMAPClientError, OSError) as e:
            raise MailboxUnavailable(f"IMAP {self.imap.host}:{self.imap.port}: {e}") from e

    def _file(self, uids: list[int]) -> None:
        if not uids:
            return
        target = self.imap.processed_folder
        if target is None:
            self.client.add_flags(uids, [imapclient.SEEN])
        elif self.move:
            self.client.move(uids, target)
        else:
            self.client.copy(uids, target)
            self.client.delete_messages(uids)
            if self.client.has_capability("UIDPLUS"):
                self.client.uid_expunge(uids)


def fetch_once(conn: Connection, tenant: str, settings: Settings) -> Pass:
    """One look at the tenant's bounce folder (``postbote bounces fetch``)."""
    bounces = load_bounces(conn, tenant, SecretAccess.from_settings(settings))
    if bounces is None:
        raise ConfigurationError(f"unknown tenant {tenant!r}")
    if bounces.imap is None:
        raise ConfigurationError(f"tenant {tenant!r} has no bounces.imap in its tenant file")
    mailbox = Mailbox(
        tenant,
        bounces.imap,
        timeout_s=settings.smtp_timeout_ms / 1000,
        token_helpers=token_helpers_of(settings),
    )
    try:
        return mailbox.look(conn)
    finally:
        mailbox.close()


def _connect(imap: Imap, *, timeout_s: float) -> imapclient.IMAPClient:
    context = _tls_context(str(imap.ca_file) if imap.ca_file else None)
    try:
        client = imapclient.IMAPClient(
            imap.host,
            port=imap.port,
            ssl=imap.security == "ssl",
            ssl_context=context if imap.security == "ssl" else None,
            timeout=timeout_s,
        )
        if imap.security == "starttls":
            client.starttls(ssl_context=context)
    except ssl.SSLCertVerificationError as e:
        raise MailboxUnavailable(f"TLS certificate of {imap.host} does not verify: {e.verify_message}") from e
    except (TimeoutError, imapclient.exceptions.IMAPClientError, OSError) as e:
        raise MailboxUnavailable(
            f"cannot talk to IMAP {imap.host}:{imap.port}: {e or type(e).__name__}"
        ) from e
    return client


def _log_in(client: imapclient.IMAPClient, imap: Imap, token_helpers: TokenHelpers | None) -> None:
    login = _login_for(_as_smtp(imap), token_helpers)
    assert login is not None
    try:
        if login.xoauth2:
            client.oauth2_login(login.user, login.secret)
        else:
            client.login(login.user, login.secret)
    except imapclient.exceptions.LoginError as e:
        raise MailboxUnavailable(f"IMAP login as {imap.user} at {imap.host} failed: {e}") from None


def _as_smtp(imap: Imap) -> Smtp:
    """The IMAP login in the shape the SMTP login code reads."""
    fields: dict[str, Any] = imap.model_dump(
        include={
            "host",
            "port",
            "security",
            "user",
            "password",
            "password_file",
            "auth",
            "token_file",
            "token_helper",
            "ca_file",
        }
    )
    return Smtp(**fields)


def _cursor(conn: Connection, tenant: str, folder: str, uidvalidity: int) -> int | None:
    """The highest UID looked at; ``None`` for a folder never looked at (or renumbered since)."""
    row = conn.execute(
        "SELECT uidvalidity, last_uid FROM bounce_cursors WHERE tenant_id = %s AND folder = %s",
        (tenant, folder),
    ).fetchone()
    if row is None or int(row["uidvalidity"]) != uidvalidity:
        return None
    return int(row["last_uid"])


def _advance(conn: Connection, tenant: str, folder: str, uidvalidity: int, uid: int) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO bounce_cursors (tenant_id, folder, uidvalidity, last_uid) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (tenant_id, folder) DO UPDATE SET uidvalidity = EXCLUDED.uidvalidity,"
            " last_uid = EXCLUDED.last_uid, updated_at = now()",
            (tenant, folder, uidvalidity, uid),
        )


__all__ = ["Mailbox", "MailboxUnavailable", "Pass", "fetch_once", "load_bounces"]
