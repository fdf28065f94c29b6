"""Send over SMTP with pooled, authenticated connections; smtplib errors are classified here.

2xx is success; 4xx, 421, timeouts and lost connections are transient; 5xx is
permanent. The code, the enhanced status code (RFC 3463) and the text are kept.
"""

from __future__ import annotations

import functools
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from schemas.tenant import Smtp
from worker.compose import Composed
from worker.errors import (
    ConfigurationError,
    PostboteError,
    SmtpConnectionError,
    SmtpRejected,
    SmtpTemporaryFailure,
    SmtpTimeout,
)
from worker.oauth import read_token, xoauth2_response

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*")
_IDLE_CLOSE_S = 30.0
# A server slower than this to accept an envelope ahead of the series slot is
# not worth holding a connection for: the send then goes the ordinary way.
_STAGE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class SmtpReply:
    code: int
    enhanced: str | None
    text: str

    @classmethod
    def parse(cls, code: int, message: bytes | str) -> SmtpReply:
        text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        text = " ".join(text.split())
        match = _ENHANCED.match(text)
        return cls(code, match.group(1) if match else None, text[match.end() :] if match else text)

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code) if self.code else None, self.enhanced, self.text) if p)


@dataclass(frozen=True)
class Delivery:
    """What the server said: the accepted envelope recipients, the refused ones and the final reply."""

    accepted: tuple[str, ...]
    refused: dict[str, SmtpReply]
    reply: SmtpReply
    tls_version: str | None = None
    auth_method: str | None = None


@dataclass
class _Connection:
    client: smtplib.SMTP
    sent: int = 0
    last_used: float = field(default_factory=time.monotonic)
    tls_version: str | None = None
    auth_method: str | None = None


class _Permits:
    """How many connections of one tenant are in use in this process, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_use = 0
        self._cond = threading.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    def take(self, timeout_s: float, *, leave_free: int = 0) -> bool:
        """Take one, waiting up to ``timeout_s`` until ``leave_free`` more stay free besides."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._in_use + 1 + leave_free <= self._limit, timeout_s):
                return False
            self._in_use += 1
            return True

    def give(self) -> None:
        with self._cond:
            self._in_use -= 1
            # Waiters differ in how many must stay free: wake them all.
            self._cond.notify_all()


