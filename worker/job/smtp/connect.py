"""Opening an SMTP connection: TLS that always verifies, EHLO with the tenant's name, login.

A failed certificate check ends the attempt before anything else is said.
"""

from __future__ import annotations

import functools
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass, field

from schemas.tenant import Smtp
from worker.errors import (
    ConfigurationError,
    SmtpAuthFailed,
    SmtpAuthUnavailable,
    SmtpConnectionError,
    SmtpTemporaryFailure,
    StartTlsUnavailable,
    TlsVerifyFailed,
)
from worker.job.smtp.oauth import TokenHelpers, read_token, xoauth2_response
from worker.job.smtp.replies import SmtpReply, _classify
from worker.library_internals import smtp_socket

# One mechanism per login: trying the next after a refusal counts as another failed
# login, and providers lock accounts after a few of those.
_PASSWORD_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
_AUTH_UNAVAILABLE_CODES = (502, 503, 504, 538)


@dataclass
class _Connection:
    client: smtplib.SMTP
    sent: int = 0
    last_used: float = field(default_factory=time.monotonic)
    tls_version: str | None = None
    auth_method: str | None = None
    settings: object = None
    """The pool's token for the tenant settings this connection was opened with."""


def open_connection(
    smtp: Smtp, *, timeout_s: float, token_helpers: TokenHelpers | None = None
) -> _Connection:
    """Connect, say EHLO, secure the link as configured and log in.

    TLS always verifies the certificate; ``security: none`` is the only plaintext mode.
    A failed verification ends the attempt before anything else is said.
    The password or token is read before connecting, so a missing secret costs no connection.
    """
    login = _login_for(smtp, token_helpers)
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
                    raise StartTlsUnavailable(f"{smtp.host}:{smtp.port} does not offer STARTTLS")
                client.starttls(context=context)
                client.ehlo()
            conn = _Connection(client)
            sock = smtp_socket(client)
            if isinstance(sock, ssl.SSLSocket):
                conn.tls_version = sock.version()
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
        raise TlsVerifyFailed(f"TLS certificate of {smtp.host} does not verify: {e.verify_message}") from e
    except smtplib.SMTPResponseException as e:
        raise _classify(SmtpReply.parse(e.smtp_code, e.smtp_error), "connect") from e
    except (OSError, smtplib.SMTPException) as e:
        raise SmtpConnectionError(f"cannot talk to {smtp.host}:{smtp.port}: {e or type(e).__name__}") from e


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


@functools.lru_cache(maxsize=32)
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    """A verifying context per CA bundle, built once: loading the CA store takes milliseconds."""
    return ssl.create_default_context(cafile=cafile)


@functools.lru_cache(maxsize=1)
def _fqdn() -> str:
    return socket.getfqdn()


def _login_for(smtp: Smtp, token_helpers: TokenHelpers | None) -> _Login | None:
    if smtp.user is None:
        return None
    if smtp.auth == "xoauth2":
        return _Login(smtp.user, read_token(smtp, token_helpers), xoauth2=True)
    return _Login(smtp.user, _password(smtp), xoauth2=False)


def _authenticate(client: smtplib.SMTP, smtp: Smtp, login: _Login) -> str:
    """AUTH with the first mechanism both sides know; returns its name.

    Raises ``SmtpAuthUnavailable`` when the server offers no usable mechanism,
    ``SmtpAuthFailed`` when it refuses the credentials, or ``SmtpTemporaryFailure``.
    """
    where = f"{smtp.host}:{smtp.port}"
    offered = client.esmtp_features.get("auth", "").upper().split()
    wanted = ("XOAUTH2",) if login.xoauth2 else _PASSWORD_MECHANISMS
    mechanism = next((m for m in wanted if m in offered), None)
    if mechanism is None:
        has = f"offers AUTH {' '.join(offered)}" if offered else "offers no AUTH"
        plain = " on this unencrypted connection" if smtp.security == "none" else ""
        raise SmtpAuthUnavailable(
            f"{where} {has}{plain}, not {' or '.join(wanted)}; cannot log in as {login.user}"
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
    refused = SmtpAuthUnavailable if code in _AUTH_UNAVAILABLE_CODES else SmtpAuthFailed
    raise refused(detail, smtp_reply=str(reply))


def _password(smtp: Smtp) -> str:
    if smtp.password is not None:
        return smtp.password.get_secret_value()
    if smtp.password_file is not None:
        try:
            return smtp.password_file.read_text().strip()
        except OSError as e:
            raise ConfigurationError(f"cannot read password_file {smtp.password_file}: {e.strerror}") from e
    raise ConfigurationError("SMTP user is set but neither password nor password_file")


"""The name ``pool.py`` imports it by."""


def _quit(client: smtplib.SMTP) -> None:
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        client.close()
