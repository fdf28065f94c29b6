"""Troubleshooting hints for a test mail, matched to how it failed and to the tenant's settings.

The hints name settings and provider switches, never secrets: only the
error's text (which carries no password or token), the host, port, user and
addresses go into them.
"""

from __future__ import annotations

import re
import socket
import ssl

from schemas.tenant import Smtp
from worker.errors import (
    ConfigurationError,
    OAuthTokenInvalid,
    OAuthTokenUnavailable,
    PermanentError,
    PostboteError,
    RecipientsRefused,
    SenderNotPermitted,
    SmtpAuthFailed,
    SmtpAuthUnavailable,
    SmtpConnectionError,
    StartTlsUnavailable,
    TlsVerifyFailed,
    TransientError,
)
from worker.job.accounts import Account

_SENDER_REPLY = re.compile(r"sender|send ?as|from address|not owned|5\.7\.60|5\.1\.[78]\b", re.IGNORECASE)
_AUTHENTICITY_REPLY = re.compile(r"dkim|dmarc|spf|unauthenticated|5\.7\.2[5-7]\b|5\.7\.515", re.IGNORECASE)
_MICROSOFT = re.compile(r"(^|\.)(office365\.com|outlook\.com|office\.com|hotmail\.com)$", re.IGNORECASE)
_GOOGLE = re.compile(r"(^|\.)(gmail\.com|googlemail\.com|google\.com)$", re.IGNORECASE)

_M365_SMTP_AUTH = (
    "Microsoft 365: SMTP AUTH must be enabled for the mailbox (admin center > Users > Mail >"
    " Manage email apps > Authenticated SMTP) and not switched off for the whole organisation;"
    " use smtp.office365.com port 587 with security: starttls"
)
_M365_PASSWORD = (
    "Microsoft 365 with Security Defaults or basic authentication disabled refuses every"
    " password: use auth: xoauth2 with a token for https://outlook.office.com/SMTP.Send"
)
_GMAIL_PASSWORD = (
    "Gmail / Google Workspace refuses the account password: use an app password"
    " (needs 2-step verification) or auth: xoauth2 with a token for https://mail.google.com/"
)
_M365_LIMITS = "Microsoft 365 accepts 30 mails per minute and 3 connections at once per mailbox"


def failure_hints(error: PostboteError, account: Account, *, sender: str) -> tuple[str, ...]:
    """Concrete next steps for ``error``; the most specific first."""
    smtp = account.smtp
    reply = (error.smtp_reply if isinstance(error, TransientError | PermanentError) else None) or ""
    if isinstance(error, SenderNotPermitted):
        hints = _sender_hints(account, sender)
    elif isinstance(error, TlsVerifyFailed):
        hints = _certificate_hints(smtp)
    elif isinstance(error, StartTlsUnavailable):
        hints = [
            f"{smtp.host}:{smtp.port} offers no STARTTLS; postbote does not fall back to plaintext",
            *_port_hints(smtp, always=True),
        ]
    elif isinstance(error, SmtpAuthFailed):
        hints = _auth_hints(smtp, error, reply)
    elif isinstance(error, OAuthTokenUnavailable | OAuthTokenInvalid):
        hints = _token_hints(smtp)
    elif isinstance(error, SmtpConnectionError):
        hints = [*_connection_hints(error, smtp), *_port_hints(smtp, always=True)]
    elif isinstance(error, ConfigurationError):
        hints = [
            "fix the tenant setting named above in the tenant file and load it with 'postbote tenants apply'"
        ]
    elif isinstance(error, RecipientsRefused):
        hints = [
            "the server refused the recipient: check the address; 'relay access denied' means the"
            " server does not accept mail for other domains from this client, so log in (smtp.user)"
        ]
    elif isinstance(error, TransientError):
        hints = [
            "the server refused for now (4xx); the worker retries such failures with backoff",
            _M365_LIMITS,
        ]
    else:
        hints = []
    if not isinstance(error, SenderNotPermitted) and _SENDER_REPLY.search(reply):
        hints.extend(_sender_hints(account, sender))
    if _AUTHENTICITY_REPLY.search(reply):
        hints.append(_dkim_hint(account))
    if not hints:
        hints.append(f"the server's answer is above; {_dkim_hint(account)}")
    return tuple(dict.fromkeys(hints))


def success_notes(account: Account, *, signed: bool) -> tuple[str, ...]:
    """What is worth knowing although the mail went out."""
    notes = []
    if signed:
        notes.append(f"check the published DKIM record with: postbote dkim check --tenant {account.id}")
    else:
        notes.append(
            "not DKIM-signed: the tenant has no dkim settings; Gmail and Microsoft junk or refuse"
            " unsigned mail from many domains (postbote dkim keygen, docs/dkim.md)"
        )
    if account.smtp.security == "none":
        notes.append("sent without TLS (security: none): meant for a local relay only")
    return tuple(notes)


def _port_hints(smtp: Smtp, *, always: bool = False) -> list[str]:
    hints = []
    if smtp.port == 465 and smtp.security != "ssl":
        hints.append("port 465 speaks TLS from the first byte: set security: ssl")
    elif smtp.port == 587 and smtp.security == "ssl":
        hints.append("port 587 starts in plaintext and upgrades: set security: starttls")
    elif smtp.port == 25 and smtp.security != "none":
        hints.append("port 25 is for relaying between servers and often blocked; submission is port 587")
    if always:
        hints.append("mail submission is port 587 with security: starttls, or port 465 with security: ssl")
    return hints


