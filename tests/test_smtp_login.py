"""SMTP login against a real aiosmtpd server: TLS that verifies, one password mechanism, XOAUTH2 tokens."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from schemas.tenant import Smtp
from tests.support.auth_sinks import PASSWORD, TOKEN, USER, attempts, certificates, running
from worker.errors import ConfigurationError, PostboteError, SmtpRejected, TransientError
from worker.job.compose import Composed
from worker.job.smtp import Delivery, SmtpPool, oauth
from worker.testbed.sink import Sink, free_port

MESSAGE = Composed(
    data=b"From: mailer@acme.example\r\nTo: kunde@example.com\r\nSubject: Test\r\n\r\nHallo\r\n",
    mail_from=USER,
    recipients=("kunde@example.com",),
    message_id="<test@acme.example>",
    smtputf8=False,
)


def deliver(sink: Sink, **fields: Any) -> Delivery:
    return deliver_to(sink.port, **fields)


def deliver_to(
    port: int, *, helper: str | None = None, helper_timeout_s: float = 30.0, **fields: Any
) -> Delivery:
    """Send through a pool; ``helper`` is the operator's token command the tenant names as ``token_helper``."""
    helpers = oauth.TokenHelpers({"helper": helper}, helper_timeout_s) if helper is not None else None
    if helper is not None:
        fields["token_helper"] = "helper"
    pool = SmtpPool(timeout_ms=5000, token_helpers=helpers)
    try:
        return pool.deliver("acme", Smtp(host="127.0.0.1", port=port, user=USER, **fields), MESSAGE)
    finally:
        pool.close()


def refused(sink: Sink, **fields: Any) -> PostboteError:
    with pytest.raises(PostboteError) as caught:
        deliver(sink, **fields)
    return caught.value


def test_a_password_login_after_starttls_reports_the_tls_version_and_the_one_mechanism_used(
    tmp_path: Path,
) -> None:
    tls = certificates(tmp_path)
    with running(tmp_path, tls=tls) as sink:
        delivery = deliver(sink, security="starttls", password=PASSWORD, ca_file=str(tls.ca_file))
        assert delivery.tls_version in ("TLSv1.2", "TLSv1.3")
        assert delivery.auth_method == "PLAIN"
        assert delivery.reply.code == 250
        assert attempts(sink) == [("PLAIN", USER, True)]
        assert [r.mail_from for r in sink.handler.received] == [USER]


def test_implicit_tls_on_the_submissions_port_logs_in_as_well(tmp_path: Path) -> None:
    tls = certificates(tmp_path)
    with running(tmp_path, tls=tls, implicit_tls=True) as sink:
        delivery = deliver(sink, security="ssl", password=PASSWORD, ca_file=str(tls.ca_file))
    assert delivery.tls_version in ("TLSv1.2", "TLSv1.3")
    assert delivery.auth_method == "PLAIN"


def test_a_wrong_password_is_refused_permanently_after_a_single_attempt(tmp_path: Path) -> None:
    tls = certificates(tmp_path)
    with running(tmp_path, tls=tls) as sink:
        error = refused(sink, security="starttls", password="wrong-" + PASSWORD, ca_file=str(tls.ca_file))
        assert attempts(sink) == [("PLAIN", USER, False)]
    assert isinstance(error, SmtpRejected)
    assert error.reason == "smtp_auth_failed"
    assert error.smtp_reply is not None and error.smtp_reply.startswith("535")
    assert PASSWORD not in str(error)


def test_a_certificate_that_does_not_verify_ends_the_attempt_before_any_login(tmp_path: Path) -> None:
    with running(tmp_path, tls=certificates(tmp_path)) as sink:
        error = refused(sink, security="starttls", password=PASSWORD)
        assert attempts(sink) == []
        assert sink.handler.received == []
    assert error.reason == "tls_verify_failed"


