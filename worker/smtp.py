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
    SmtpConnectionError,
    SmtpRejected,
    SmtpTemporaryFailure,
    SmtpTimeout,
)
from worker.oauth import read_token, xoauth2_response

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*")
_IDLE_CLOSE_S = 30.0


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
        self._slots: dict[str, threading.BoundedSemaphore] = {}

    def deliver(self, tenant_id: str, smtp: Smtp, message: Composed) -> Delivery:
        """Send one message to its envelope recipients; raises a classified ``PostboteError``."""
        with self._connection(tenant_id, smtp) as conn:
            return _transact(conn, message)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                _quit(conn.client)

    @contextmanager
    def _connection(self, tenant_id: str, smtp: Smtp) -> Iterator[_Connection]:
        with self._lock:
            slots = self._slots.setdefault(tenant_id, threading.BoundedSemaphore(smtp.max_connections))
        if not slots.acquire(timeout=self._timeout_s * 2):
            raise SmtpConnectionError(f"no free SMTP connection for tenant {tenant_id!r}")
        try:
            conn = self._take_idle(tenant_id) or self._open(tenant_id, smtp)
            try:
                yield conn
            except BaseException:
                _quit(conn.client)
                raise
            conn.sent += 1
            conn.last_used = time.monotonic()
            if conn.sent >= smtp.max_messages_per_connection:
                _quit(conn.client)
            else:
                with self._lock:
                    self._idle.setdefault(tenant_id, []).append(conn)
        finally:
            slots.release()

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


def _transact(conn: _Connection, message: Composed) -> Delivery:
    """MAIL, RCPT, DATA; a 452 for too many recipients continues in a further transaction."""
    client = conn.client
    options = ["SMTPUTF8"] if message.smtputf8 else []
    if message.smtputf8 and not client.has_extn("smtputf8"):
        raise SmtpRejected(
            "an address has a non-ASCII local part and the server does not offer SMTPUTF8",
            reason="smtputf8_unsupported",
        )
    if "size" in client.esmtp_features:
        options.append(f"SIZE={len(message.data)}")
    pending = list(message.recipients)
    accepted: list[str] = []
    refused: dict[str, SmtpReply] = {}
    reply: SmtpReply | None = None
    batch: list[str] = []
    stage = "MAIL FROM"
    try:
        while pending:
            if accepted or refused:
                client.rset()
            stage = "MAIL FROM"
            _expect(client.mail(message.mail_from, options), stage, client)
            batch = []
            stage = "RCPT TO"
            while pending:
                rcpt = pending[0]
                answer = SmtpReply.parse(*client.rcpt(rcpt))
                if answer.code == 452 and batch:
                    break
                pending.pop(0)
                if answer.code in (250, 251):
                    batch.append(rcpt)
                elif answer.code == 421:
                    raise _classify(answer, stage)
                else:
                    refused[rcpt] = answer
            if not batch:
                continue
            stage = "DATA"
            code, text = _send_data(client, message.data)
            reply = _expect((code, text), stage, client)
            accepted.extend(batch)
            batch = []
    except (OSError, smtplib.SMTPException, SmtpTemporaryFailure, SmtpRejected) as e:
        error = _translate(e, stage)
        if not accepted:
            raise error from e
        # An earlier transaction (after a 452) went through: resending would duplicate it,
        # so the recipients not reached are recorded as refused instead.
        lost = SmtpReply(0, None, str(error))
        refused.update({rcpt: lost for rcpt in [*batch, *pending]})
        assert reply is not None
    if reply is None:
        transient = [r for r in refused.values() if r.code < 500]
        worst = transient[0] if transient else next(iter(refused.values()))
        summary = "; ".join(f"{a}: {r}" for a, r in refused.items())
        if transient:
            raise SmtpTemporaryFailure(f"no recipient accepted: {summary}", smtp_reply=str(worst))
        raise SmtpRejected(
            f"every recipient refused: {summary}", reason="recipients_refused", smtp_reply=str(worst)
        )
    return Delivery(tuple(accepted), refused, reply, conn.tls_version, conn.auth_method)


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


__all__ = ["Delivery", "SmtpPool", "SmtpReply", "open_connection"]