class SmtpPool:
    """Reusable SMTP connections, a small pool per tenant in this worker process.

    At most ``max_connections`` connections per tenant are open at once (callers
    wait for a free one); a connection is closed after ``max_messages_per_connection``
    messages, after a 421, after an error, and when idle too long.
    """

    def __init__(self, *, timeout_ms: int, on_connect: Callable[[str], None] | None = None) -> None:
        self._timeout_s = timeout_ms / 1000
        self._on_connect = on_connect
        self._lock = threading.Lock()
        self._idle: dict[str, list[_Connection]] = {}
        self._permits: dict[str, _Permits] = {}

    def deliver(self, tenant_id: str, smtp: Smtp, message: Composed) -> Delivery:
        """Send one message to its envelope recipients; raises a classified ``PostboteError``."""
        permits = self._tenant_permits(tenant_id, smtp)
        if not permits.take(self._timeout_s * 2):
            raise SmtpConnectionError(f"no free SMTP connection for tenant {tenant_id!r}")
        conn = None
        try:
            conn = self._take_idle(tenant_id) or self._open(tenant_id, smtp)
            delivery = _transact(conn, message)
        except BaseException:
            if conn is not None:
                _quit(conn.client)
            permits.give()
            raise
        self._put_back(tenant_id, smtp, conn, permits)
        return delivery

    @contextmanager
    def staged(
        self, tenant_id: str, smtp: Smtp, message: Composed, *, priority: bool = False
    ) -> Iterator[Staged | None]:
        """Say MAIL FROM and RCPT TO now, DATA later: ``staged.deliver()`` inside the series slot.

        Bulk callers wait for a connection that leaves one more free (receipts
        must not wait behind bulk sends waiting for their slot), as long as
        :meth:`deliver` would wait for any; a ``priority`` caller (a receipt)
        takes any connection free right now and waits for none. Yields ``None``
        (send with :meth:`deliver` then) when the tenant has a single
        connection, none was free, or the server did not accept the envelope
        promptly; an envelope it refused is left to :meth:`deliver`, which
        classifies the refusal as always. A transaction not delivered when the
        block ends is reset and its connection reused.
        """
        permits = self._tenant_permits(tenant_id, smtp)
        if priority:
            free = permits.limit >= 2 and permits.take(0.0)
        else:
            free = permits.limit >= 2 and permits.take(self._timeout_s * 2, leave_free=1)
        if not free:
            yield None
            return
        staged = None
        try:
            staged = self._stage(tenant_id, smtp, message, permits)
        finally:
            if staged is None:
                permits.give()
        try:
            yield staged
        finally:
            if staged is not None:
                staged.abandon()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                _quit(conn.client)

    def _stage(self, tenant_id: str, smtp: Smtp, message: Composed, permits: _Permits) -> Staged | None:
        conn = self._take_idle(tenant_id)
        if conn is None:
            try:
                conn = self._open(tenant_id, smtp)
            except PostboteError:
                return None  # deliver() tries again and reports the failure
        progress = _Progress(list(message.recipients))
        try:
            _set_timeout(conn.client, min(self._timeout_s, _STAGE_TIMEOUT_S))
            _envelope(conn.client, message, progress)
            _set_timeout(conn.client, self._timeout_s)
        except (OSError, smtplib.SMTPException, SmtpTemporaryFailure, SmtpRejected):
            # deliver() tries again on another connection and classifies what it gets.
            _quit(conn.client)
            return None
        except BaseException:
            _quit(conn.client)
            raise
        if not progress.batch:
            # Every recipient refused: deliver() repeats and reports it.
            self._reset(tenant_id, conn)
            return None
        return Staged(self, tenant_id, smtp, conn, message, progress, permits)

    def _reset(self, tenant_id: str, conn: _Connection) -> None:
        """Drop an unfinished transaction; keep the connection if the server agrees.
        The caller gives back its permit."""
        try:
            code, _ = conn.client.rset()
        except (OSError, smtplib.SMTPException):
            code = 0
        if code == 250:
            conn.last_used = time.monotonic()
            with self._lock:
                self._idle.setdefault(tenant_id, []).append(conn)
        else:
            _quit(conn.client)

    def _put_back(self, tenant_id: str, smtp: Smtp, conn: _Connection, permits: _Permits) -> None:
        conn.sent += 1
        conn.last_used = time.monotonic()
        if conn.sent >= smtp.max_messages_per_connection:
            _quit(conn.client)
        else:
            with self._lock:
                self._idle.setdefault(tenant_id, []).append(conn)
        permits.give()

    def _tenant_permits(self, tenant_id: str, smtp: Smtp) -> _Permits:
        with self._lock:
            return self._permits.setdefault(tenant_id, _Permits(smtp.max_connections))

    def _take_idle(self, tenant_id: str) -> _Connection | None:
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(tenant_id)
                if not idle:
                    return None
                conn = idle.pop()
            if now - conn.last_used < _IDLE_CLOSE_S:
                return conn
            _quit(conn.client)

    def _open(self, tenant_id: str, smtp: Smtp) -> _Connection:
        conn = open_connection(smtp, timeout_s=self._timeout_s)
        if self._on_connect is not None:
            self._on_connect(tenant_id)
        return conn


class Staged:
    """A transaction whose envelope the server accepted, on a connection held for it."""

    def __init__(
        self,
        pool: SmtpPool,
        tenant_id: str,
        smtp: Smtp,
        conn: _Connection,
        message: Composed,
        progress: _Progress,
        permits: _Permits,
    ) -> None:
        self._pool = pool
        self._tenant_id = tenant_id
        self._smtp = smtp
        self._conn: _Connection | None = conn
        self._message = message
        self._progress = progress
        self._permits = permits

    def deliver(self) -> Delivery:
        """DATA, and any transactions a 452 left; raises a classified ``PostboteError`` like
        :meth:`SmtpPool.deliver`."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("a staged transaction is delivered once")
        try:
            delivery = _transact(conn, self._message, self._progress)
        except BaseException:
            _quit(conn.client)
            self._permits.give()
            raise
        self._pool._put_back(self._tenant_id, self._smtp, conn, self._permits)
        return delivery

    def abandon(self) -> None:
        """Reset the transaction unless it was delivered; the connection goes back to the pool."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._reset(self._tenant_id, conn)
            self._permits.give()


