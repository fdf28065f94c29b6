"""A real mail relay that bounces (a private Postfix) and a real IMAP mailbox (a private Dovecot),
as a tenant with its own relay has them (see ``shared/recipes.md``).

postbote submits to Postfix; Postfix relays to a test SMTP server (``RecipientRules``) that
answers 550 or 452 for chosen addresses and accepts the rest, then writes its own RFC 3464
reports to the envelope sender, whose mailbox (``rechnung@acme.example``) is a Maildir that
Dovecot serves over IMAP. Customer mail can be put in the same Maildir directly.

The Debian packages are installed when missing and the machine lets us (root, apt-get);
otherwise ``unavailable()`` says why and the tests skip with that sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from worker.testbed.sink import Sink, free_port

DOMAIN = "acme.example"
MAILBOX_USER = "rechnung"
MAILBOX = f"{MAILBOX_USER}@{DOMAIN}"
VERP_DOMAIN = f"bounces.{DOMAIN}"
"""Every address here (a VERP return path) is delivered to one Maildir, ``MailRelay.verp_maildir``."""
PASSWORD = "relay-test-secret"
TOKEN = "ya29.relay-test-token"
"""The one OAuth2 access token Dovecot's XOAUTH2 login accepts (checked by ``_TokenInfo``)."""
_MAIL_UID = 8
_POSTFIX = "/usr/sbin/postfix"
_DOVECOT = "/usr/sbin/dovecot"


