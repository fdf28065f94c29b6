"""TLS for the sink: a throw-away CA and a server certificate it signed, made with ``trustme``.

Clients verify the sink by giving the CA file as ``smtp.ca_file``; a client
without it must refuse the certificate, which is what the tests rely on.
Only the tests start a sink with TLS, so ``trustme`` is a development dependency.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Certificates:
    """PEM files of a CA and of a server certificate signed by it."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the certificate (for STARTTLS or implicit TLS)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def make_certificates(
    directory: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30
) -> Certificates:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` to ``directory``.

    ``hosts`` become the certificate's subject alternative names (IP addresses or DNS names);
    the server certificate is valid for ``days``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca = trustme.CA(organization_unit_name="postbote sink test CA")
    server = ca.issue_cert(
        *hosts,
        common_name=hosts[0],
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=days),
    )
    certificates = Certificates(
        ca_file=directory / "ca.pem", cert_file=directory / "server.pem", key_file=directory / "server.key"
    )
    ca.cert_pem.write_to_path(certificates.ca_file)
    server.cert_chain_pems[0].write_to_path(certificates.cert_file)
    server.private_key_pem.write_to_path(certificates.key_file)
    certificates.key_file.chmod(0o600)
    return certificates


__all__ = ["Certificates", "make_certificates"]