def open_connection(smtp: Smtp, *, timeout_s: float) -> _Connection:
    """Connect, say EHLO, secure the link as configured and log in.

    TLS always verifies the certificate; ``security: none`` is the only plaintext mode.
    A failed verification ends the attempt before anything else is said.
    The password or token is read before connecting, so a missing secret costs no connection.
    """
    login = _login_for(smtp)
    context = _tls_context(str(smtp.ca_file) if smtp.ca_file else None)
    local_hostname = smtp.helo or _fqdn()
    try:
        client: smtplib.SMTP
        if smtp.security == "ssl":
            client = smtplib.SMTP_SSL(
                smtp.host, smtp.port, local_hostname=local_hostname, timeout=timeout_s, context=context
            )
        else:
            client = smtplib.SMTP(smtp.host, smtp.port, local_hostname=local_hostname, timeout=timeout_s)
        try:
            client.ehlo()
            if smtp.security == "starttls":
                if not client.has_extn("starttls"):
                    raise SmtpRejected(
                        f"{smtp.host}:{smtp.port} does not offer STARTTLS", reason="starttls_unavailable"
                    )
                client.starttls(context=context)
                client.ehlo()
            conn = _Connection(client)
            if isinstance(client.sock, ssl.SSLSocket):
                conn.tls_version = client.sock.version()
            if login is not None:
                conn.auth_method = _authenticate(client, smtp, login)
            return conn
        except ssl.SSLError:
            client.close()  # no plaintext QUIT on a link that was meant to be encrypted
            raise
        except BaseException:
            _quit(client)
            raise
    except ssl.SSLCertVerificationError as e:
        raise SmtpRejected(
            f"TLS certificate of {smtp.host} does not verify: {e.verify_message}", reason="tls_verify_failed"
        ) from e
    except smtplib.SMTPResponseException as e:
        raise _classify(SmtpReply.parse(e.smtp_code, e.smtp_error), "connect") from e
    except (OSError, smtplib.SMTPException) as e:
        raise SmtpConnectionError(
            f"cannot talk to {smtp.host}:{smtp.port}: {e or type(e).__name__}", reason="smtp_connection"
        ) from e


@dataclass(frozen=True)
class _Login:
    user: str
    secret: str = field(repr=False)
    xoauth2: bool


class _XOAuth2:
    """The XOAUTH2 authobject for ``smtplib.SMTP.auth``.

    A refused token is answered with a 334 challenge carrying an error (JSON);
    the client must send an empty line, then the server ends with 535.
    """

    def __init__(self, response: str) -> None:
        self._response = response
        self.error: str | None = None

    def __call__(self, challenge: bytes | None = None, /) -> str:
        if challenge is None:
            return self._response
        self.error = " ".join(challenge.decode("utf-8", "replace").split())[:300] or None
        return ""


# One mechanism per login: trying the next after a refusal counts as another failed
# login, and providers lock accounts after a few of those.
_PASSWORD_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
_AUTH_UNAVAILABLE_CODES = (502, 503, 504, 538)


