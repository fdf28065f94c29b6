"""OAuth2 access tokens for SMTP XOAUTH2: read from a file or printed by the operator's token helper.

postbote never talks to an identity provider itself. A token file is kept
fresh by something else (a sidecar, a cron job); a token command is run for
every new SMTP connection and must print a currently valid access token.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess

from schemas.tenant import Smtp
from worker.errors import ConfigurationError, OAuthTokenInvalid, OAuthTokenUnavailable

TOKEN_COMMAND_TIMEOUT_S = 30.0

# RFC 6750 b64token: what a bearer token may consist of (JWTs and Google's ya29.… fit).
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


def read_token(smtp: Smtp) -> str:
    """The access token from ``smtp.token_file`` or ``smtp.token_command``.

    The token is never part of an error message; the command's standard error is
    passed through (to the worker log or the terminal), its standard output is the token.

    Raises:
      OAuthTokenUnavailable: the file cannot be read or is
        empty, the command fails or times out; a refresh may fix it.
      OAuthTokenInvalid: what was read is not one bearer token.
    """
    if smtp.token_file is not None:
        source = f"token_file {smtp.token_file}"
        try:
            raw = smtp.token_file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise _unavailable(f"cannot read {source}: {e.strerror}") from None
    elif smtp.token_command is not None:
        source = "token_command"
        raw = _run_token_command(smtp.token_command)
    else:
        raise ConfigurationError("auth xoauth2 needs token_file or token_command")
    token = raw.strip()
    if not token:
        raise _unavailable(f"{source} gave an empty token")
    if not _BEARER_TOKEN.match(token):
        lines = len(token.splitlines())
        raise OAuthTokenInvalid(
            f"{source} did not give one bearer token ({len(token)} characters on {lines} line(s));"
            " it must give only the access token, without 'Bearer', quotes or JSON"
        )
    return token


def xoauth2_response(user: str, token: str) -> str:
    """The SASL XOAUTH2 initial client response (before base64), as Google and Microsoft define it."""
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def _run_token_command(command: str) -> str:
    # Own process group: a timed-out helper's children are killed too, or they would hold stdout open.
    process = subprocess.Popen(
        command,
        shell=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=TOKEN_COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise _unavailable(f"token_command did not finish within {TOKEN_COMMAND_TIMEOUT_S:g} s") from None
    if process.returncode != 0:
        raise _unavailable(
            f"token_command exited with status {process.returncode} (its error output went to stderr)"
        )
    return out


def _unavailable(message: str) -> OAuthTokenUnavailable:
    return OAuthTokenUnavailable(f"no OAuth2 token: {message}")


__all__ = ["TOKEN_COMMAND_TIMEOUT_S", "read_token", "xoauth2_response"]
