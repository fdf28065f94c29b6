"""OAuth2 access tokens for SMTP XOAUTH2: read from a file or printed by an operator's token helper.

postbote never talks to an identity provider itself. A token file is kept
fresh by something else (a sidecar, a cron job); a token helper is a command the
operator configured by name (``POSTBOTE_TOKEN_HELPERS``; a tenant file only names it),
run for every new SMTP connection, that must print a currently valid access token.
It runs without the worker's environment (no database or broker URL reaches it), with
a timeout and a limit on what it may print.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.tenant import Smtp
from worker.errors import ConfigurationError, OAuthTokenInvalid, OAuthTokenUnavailable

TOKEN_COMMAND_TIMEOUT_S = 30.0
MAX_TOKEN_OUTPUT_BYTES = 64 * 1024
"""The most a token helper may print: a JWT access token is a few KiB."""

# RFC 6750 b64token: what a bearer token may consist of (JWTs and Google's ya29.… fit).
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
_HELPER_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class TokenHelpers:
    """The operator's token commands by name (``POSTBOTE_TOKEN_HELPERS``) and how long one may run."""

    commands: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = TOKEN_COMMAND_TIMEOUT_S


def read_token(smtp: Smtp, helpers: TokenHelpers | None = None) -> str:
    """The access token from ``smtp.token_file`` or the token helper ``smtp.token_helper`` names.

    The token is never part of an error message; the helper's standard error is
    passed through (to the worker log or the terminal), its standard output is the token.

    Raises:
      OAuthTokenUnavailable: the file cannot be read or is
        empty, the helper fails or times out; a refresh may fix it.
      OAuthTokenInvalid: what was read is not one bearer token.
      ConfigurationError: the helper named is not configured on this host.
    """
    if smtp.token_file is not None:
        source = f"token_file {smtp.token_file}"
        try:
            raw = smtp.token_file.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise _unavailable(f"cannot read {source}: {e.strerror}") from None
    elif smtp.token_helper is not None:
        source = f"token_helper {smtp.token_helper}"
        configured = helpers or TokenHelpers()
        command = configured.commands.get(smtp.token_helper)
        if command is None:
            raise ConfigurationError(
                f"token_helper {smtp.token_helper!r} is not one of this host's POSTBOTE_TOKEN_HELPERS"
            )
        raw = run_token_helper(command, source=source, user=smtp.user or "", timeout_s=configured.timeout_s)
    else:
        raise ConfigurationError("auth xoauth2 needs token_file or token_helper")
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


def run_token_helper(command: str, *, source: str, user: str, timeout_s: float) -> str:
    """Run an operator's token command (``/bin/sh -c``) and return what it printed.

    Its environment holds only ``PATH``, ``HOME``, ``LANG`` and ``POSTBOTE_SMTP_USER``; it is
    stopped, with its children, after ``timeout_s`` or once it printed more than
    ``MAX_TOKEN_OUTPUT_BYTES``.
    """
    env = {"PATH": _HELPER_PATH, "LANG": "C.UTF-8", "POSTBOTE_SMTP_USER": user}
    if "HOME" in os.environ:
        env["HOME"] = os.environ["HOME"]
    # Own process group: a stopped helper's children are killed too, or they would hold stdout open.
    process = subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert process.stdout is not None
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    problem = None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                problem = f"{source} did not finish within {timeout_s:g} s"
                break
            if not selector.select(left):
                continue
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if len(out) > MAX_TOKEN_OUTPUT_BYTES:
                problem = f"{source} printed more than {MAX_TOKEN_OUTPUT_BYTES} bytes"
                break
    if problem is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.stdout.close()
        process.wait()
        raise _unavailable(problem)
    process.stdout.close()
    try:
        returncode = process.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise _unavailable(f"{source} did not finish within {timeout_s:g} s") from None
    if returncode != 0:
        raise _unavailable(f"{source} exited with status {returncode} (its error output went to stderr)")
    return out.decode("utf-8", errors="replace")


def _unavailable(message: str) -> OAuthTokenUnavailable:
    return OAuthTokenUnavailable(f"no OAuth2 token: {message}")


__all__ = [
    "MAX_TOKEN_OUTPUT_BYTES",
    "TOKEN_COMMAND_TIMEOUT_S",
    "TokenHelpers",
    "read_token",
    "run_token_helper",
    "xoauth2_response",
]