def _certificate_hints(smtp: Smtp) -> list[str]:
    trusted = f"the CA in ca_file {smtp.ca_file}" if smtp.ca_file else "the system's CA certificates"
    return [
        f"the certificate of {smtp.host} does not verify against {trusted}; nothing was sent and no"
        " login was attempted (postbote never sends without verifying)",
        "a server with a certificate from a private CA needs smtp.ca_file: the CA certificate (PEM)",
        f"the certificate must name the host as configured ({smtp.host}): use the name in the"
        " certificate, not an IP address or an alias",
    ]


def _auth_hints(smtp: Smtp, error: SmtpAuthFailed, reply: str) -> list[str]:
    hints: list[str] = []
    if isinstance(error, SmtpAuthUnavailable):
        if smtp.security == "none":
            hints.append("servers offer AUTH only over TLS: use port 587 with security: starttls")
        if smtp.auth == "xoauth2":
            hints.append(
                "the server does not offer XOAUTH2: use the provider's submission server"
                " (smtp.office365.com or smtp.gmail.com, port 587) or auth: password"
            )
        hints.append(
            f"check that {smtp.host} is the provider's submission server, not an MX or a relay without login"
        )
        return hints
    microsoft = bool(_MICROSOFT.search(smtp.host)) or "5.7.139" in reply
    google = bool(_GOOGLE.search(smtp.host)) or "5.7.9" in reply or reply.startswith("534")
    if "5.7.139" in reply:
        hints.append(
            "the server says SMTP AUTH is disabled for this mailbox or organisation (Microsoft 365 5.7.139)"
        )
    if google and ("5.7.9" in reply or reply.startswith("534")):
        hints.append("the server wants an app-specific password (Gmail 534 5.7.9)")
    if smtp.auth == "xoauth2":
        hints.append(
            f"the access token was refused: it may have expired (refresh token_file before expiry,"
            f" usually hourly; a token_helper must print a fresh token) or belong to another account than {smtp.user}"
        )
        if microsoft or not google:
            hints.append(
                "Microsoft 365: the token needs the scope https://outlook.office.com/SMTP.Send and the"
                " mailbox needs SMTP AUTH enabled, OAuth or not"
            )
        if google or not microsoft:
            hints.append("Gmail: the token needs the scope https://mail.google.com/")
        return hints
    hints.append(
        f"check smtp.user ({smtp.user}) and the password or password_file; the user is usually the full mailbox address"
    )
    if microsoft or not google:
        hints.extend([_M365_SMTP_AUTH, _M365_PASSWORD])
    if google or not microsoft:
        hints.append(_GMAIL_PASSWORD)
    return hints


def _token_hints(smtp: Smtp) -> list[str]:
    if smtp.token_file is not None:
        return [
            f"token_file {smtp.token_file} must hold only a current access token, readable by the"
            " user postbote runs as; whatever refreshes it must replace it before the token expires"
        ]
    return [
        f"run the operator's token helper {smtp.token_helper!r} (POSTBOTE_TOKEN_HELPERS) by hand as the user"
        " postbote runs as, with POSTBOTE_SMTP_USER set and no other environment: it must exit 0"
        " in time and print only the access token on standard output"
    ]


def _connection_hints(error: PostboteError, smtp: Smtp) -> list[str]:
    where = f"{smtp.host}:{smtp.port}"
    causes = _causes(error)
    if any(isinstance(c, socket.gaierror) for c in causes):
        return [f"the host name {smtp.host} does not resolve: check smtp.host and DNS"]
    if any(isinstance(c, ConnectionRefusedError) for c in causes):
        return [
            f"nothing accepts connections at {where}: check smtp.host, smtp.port and that the server runs"
        ]
    if any(isinstance(c, TimeoutError) for c in causes):
        return [
            f"{where} did not answer in time: check smtp.host and smtp.port; a firewall may drop"
            " outgoing SMTP (many hosters block ports 25, 465 and 587)"
        ]
    if any(isinstance(c, ssl.SSLError) for c in causes):
        return [
            f"the TLS handshake with {where} failed: the port may not speak TLS"
            f" the way security: {smtp.security} expects"
        ]
    return [f"the connection to {where} failed: check smtp.host, smtp.port and the firewall"]


def _causes(error: BaseException) -> list[BaseException]:
    """The chain of exceptions behind ``error`` (explicit causes and implicit contexts)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not c for c in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _sender_hints(account: Account, sender: str) -> list[str]:
    user = account.smtp.user or "the SMTP account"
    return [
        f"{sender} must be an address {user} may send as at the provider (Microsoft 365: 'Send As'"
        " permission; Gmail: 'Send mail as' alias), and a permitted sender in postbote: the SMTP user,"
        " an employee's own address, or granted to an employee or group in the tenant file",
    ]


def _dkim_hint(account: Account) -> str:
    if account.dkim is None:
        return "receivers check DKIM, SPF and DMARC: give the tenant dkim settings (docs/dkim.md) and publish the record"
    return (
        f"receivers check DKIM, SPF and DMARC: verify the DNS record with"
        f" 'postbote dkim check --tenant {account.id}' and that SPF allows the SMTP server"
    )


__all__ = ["failure_hints", "success_notes"]