def test_xoauth2_with_a_token_file_sends_exactly_the_sasl_string_providers_expect(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    tls = certificates(tmp_path)
    with running(tmp_path, tls=tls) as sink:
        delivery = deliver(
            sink, security="starttls", auth="xoauth2", token_file=str(token_file), ca_file=str(tls.ca_file)
        )
        assert attempts(sink) == [("XOAUTH2", USER, True)]
    assert delivery.auth_method == "XOAUTH2"


def test_xoauth2_with_a_token_helper_uses_what_the_operators_command_prints(tmp_path: Path) -> None:
    with running(tmp_path) as sink:
        delivery = deliver(sink, security="none", auth="xoauth2", helper=f"echo '{TOKEN}'")
        assert attempts(sink) == [("XOAUTH2", USER, True)]
    assert delivery.auth_method == "XOAUTH2"


def test_a_refused_token_fails_permanently_with_the_servers_error_but_never_the_token(tmp_path: Path) -> None:
    stale = "ya29.STALE-0000_token"
    with running(tmp_path) as sink:
        error = refused(sink, security="none", auth="xoauth2", helper=f"echo {stale}")
        assert attempts(sink) == [("XOAUTH2", USER, False)]
    assert isinstance(error, SmtpRejected)
    assert error.reason == "smtp_auth_failed"
    assert '"status": "401"' in str(error)
    assert stale not in str(error)
    assert TOKEN not in str(error)


def test_a_failing_token_helper_is_transient_and_is_run_before_connecting(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TransientError) as caught:
        deliver_to(
            free_port(),
            security="none",
            auth="xoauth2",
            helper="echo 'refresh token expired' >&2; exit 3",
        )
    assert caught.value.reason == "oauth_token_unavailable"
    assert "status 3" in str(caught.value)
    assert "refresh token expired" in capfd.readouterr().err


def test_a_hanging_token_helper_is_stopped_with_its_children(tmp_path: Path) -> None:
    started = time.monotonic()
    with running(tmp_path) as sink, pytest.raises(TransientError) as caught:
        deliver(sink, security="none", auth="xoauth2", helper=f"sleep 30; echo {TOKEN}", helper_timeout_s=0.5)
    assert caught.value.reason == "oauth_token_unavailable"
    assert time.monotonic() - started < 10


def test_a_token_helper_printing_json_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with running(tmp_path) as sink, pytest.raises(ConfigurationError) as caught:
        deliver(sink, security="none", auth="xoauth2", helper=f"""echo '{{"access_token": "{TOKEN}"}}'""")
    assert caught.value.reason == "oauth_token_invalid"
    assert TOKEN not in str(caught.value)


def test_a_server_that_offers_no_auth_is_a_permanent_failure_not_a_connection_problem(sink: Sink) -> None:
    error = refused(sink, security="none", password=PASSWORD)
    assert isinstance(error, SmtpRejected)
    assert error.reason == "smtp_auth_unavailable"
    assert "offers no AUTH on this unencrypted connection" in str(error)


def test_a_token_helper_runs_without_the_workers_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POSTBOTE_DATABASE_URL", "postgresql://postbote:geheim@db/postbote")
    seen = tmp_path / "env"
    with running(tmp_path) as sink:
        deliver(sink, security="none", auth="xoauth2", helper=f"env > {seen}; echo '{TOKEN}'")
    env = dict(line.split("=", 1) for line in seen.read_text().splitlines() if "=" in line)
    assert "geheim" not in seen.read_text()
    assert env["POSTBOTE_SMTP_USER"] == USER
    assert not {k for k in env if k.startswith("POSTBOTE_")} - {"POSTBOTE_SMTP_USER"}


def test_a_token_helper_printing_without_end_is_stopped_at_the_output_limit(tmp_path: Path) -> None:
    started = time.monotonic()
    with running(tmp_path) as sink:
        with pytest.raises(TransientError) as caught:
            deliver(sink, security="none", auth="xoauth2", helper="yes", helper_timeout_s=20)
        assert attempts(sink) == []
    assert f"more than {oauth.MAX_TOKEN_OUTPUT_BYTES} bytes" in str(caught.value)
    assert time.monotonic() - started < 15


def test_a_token_helper_the_operator_did_not_configure_is_a_configuration_error(sink: Sink) -> None:
    pool = SmtpPool(timeout_ms=5000, token_helpers=oauth.TokenHelpers({"other": "true"}))
    smtp = Smtp(
        host="127.0.0.1", port=sink.port, user=USER, security="none", auth="xoauth2", token_helper="nope"
    )
    try:
        with pytest.raises(ConfigurationError, match="not one of this host's POSTBOTE_TOKEN_HELPERS"):
            pool.deliver("acme", smtp, MESSAGE)
    finally:
        pool.close()
