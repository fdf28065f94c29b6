"""Shared by the login tests: the account the authenticating sink accepts and ways to start it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.testbed.sink import Sink
from worker.testbed.sink.auth import AuthRecordingHandler, SinkAccount, auth_sink
from worker.testbed.sink.tls import Certificates, make_certificates

USER = "mailer@acme.example"
PASSWORD = "Pw-7c1f-geheim!"
TOKEN = "ya29.a0TOKEN-5e2d_4711.secret"
ACCOUNT = SinkAccount(USER, password=PASSWORD, token=TOKEN)


@contextmanager
def running(tmp_path: Path, *, tls: Certificates | None = None, implicit_tls: bool = False) -> Iterator[Sink]:
    """An authenticating sink for ``ACCOUNT``: STARTTLS with ``tls``, implicit TLS, or AUTH in the clear."""
    sink = auth_sink(
        tmp_path / "auth-maildir",
        ACCOUNT,
        tls=tls.server_context() if tls else None,
        implicit_tls=implicit_tls,
    )
    try:
        yield sink
    finally:
        sink.stop()


def certificates(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


def attempts(sink: Sink) -> list[tuple[str, str, bool]]:
    """(mechanism, login, accepted) for every AUTH the sink saw."""
    assert isinstance(sink.handler, AuthRecordingHandler)
    return [(a.mechanism, a.login, a.ok) for a in sink.handler.attempts]


def smtp_settings(sink: Sink, **fields: Any) -> dict[str, Any]:
    """A tenant's ``smtp`` block pointing at ``sink``."""
    return {"host": sink.host, "port": sink.port, "user": USER, "helo": "test.postbote", **fields}


__all__ = ["ACCOUNT", "PASSWORD", "TOKEN", "USER", "attempts", "certificates", "running", "smtp_settings"]