def unavailable() -> str | None:
    """Why Postfix and Dovecot cannot run here, after installing them where possible; ``None`` when they can."""
    if os.path.exists(_POSTFIX) and os.path.exists(_DOVECOT):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "the relay tests need Postfix and Dovecot (Debian packages postfix, dovecot-imapd): install them as root"
    subprocess.run(
        ["debconf-set-selections"],
        input="postfix postfix/main_mailer_type select No configuration\n",
        text=True,
        check=False,
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "postfix", "dovecot-imapd"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (os.path.exists(_POSTFIX) and os.path.exists(_DOVECOT)):
        return f"could not install postfix and dovecot-imapd: {done.stderr.strip()[-300:]}"
    return None


class _TokenInfo(BaseHTTPRequestHandler):
    """The identity provider's token check Dovecot asks for an XOAUTH2 login."""

    def do_GET(self) -> None:
        valid = self.path.endswith(f"access_token={TOKEN}")
        body = json.dumps(
            {"email": MAILBOX, "active": True} if valid else {"error": "invalid_token"}
        ).encode()
        self.send_response(200 if valid else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class MailRelay:
    """The running pair: Postfix's submission port, Dovecot's IMAP port, the sender's Maildir."""

    root: Path
    smtp_port: int
    imap_port: int
    maildir: Path
    token_info: ThreadingHTTPServer | None = None

    @property
    def verp_maildir(self) -> Path:
        return self.root / "mail" / VERP_DOMAIN / "verp"

    def deliver(self, data: bytes) -> Path:
        """Put a message in the sender's mailbox as a customer's reply arrives (``new/``)."""
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True, exist_ok=True)
        name = f"{time.time():.6f}.{uuid.uuid4().hex}.test"
        tmp = self.maildir / "tmp" / name
        tmp.write_bytes(data)
        os.chown(tmp, _MAIL_UID, _MAIL_UID)
        final = self.maildir / "new" / name
        tmp.rename(final)
        return final

    def messages(self) -> dict[str, bytes]:
        """Every message in the sender's mailbox, by file name without its flags."""
        found = {}
        for sub in ("new", "cur"):
            folder = self.maildir / sub
            if folder.is_dir():
                for file in folder.iterdir():
                    found[file.name.split(":")[0]] = file.read_bytes()
        return found

    def log(self) -> str:
        path = self.root / "postfix.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def imap_settings(self, **fields: object) -> dict[str, object]:
        """The tenant file's ``bounces.imap`` for this mailbox."""
        return {
            "host": "127.0.0.1",
            "port": self.imap_port,
            "security": "none",
            "user": MAILBOX,
            "password": PASSWORD,
            **fields,
        }


def start_relay(upstream: Sink) -> MailRelay:
    """Start Postfix (relaying to ``upstream``) and Dovecot in a fresh directory."""
    root = Path(tempfile.mkdtemp(prefix="postbote-relay-"))
    root.chmod(0o711)
    relay = MailRelay(root, free_port(), free_port(), root / "mail" / DOMAIN / MAILBOX_USER)
    try:
        relay.token_info = ThreadingHTTPServer(("127.0.0.1", 0), _TokenInfo)
        threading.Thread(target=relay.token_info.serve_forever, daemon=True).start()
        _start_postfix(relay, upstream)
        _start_dovecot(relay)
    except BaseException:
        stop_relay(relay)
        raise
    return relay


def stop_relay(relay: MailRelay) -> None:
    subprocess.run(
        ["script", "-qec", f"{_POSTFIX} -c {relay.root / 'postfix'} stop", "/dev/null"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    subprocess.run(
        ["doveadm", "-c", str(relay.root / "dovecot.conf"), "stop"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if relay.token_info is not None:
        relay.token_info.shutdown()
        relay.token_info.server_close()
    shutil.rmtree(relay.root, ignore_errors=True)


def _start_postfix(relay: MailRelay, upstream: Sink) -> None:
    root = relay.root
    config = root / "postfix"
    config.mkdir()
    mail = root / "mail"
    mail.mkdir()
    shutil.chown(mail, _MAIL_UID, _MAIL_UID)
    (root / "queue").mkdir(mode=0o755)
    (root / "data").mkdir(mode=0o700)
    shutil.chown(root / "data", "postfix", "postfix")
    (config / "vmailbox").write_text(
        f"{MAILBOX} {DOMAIN}/{MAILBOX_USER}/\n@{VERP_DOMAIN} {VERP_DOMAIN}/verp/\n"
    )
    (config / "main.cf").write_text(
        "\n".join(
            [
                "compatibility_level = 3.6",
                f"queue_directory = {root / 'queue'}",
                f"data_directory = {root / 'data'}",
                "mail_owner = postfix",
                "setgid_group = postdrop",
                "myhostname = relay.acme.example",
                "mydomain = acme.example",
                "myorigin = $myhostname",
                "mydestination =",
                "inet_interfaces = 127.0.0.1",
                "inet_protocols = ipv4",
                "mynetworks = 127.0.0.0/8",
                "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
                f"relayhost = [{upstream.host}]:{upstream.port}",
                "smtp_tls_security_level = none",
                "smtp_dns_support_level = disabled",
                "disable_dns_lookups = yes",
                f"maillog_file = {root / 'postfix.log'}",
                f"maillog_file_prefixes = {root}",
                f"virtual_mailbox_domains = {DOMAIN}, {VERP_DOMAIN}",
                f"virtual_mailbox_base = {mail}",
                f"virtual_mailbox_maps = texthash:{config / 'vmailbox'}",
                f"virtual_uid_maps = static:{_MAIL_UID}",
                f"virtual_gid_maps = static:{_MAIL_UID}",
                f"virtual_minimum_uid = {_MAIL_UID}",
                "queue_run_delay = 5s",
                "minimal_backoff_time = 5s",
                "maximal_backoff_time = 10s",
                "delay_warning_time = 15s",
                "maximal_queue_lifetime = 45s",
                "bounce_queue_lifetime = 45s",
                "smtp_connect_timeout = 5s",
                "smtpd_banner = $myhostname ESMTP",
                "biff = no",
                "append_dot_mydomain = no",
                "alias_maps =",
                "alias_database =",
                "local_recipient_maps =",
                "",
            ]
        )
    )
    master = Path("/etc/postfix/master.cf").read_text()
    lines = []
    for line in master.splitlines():
        fields = line.split()
        if fields and not line[0].isspace() and not line.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{relay.smtp_port}"
            fields[4] = "n"
            line = "  ".join(fields)
        lines.append(line)
    if not any(line.startswith("postlog") for line in lines):
        lines.append("postlog   unix-dgram n  -       n       -       1       postlogd")
    (config / "master.cf").write_text("\n".join(lines) + "\n")
    for command in ("check", "start"):
        done = subprocess.run(
            ["script", "-qec", f"{_POSTFIX} -c {config} {command}", "/dev/null"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"postfix {command} failed: {done.stdout.strip()}")
    _wait_port(relay.smtp_port, "Postfix")


def _start_dovecot(relay: MailRelay) -> None:
    root = relay.root
    (root / "dovecot-run").mkdir()
    (root / "dovecot-state").mkdir()
    (root / "dovecot-passwd").write_text(f"{MAILBOX}:{{PLAIN}}{PASSWORD}\n")
    assert relay.token_info is not None
    (root / "dovecot-oauth2.conf").write_text(
        f"tokeninfo_url = http://127.0.0.1:{relay.token_info.server_port}/tokeninfo?access_token=\n"
        "username_attribute = email\nactive_attribute = active\nactive_value = true\n"
    )
    (root / "dovecot.conf").write_text(
        "\n".join(
            [
                f"base_dir = {root / 'dovecot-run'}",
                f"state_dir = {root / 'dovecot-state'}",
                f"instance_name = postbote-{root.name}",
                "protocols = imap",
                "listen = 127.0.0.1",
                "ssl = no",
                "disable_plaintext_auth = no",
                "auth_mechanisms = plain login xoauth2",
                f"mail_location = maildir:{root / 'mail'}/%d/%n",
                f"first_valid_uid = {_MAIL_UID}",
                f"log_path = {root / 'dovecot.log'}",
                # New mail is pushed to IDLE clients by inotify; where a container has none left,
                # Dovecot looks this often instead of every 30 s.
                "mailbox_idle_check_interval = 1 secs",
                "passdb {",
                "  driver = oauth2",
                "  mechanisms = xoauth2",
                f"  args = {root / 'dovecot-oauth2.conf'}",
                "}",
                "passdb {",
                "  driver = passwd-file",
                "  mechanisms = plain login",
                f"  args = {root / 'dovecot-passwd'}",
                "}",
                "userdb {",
                "  driver = static",
                f"  args = uid={_MAIL_UID} gid={_MAIL_UID}",
                "}",
                # Tenants' watches and the CLI all log in from 127.0.0.1: no growing delay after
                # the failed logins a test makes on purpose.
                "auth_failure_delay = 0 secs",
                "service anvil {",
                "  unix_listener anvil-auth-penalty {",
                "    mode = 0",
                "  }",
                "}",
                "service imap-login {",
                "  inet_listener imap {",
                "    address = 127.0.0.1",
                f"    port = {relay.imap_port}",
                "  }",
                "  inet_listener imaps {",
                "    port = 0",
                "  }",
                "}",
                "",
            ]
        )
    )
    subprocess.run(
        [_DOVECOT, "-c", str(root / "dovecot.conf")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
        timeout=60,
    )
    _wait_port(relay.imap_port, "Dovecot")


def _wait_port(port: int, what: str, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


__all__ = [
    "DOMAIN",
    "MAILBOX",
    "TOKEN",
    "VERP_DOMAIN",
    "MailRelay",
    "start_relay",
    "stop_relay",
    "unavailable",
]