def _send_data(client: smtplib.SMTP, data: bytes) -> tuple[int, bytes]:
    """DATA with dot-stuffing; smtplib's ``data()`` also rewrites every line end with a regular
    expression, which costs more than the rest of the send for a message that has only CRLF."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        return client.data(data)
    client.putcmd("data")
    code, reply = client.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, reply)
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    client.send(stuffed + b".\r\n")
    return client.getreply()


@functools.lru_cache(maxsize=32)
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    """A verifying context per CA bundle, built once: loading the CA store takes milliseconds."""
    return ssl.create_default_context(cafile=cafile)


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    return socket.getfqdn()


def _login_for(smtp: Smtp) -> _Login | None:
    if smtp.user is None:
        return None
    if smtp.auth == "xoauth2":
        return _Login(smtp.user, read_token(smtp), xoauth2=True)
    return _Login(smtp.user, _password(smtp), xoauth2=False)


def _authenticate(client: smtplib.SMTP, smtp: Smtp, login: _Login) -> str:
    """AUTH with the first mechanism both sides know; returns its name.

    Raises ``SmtpRejected`` (``smtp_auth_unavailable`` when the server offers no usable
    mechanism, ``smtp_auth_failed`` when it refuses the credentials) or ``SmtpTemporaryFailure``.
    """
    where = f"{smtp.host}:{smtp.port}"
    offered = client.esmtp_features.get("auth", "").upper().split()
    wanted = ("XOAUTH2",) if login.xoauth2 else _PASSWORD_MECHANISMS
    mechanism = next((m for m in wanted if m in offered), None)
    if mechanism is None:
        has = f"offers AUTH {' '.join(offered)}" if offered else "offers no AUTH"
        plain = " on this unencrypted connection" if smtp.security == "none" else ""
        raise SmtpRejected(
            f"{where} {has}{plain}, not {' or '.join(wanted)}; cannot log in as {login.user}",
            reason="smtp_auth_unavailable",
        )
    authobject: _XOAuth2 | None = None
    if login.xoauth2:
        authobject = _XOAuth2(xoauth2_response(login.user, login.secret))
    else:
        client.user, client.password = login.user, login.secret
    code: int
    text: bytes | str
    try:
        if authobject is not None:
            code, text = client.auth(mechanism, authobject, initial_response_ok=True)
        elif mechanism == "PLAIN":
            code, text = client.auth(mechanism, client.auth_plain, initial_response_ok=True)
        elif mechanism == "LOGIN":
            code, text = client.auth(mechanism, client.auth_login, initial_response_ok=True)
        else:
            code, text = client.auth(mechanism, client.auth_cram_md5, initial_response_ok=True)
    except smtplib.SMTPAuthenticationError as e:
        code, text = e.smtp_code, e.smtp_error
    except UnicodeEncodeError:
        raise ConfigurationError(
            f"the SMTP user or its {'token' if login.xoauth2 else 'password'} has non-ASCII characters,"
            f" which AUTH {mechanism} cannot carry here"
        ) from None
    finally:
        client.password = ""
    if code == 235:
        return mechanism
    reply = SmtpReply.parse(code, text)
    detail = f"login as {login.user} with {mechanism} failed: {reply}"
    if authobject is not None and authobject.error:
        detail += f" (server's XOAUTH2 error: {authobject.error})"
    if 400 <= code < 500:
        raise SmtpTemporaryFailure(detail, smtp_reply=str(reply))
    # smtplib returns 503 as "already authenticated"; on a connection's only AUTH it is a refusal.
    reason = "smtp_auth_unavailable" if code in _AUTH_UNAVAILABLE_CODES else "smtp_auth_failed"
    raise SmtpRejected(detail, reason=reason, smtp_reply=str(reply))


def _password(smtp: Smtp) -> str:
    if smtp.password is not None:
        return smtp.password.get_secret_value()
    if smtp.password_file is not None:
        try:
            return smtp.password_file.read_text().strip()
        except OSError as e:
            raise ConfigurationError(f"cannot read password_file {smtp.password_file}: {e.strerror}") from e
    raise ConfigurationError("SMTP user is set but neither password nor password_file")


@dataclass
class _Progress:
    """Where a send stands: recipients not yet tried, the current transaction's, the done ones."""

    pending: list[str]
    batch: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    refused: dict[str, SmtpReply] = field(default_factory=dict)
    reply: SmtpReply | None = None
    stage: str = "MAIL FROM"


