"""``postbote test-mail``: one mail through the tenant's account now, the outcome, hints that fit the failure."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.auth_sinks import PASSWORD, TOKEN, USER, attempts, certificates, running, smtp_settings
from tests.support.dkim import dkimpy_verify
from tests.support.services import helper_token_file, postbote
from tests.support.smtp import received_messages
from worker.settings import Settings
from worker.testbed.sink import Sink, free_port
from worker.tools.dkim_keys import dns_record, generate_private_key, private_key_pem

MakeTenant = Callable[..., str]


def run_test_mail(
    settings: Settings, tenant: str, *args: str, to: str = "kunde@example.com"
) -> subprocess.CompletedProcess[str]:
    return postbote(settings, "test-mail", "--tenant", tenant, "--to", to, *args)


def outcome(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def printed(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def test_a_test_mail_through_the_plaintext_sink_arrives_with_the_printed_message_id(
    settings: Settings, sink: Sink, make_tenant: MakeTenant
) -> None:
    tenant = make_tenant()
    result = run_test_mail(settings, tenant, "--from", "anna@acme.example")
    assert result.returncode == 0, printed(result)
    assert "result: SENT" in result.stdout
    [(record, message)] = received_messages(sink)
    assert record.mail_from == "anna@acme.example"
    assert record.rcpt_tos == ["kunde@example.com"]
    assert message["Subject"] == f"postbote test mail ({tenant})"
    assert f"Message-ID  {message['Message-ID']}" in result.stdout
    assert "sent without TLS" in result.stdout


def test_over_starttls_with_the_tenants_ca_file_it_reports_tls_version_and_auth_and_sends_as_the_smtp_user(
    settings: Settings, make_tenant: MakeTenant, tmp_path: Path
) -> None:
    tls = certificates(tmp_path)
    password_file = tmp_path / "smtp-password"
    password_file.write_text(PASSWORD + "\n")
    with running(tmp_path, tls=tls) as auth_sink:
        tenant = make_tenant(
            smtp=smtp_settings(
                auth_sink, security="starttls", password_file=str(password_file), ca_file=str(tls.ca_file)
            ),
            archive_bcc="archiv@acme.example",
        )
        result = run_test_mail(settings, tenant, "--json")
        assert result.returncode == 0, printed(result)
        [(record, _)] = received_messages(auth_sink)
    sent = outcome(result)
    assert sent["sent"] is True
    assert sent["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert sent["auth_method"] == "PLAIN"
    assert sent["reply"].startswith("250")
    assert sent["server"] == f"127.0.0.1:{auth_sink.port}"
    assert sent["sender"] == USER
    assert sent["dkim_signed"] is False
    assert record.mail_from == USER
    assert record.rcpt_tos == ["kunde@example.com"], "the archive address gets no test mail"


def test_a_tenant_with_dkim_gets_a_signed_test_mail_that_verifies(
    settings: Settings, sink: Sink, make_tenant: MakeTenant, tmp_path: Path
) -> None:
    key = generate_private_key("rsa", 2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(private_key_pem(key))
    tenant = make_tenant(
        dkim={"domain": "acme.example", "selector": "s2026", "private_key_file": str(key_file)}
    )
    result = run_test_mail(settings, tenant, "--from", "anna@acme.example")
    assert result.returncode == 0, printed(result)
    assert "DKIM        signed (d=acme.example s=s2026)" in result.stdout
    assert f"postbote dkim check --tenant {tenant}" in result.stdout
    [(record, _)] = received_messages(sink)
    raw = (sink.handler.maildir / record.file).read_bytes()
    assert dkimpy_verify(raw, dns_record("acme.example", "s2026", key)) == [True]


def test_a_wrong_password_fails_with_the_smtp_auth_hints_and_never_prints_the_password(
    settings: Settings, make_tenant: MakeTenant, tmp_path: Path
) -> None:
    tls = certificates(tmp_path)
    wrong = "Falsch-9f3e-passwort"
    with running(tmp_path, tls=tls) as auth_sink:
        tenant = make_tenant(
            smtp=smtp_settings(auth_sink, security="starttls", password=wrong, ca_file=str(tls.ca_file))
        )
        result = run_test_mail(settings, tenant)
        assert attempts(auth_sink) == [("PLAIN", USER, False)]
        assert auth_sink.handler.received == []
    assert result.returncode == 1
    assert "smtp_auth_failed" in result.stdout
    assert "535" in result.stdout
    assert "SMTP AUTH must be enabled for the mailbox" in result.stdout
    assert "app password" in result.stdout
    assert wrong not in printed(result)
    assert PASSWORD not in printed(result)


def test_a_certificate_that_does_not_verify_fails_closed_with_the_ca_file_hint(
    settings: Settings, make_tenant: MakeTenant, tmp_path: Path
) -> None:
    with running(tmp_path, tls=certificates(tmp_path)) as auth_sink:
        tenant = make_tenant(smtp=smtp_settings(auth_sink, security="starttls", password=PASSWORD))
        result = run_test_mail(settings, tenant, "--json")
        assert attempts(auth_sink) == [], "no login over an unverified connection"
        assert auth_sink.handler.received == []
    failed = outcome(result)
    assert result.returncode == 1
    assert failed["reason"] == "tls_verify_failed"
    assert any("smtp.ca_file" in hint for hint in failed["hints"])
    assert PASSWORD not in printed(result)


def test_a_closed_port_gets_a_hint_naming_host_and_port(settings: Settings, make_tenant: MakeTenant) -> None:
    port = free_port()
    tenant = make_tenant(smtp={"host": "127.0.0.1", "port": port, "security": "starttls"})
    result = run_test_mail(settings, tenant, "--from", "anna@acme.example", "--json")
    failed = outcome(result)
    assert result.returncode == 1
    assert failed["reason"] == "smtp_connection"
    assert f"nothing accepts connections at 127.0.0.1:{port}" in failed["hints"][0]
    assert any("587 with security: starttls" in hint for hint in failed["hints"])


def test_a_server_without_starttls_is_refused_with_the_port_hints(
    settings: Settings, sink: Sink, make_tenant: MakeTenant
) -> None:
    tenant = make_tenant(smtp={"host": sink.host, "port": sink.port, "security": "starttls"})
    result = run_test_mail(settings, tenant, "--from", "anna@acme.example")
    assert result.returncode == 1
    assert "starttls_unavailable" in result.stdout
    assert "port 465 with security: ssl" in result.stdout
    assert sink.handler.received == []


def test_xoauth2_with_a_token_file_and_with_a_token_helper_sends(
    settings: Settings, make_tenant: MakeTenant, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    helper_token_file(settings).write_text(TOKEN + "\n")
    tls = certificates(tmp_path)
    with running(tmp_path, tls=tls) as auth_sink:
        sources = [{"token_file": str(token_file)}, {"token_helper": "test-token"}]
        for source in sources:
            tenant = make_tenant(
                smtp=smtp_settings(
                    auth_sink, security="starttls", auth="xoauth2", ca_file=str(tls.ca_file), **source
                )
            )
            result = run_test_mail(settings, tenant, "--json")
            assert result.returncode == 0, printed(result)
            assert outcome(result)["auth_method"] == "XOAUTH2"
            assert TOKEN not in printed(result)
        assert attempts(auth_sink) == [("XOAUTH2", USER, True)] * 2
        assert len(auth_sink.handler.received) == 2


def test_a_refused_token_fails_permanently_with_the_token_hints_and_never_prints_it(
    settings: Settings, make_tenant: MakeTenant, tmp_path: Path
) -> None:
    expired = "ya29.EXPIRED-77aa_token"
    helper_token_file(settings).write_text(expired)
    with running(tmp_path) as auth_sink:
        tenant = make_tenant(
            smtp=smtp_settings(auth_sink, security="none", auth="xoauth2", token_helper="test-token")
        )
        result = run_test_mail(settings, tenant)
        assert attempts(auth_sink) == [("XOAUTH2", USER, False)]
    assert result.returncode == 1
    assert "smtp_auth_failed" in result.stdout
    assert "https://outlook.office.com/SMTP.Send" in result.stdout
    assert "https://mail.google.com/" in result.stdout
    assert expired not in printed(result)


def test_a_from_address_the_tenant_may_not_use_is_refused_before_connecting(
    settings: Settings, sink: Sink, make_tenant: MakeTenant
) -> None:
    tenant = make_tenant()
    result = run_test_mail(settings, tenant, "--from", "boss@acme.example")
    assert result.returncode == 1
    assert "sender_not_permitted" in result.stdout
    assert "permitted: anna@acme.example" in result.stdout
    assert "granted to an employee or group in the tenant file" in result.stdout
    assert sink.handler.received == []


def test_a_from_address_granted_to_a_group_is_accepted(
    settings: Settings, sink: Sink, make_tenant: MakeTenant
) -> None:
    tenant = make_tenant(
        groups=[{"id": "accounting", "senders": ["rechnung@acme.example"]}],
        employees=[{"id": "u1", "email": "anna@acme.example", "group": "accounting"}],
    )
    result = run_test_mail(settings, tenant, "--from", "rechnung@acme.example")
    assert result.returncode == 0, printed(result)
    [(record, _)] = received_messages(sink)
    assert record.mail_from == "rechnung@acme.example"


def test_bad_input_exits_2_with_a_clear_message(settings: Settings, make_tenant: MakeTenant) -> None:
    unknown = run_test_mail(settings, "no-such-tenant")
    assert unknown.returncode == 2
    assert "no tenant 'no-such-tenant'" in unknown.stderr

    tenant = make_tenant()
    bad_to = run_test_mail(settings, tenant, to="not an address")
    assert bad_to.returncode == 2
    assert "--to:" in bad_to.stderr

    no_sender = run_test_mail(settings, tenant)
    assert no_sender.returncode == 2
    assert "has no SMTP user to send as; give --from" in no_sender.stderr
