"""A sink that requires SMTP AUTH: PLAIN and LOGIN with a password, XOAUTH2 with a bearer token.

XOAUTH2 is answered as Gmail and Microsoft 365 answer it: the exact string
``user=U^Aauth=Bearer T^A^A`` is accepted; anything else gets a 334 challenge
carrying a JSON error, the client's empty reply, then 535.
"""

from __future__ import annotations

import binascii
import json
import ssl
import threading
from base64 import b64decode
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from worker.job.smtp.oauth import xoauth2_response
from worker.testbed.sink.server import RecordingHandler, Sink


@dataclass(frozen=True)
class SinkAccount:
    """The one login the sink accepts: ``password`` for PLAIN/LOGIN, ``token`` for XOAUTH2."""

    user: str
    password: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class AuthAttempt:
    mechanism: str
    login: str
    ok: bool


class AuthRecordingHandler(RecordingHandler):
    """Records messages like :class:`RecordingHandler` and every AUTH attempt in ``attempts``;
    refuses MAIL until the client has logged in."""

    def __init__(self, maildir: Path, account: SinkAccount) -> None:
        super().__init__(maildir)
        self.account = account
        self.attempts: list[AuthAttempt] = []
        self._attempts_lock = threading.Lock()

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd's ``authenticator`` for the built-in PLAIN and LOGIN mechanisms."""
        assert isinstance(auth_data, LoginPassword)
        ok = self.account.password is not None and auth_data == LoginPassword(
            self.account.user.encode(), self.account.password.encode()
        )
        self._record(mechanism, auth_data.login.decode("utf-8", "replace"), ok)
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        """The XOAUTH2 mechanism, found by aiosmtpd through its ``auth_<MECHANISM>`` name."""
        if len(args) == 2:
            try:
                response = b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            answer = await server.challenge_auth("")
            if answer is MISSING:
                return AuthResult(success=False, handled=True)
            assert isinstance(answer, bytes)
            response = answer
        login = _xoauth2_user(response)
        expected = (
            xoauth2_response(self.account.user, self.account.token).encode()
            if self.account.token is not None
            else None
        )
        ok = response == expected
        self._record("XOAUTH2", login, ok)
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(login.encode(), b""))
        error = {"status": "401", "schemes": "Bearer", "scope": "https://mail.google.com/"}
        if await server.challenge_auth(json.dumps(error)) is MISSING:
            return AuthResult(success=False, handled=True)
        return AuthResult(
            success=False, handled=False, message="535 5.7.8 Username and Password not accepted"
        )

    async def handle_MAIL(  # noqa: N802
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        """No mail without AUTH (in place of aiosmtpd's ``auth_required``, which warns without TLS)."""
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    def _record(self, mechanism: str, login: str, ok: bool) -> None:
        with self._attempts_lock:
            self.attempts.append(AuthAttempt(mechanism, login, ok))


def auth_sink(
    maildir: Path,
    account: SinkAccount,
    *,
    tls: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
) -> Sink:
    """Start a sink that accepts mail only after AUTH as ``account``.

    With ``tls`` it offers STARTTLS (required before AUTH and MAIL), or with
    ``implicit_tls`` speaks TLS from the first byte (port 465 style). Without
    ``tls`` it offers AUTH in the clear, as a local relay might.
    """
    handler = AuthRecordingHandler(maildir, account)
    options: dict[str, Any] = {"authenticator": handler.authenticate}
    if tls is not None and implicit_tls:
        # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; here every byte is encrypted anyway.
        options.update(ssl_context=tls, auth_require_tls=False)
    elif tls is not None:
        options.update(tls_context=tls, require_starttls=True, auth_require_tls=True)
    else:
        options["auth_require_tls"] = False
    return Sink(maildir, host=host, port=port, handler=handler, **options)


def _xoauth2_user(response: bytes) -> str:
    for part in response.split(b"\x01"):
        if part.startswith(b"user="):
            return part[5:].decode("utf-8", "replace")
    return ""


__all__ = ["AuthAttempt", "AuthRecordingHandler", "SinkAccount", "auth_sink"]