def _envelope(client: smtplib.SMTP, message: Composed, progress: _Progress) -> None:
    """MAIL FROM and RCPT TO for the next transaction, up to a 452 for too many recipients."""
    options = ["SMTPUTF8"] if message.smtputf8 else []
    if message.smtputf8 and not client.has_extn("smtputf8"):
        raise SmtpRejected(
            "an address has a non-ASCII local part and the server does not offer SMTPUTF8",
            reason="smtputf8_unsupported",
        )
    if "size" in client.esmtp_features:
        options.append(f"SIZE={len(message.data)}")
    if progress.accepted or progress.refused:
        client.rset()
    progress.stage = "MAIL FROM"
    _expect(client.mail(message.mail_from, options), progress.stage, client)
    progress.batch = []
    progress.stage = "RCPT TO"
    while progress.pending:
        rcpt = progress.pending[0]
        answer = SmtpReply.parse(*client.rcpt(rcpt))
        if answer.code == 452 and progress.batch:
            break
        progress.pending.pop(0)
        if answer.code in (250, 251):
            progress.batch.append(rcpt)
        elif answer.code == 421:
            raise _classify(answer, progress.stage)
        else:
            progress.refused[rcpt] = answer


def _transact(conn: _Connection, message: Composed, progress: _Progress | None = None) -> Delivery:
    """MAIL, RCPT, DATA; a 452 for too many recipients continues in a further transaction.

    ``progress`` is a send whose first envelope was already accepted (:meth:`SmtpPool.staged`).
    """
    client = conn.client
    p = progress or _Progress(list(message.recipients))
    try:
        while p.pending or p.batch:
            if not p.batch:
                _envelope(client, message, p)
                if not p.batch:
                    continue
            p.stage = "DATA"
            code, text = _send_data(client, message.data)
            p.reply = _expect((code, text), p.stage, client)
            p.accepted.extend(p.batch)
            p.batch = []
    except (OSError, smtplib.SMTPException, SmtpTemporaryFailure, SmtpRejected) as e:
        error = _translate(e, p.stage)
        if not p.accepted:
            raise error from e
        # An earlier transaction (after a 452) went through: resending would duplicate it,
        # so the recipients not reached are recorded as refused instead.
        lost = SmtpReply(0, None, str(error))
        p.refused.update({rcpt: lost for rcpt in [*p.batch, *p.pending]})
        assert p.reply is not None
    refused = p.refused
    if p.reply is None:
        transient = [r for r in refused.values() if r.code < 500]
        worst = transient[0] if transient else next(iter(refused.values()))
        summary = "; ".join(f"{a}: {r}" for a, r in refused.items())
        if transient:
            raise SmtpTemporaryFailure(f"no recipient accepted: {summary}", smtp_reply=str(worst))
        raise SmtpRejected(
            f"every recipient refused: {summary}", reason="recipients_refused", smtp_reply=str(worst)
        )
    return Delivery(tuple(p.accepted), refused, p.reply, conn.tls_version, conn.auth_method)


def _set_timeout(client: smtplib.SMTP, timeout_s: float) -> None:
    client.timeout = timeout_s
    if client.sock is not None:
        client.sock.settimeout(timeout_s)


def _translate(error: BaseException, stage: str) -> SmtpTemporaryFailure | SmtpRejected | SmtpConnectionError:
    if isinstance(error, SmtpTemporaryFailure | SmtpRejected):
        return error
    if isinstance(error, smtplib.SMTPResponseException):
        return _classify(SmtpReply.parse(error.smtp_code, error.smtp_error), stage)
    if isinstance(error, TimeoutError) or isinstance(error.__context__, TimeoutError):
        after = " after the final dot; the server may have taken the mail" if stage == "DATA" else ""
        return SmtpTimeout(f"{stage}: no answer in time{after}")
    return SmtpConnectionError(f"{stage}: connection lost: {error or type(error).__name__}")


def _expect(answer: tuple[int, bytes], stage: str, client: smtplib.SMTP) -> SmtpReply:
    reply = SmtpReply.parse(*answer)
    if 200 <= reply.code < 300:
        return reply
    raise _classify(reply, stage)


def _classify(reply: SmtpReply, stage: str) -> SmtpTemporaryFailure | SmtpRejected:
    text = f"{stage}: {reply}"
    if reply.code >= 500:
        return SmtpRejected(text, smtp_reply=str(reply))
    return SmtpTemporaryFailure(text, smtp_reply=str(reply))


def _quit(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()


__all__ = ["Delivery", "SmtpPool", "SmtpReply", "Staged", "open_connection"]
