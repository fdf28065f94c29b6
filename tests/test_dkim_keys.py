"""keygen writes a key and the DNS record that verifies it; check compares DNS with the configured key."""

from __future__ import annotations

import argparse
import base64
import json
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import dns.exception
import dns.resolver
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from psycopg.types.json import Jsonb

from schemas.tenant import Dkim
from tests.support.dkim import FakeResolver, dkimpy_verify, perl_verify, plain, txt_rdata
from worker.cli import dkim as dkim_cli
from worker.errors import ConfigurationError, UnknownTenant
from worker.job.signature import DkimSigner, load_key, sign_message
from worker.settings import Settings
from worker.tools import dkim_keys
from worker.tools.dkim_keys import (
    DnsRecord,
    Status,
    check_dkim,
    check_key,
    dns_record,
    generate_private_key,
    private_key_pem,
    write_private_key,
)

DOMAIN = "acme.example"


def postbote(settings: Settings, *argv: str) -> int:
    """Run ``postbote dkim ...`` through a parser built the way worker.cli builds it."""
    parser = argparse.ArgumentParser(prog="postbote")
    dkim_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args, settings)
    return code


@pytest.fixture
def settings() -> Settings:
    return Settings()


def keygen(settings: Settings, out: Path, *extra: str) -> int:
    return postbote(
        settings, "dkim", "keygen", "--domain", DOMAIN, "--selector", "s2026", "--out", str(out), *extra
    )


def test_keygen_writes_the_private_key_readable_by_its_owner_only(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keygen(settings, tmp_path) == 0

    path = tmp_path / "s2026.acme.example.private.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert key.key_size == 2048  # type: ignore[union-attr]
    out = capsys.readouterr().out
    assert "s2026._domainkey.acme.example. 3600 IN TXT (" in out


def test_the_key_file_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_private_key(tmp_path / "k.pem", b"secret")
    finally:
        os.umask(old)

    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite_an_existing_key(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "s2026.acme.example.private.pem"
    path.write_bytes(b"the key in use")

    assert keygen(settings, tmp_path) == 2

    assert path.read_bytes() == b"the key in use"
    assert "not overwriting" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [("--algorithm", "ed25519", "--bits", "2048"), ("--bits", "512"), ("--bits", "8192")],
    ids=["bits_for_ed25519", "too_few_bits", "too_many_bits"],
)
def test_keygen_rejects_bad_options_with_exit_2(
    settings: Settings, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    assert keygen(settings, tmp_path, *extra) == 2
    assert list(tmp_path.iterdir()) == []


def test_keygen_rejects_a_bad_selector_or_domain(settings: Settings, tmp_path: Path) -> None:
    bad_selector = ("dkim", "keygen", "--domain", DOMAIN, "--selector", "s 1", "--out", str(tmp_path))
    bad_domain = ("dkim", "keygen", "--domain", "acme", "--selector", "s1", "--out", str(tmp_path))

    assert postbote(settings, *bad_selector) == 2
    assert postbote(settings, *bad_domain) == 2


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_the_keygen_record_verifies_a_signature_made_with_the_keygen_key(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str], algorithm: str
) -> None:
    assert keygen(settings, tmp_path, "--algorithm", algorithm, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    record = DnsRecord(printed["name"], "".join(printed["strings"]))
    key = load_key(DOMAIN, "s2026", Path(printed["private_key_file"]).read_bytes())

    signed = sign_message(plain(), DkimSigner((key,)))

    assert printed["value"].startswith(f"v=DKIM1; k={algorithm}; p=")
    assert dkimpy_verify(signed, record) == [True]
    if algorithm == "rsa":
        assert perl_verify(signed, record).overall == "pass"


@pytest.mark.parametrize("bits", [1024, 2048, 4096])
def test_txt_strings_are_at_most_255_characters_and_join_to_the_value(bits: int) -> None:
    record = dns_record(DOMAIN, "s2026", generate_private_key("rsa", bits))

    assert all(len(s) <= 255 for s in record.strings)
    assert "".join(record.strings) == record.value
    assert record.value.startswith("v=DKIM1; k=rsa; p=MI")
    assert b"".join(txt_rdata(record).strings).decode() == record.value  # type: ignore[attr-defined]


def test_an_ed25519_record_is_one_short_string() -> None:
    record = dns_record(DOMAIN, "e2026", generate_private_key("ed25519"))

    assert len(record.strings) == 1
    assert record.zone_line() == f'e2026._domainkey.acme.example. 3600 IN TXT ( "{record.value}" )'


@pytest.fixture(scope="module")
def key() -> dkim_keys.PrivateKey:
    return generate_private_key("rsa", 2048)


def test_check_says_match_when_dns_publishes_the_key(key: dkim_keys.PrivateKey) -> None:
    resolver = FakeResolver(dns_record(DOMAIN, "s2026", key))

    result = check_key(DOMAIN, "s2026", key, resolver)

    assert result.status is Status.MATCH and result.ok
    assert resolver.queries == [("s2026._domainkey.acme.example", "TXT")]


def test_check_says_mismatch_when_dns_publishes_another_key(key: dkim_keys.PrivateKey) -> None:
    resolver = FakeResolver(dns_record(DOMAIN, "s2026", generate_private_key("rsa", 1024)))

    result = check_key(DOMAIN, "s2026", key, resolver)

    assert result.status is Status.MISMATCH
    assert "another public key" in result.detail


def test_check_says_no_record_when_the_name_does_not_exist(key: dkim_keys.PrivateKey) -> None:
    result = check_key(DOMAIN, "s2026", key, FakeResolver())

    assert result.status is Status.NO_RECORD
    assert "s2026._domainkey.acme.example" in result.detail


def test_check_says_no_record_when_the_name_has_no_txt(key: dkim_keys.PrivateKey) -> None:
    assert (
        check_key(DOMAIN, "s2026", key, FakeResolver(error=dns.resolver.NoAnswer())).status
        is Status.NO_RECORD
    )


@pytest.mark.parametrize(
    "error", [dns.exception.Timeout(), dns.resolver.NoNameservers()], ids=["timeout", "servfail"]
)
def test_check_says_dns_error_when_the_lookup_fails(key: dkim_keys.PrivateKey, error: Exception) -> None:
    result = check_key(DOMAIN, "s2026", key, FakeResolver(error=error))

    assert result.status is Status.DNS_ERROR
    assert "DNS lookup of s2026._domainkey.acme.example failed" in result.detail


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("v=DKIM1; k=rsa; p=", "revoked"),
        ("v=DKIM1; k=rsa; p=!!notbase64", "not base64"),
        ("v=DKIM1; k=rsa; p=AAAA", "not an RSA public key"),
        ("v=spf1 -all; p=x", "v= is not DKIM1"),
    ],
    ids=["revoked", "garbage", "truncated", "not_dkim"],
)
def test_check_says_mismatch_for_a_broken_record(key: dkim_keys.PrivateKey, value: str, detail: str) -> None:
    result = check_key(DOMAIN, "s2026", key, FakeResolver(DnsRecord("s2026._domainkey.acme.example", value)))

    assert result.status is Status.MISMATCH
    assert detail in result.detail


def test_check_says_mismatch_when_the_key_type_differs(key: dkim_keys.PrivateKey) -> None:
    resolver = FakeResolver(dns_record(DOMAIN, "s2026", generate_private_key("ed25519")))

    result = check_key(DOMAIN, "s2026", key, resolver)

    assert result.status is Status.MISMATCH
    assert "k=ed25519" in result.detail


def test_check_accepts_a_pkcs1_rsa_record_split_with_spaces(key: dkim_keys.PrivateKey) -> None:
    pkcs1 = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    p = base64.b64encode(pkcs1).decode()
    value = f"v=DKIM1; k=rsa; p={p[:100]} {p[100:]}"

    assert check_key(DOMAIN, "s2026", key, FakeResolver(DnsRecord("s2026._domainkey.acme.example", value))).ok


def test_check_dkim_checks_main_extra_and_next_keys(tmp_path: Path, key: dkim_keys.PrivateKey) -> None:
    ed_key, next_key = generate_private_key("ed25519"), generate_private_key("rsa", 1024)
    (tmp_path / "next.pem").write_bytes(private_key_pem(next_key))
    config = Dkim.model_validate(
        {
            "domain": DOMAIN,
            "selector": "s2026",
            "private_key": private_key_pem(key).decode(),
            "extra": [{"selector": "e2026", "private_key": private_key_pem(ed_key).decode()}],
            "next": {"selector": "s2027", "private_key_file": str(tmp_path / "next.pem")},
        }
    )
    resolver = FakeResolver(dns_record(DOMAIN, "s2026", key), dns_record(DOMAIN, "e2026", ed_key))

    results = check_dkim(config, resolver)

    assert [(r.role, r.name.split(".")[0], r.status) for r in results] == [
        ("main", "s2026", Status.MATCH),
        ("extra", "e2026", Status.MATCH),
        ("next", "s2027", Status.NO_RECORD),
    ]


@pytest.fixture
def tenants_db() -> Iterator[Settings]:
    """Settings whose database has a private ``tenants(id, dkim)`` table, dropped afterwards."""
    base = os.environ.get("POSTBOTE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    schema = f"test_dkim_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(base, autocommit=True)
    except psycopg.OperationalError as e:
        pytest.fail(f"PostgreSQL is needed at {base} (make test starts it): {e}")
    with admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
        admin.execute(f'CREATE TABLE "{schema}".tenants (id text PRIMARY KEY, dkim jsonb)')
        separator = "&" if "?" in base else "?"
        yield Settings(database_url=f"{base}{separator}options={quote(f'-csearch_path={schema}')}")
        admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def store_tenant(settings: Settings, tenant_id: str, dkim: object) -> None:
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO tenants (id, dkim) VALUES (%s, %s)", (tenant_id, Jsonb(dkim)))


def test_load_tenant_dkim_reads_the_dumped_model(tenants_db: Settings, key: dkim_keys.PrivateKey) -> None:
    config = Dkim.model_validate(
        {"domain": DOMAIN, "selector": "s2026", "private_key": private_key_pem(key).decode()}
    )
    store_tenant(
        tenants_db, "acme", config.model_dump(mode="json") | {"private_key": private_key_pem(key).decode()}
    )

    assert dkim_cli.load_tenant_dkim(tenants_db, "acme") == config


def test_load_tenant_dkim_tells_unknown_tenants_and_tenants_without_dkim(tenants_db: Settings) -> None:
    store_tenant(tenants_db, "plain", None)

    assert dkim_cli.load_tenant_dkim(tenants_db, "plain") is None
    with pytest.raises(UnknownTenant):
        dkim_cli.load_tenant_dkim(tenants_db, "nobody")


def test_invalid_stored_dkim_settings_are_reported_without_the_key(tenants_db: Settings) -> None:
    store_tenant(
        tenants_db, "acme", {"domain": DOMAIN, "selector": "bad selector", "private_key": "TOPSECRET"}
    )

    with pytest.raises(ConfigurationError) as raised:
        dkim_cli.load_tenant_dkim(tenants_db, "acme")
    assert "selector" in str(raised.value)
    assert "TOPSECRET" not in str(raised.value)


def test_dkim_check_exits_0_on_match_and_1_on_mismatch(
    tenants_db: Settings,
    key: dkim_keys.PrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store_tenant(
        tenants_db,
        "acme",
        {"domain": DOMAIN, "selector": "s2026", "private_key": private_key_pem(key).decode()},
    )
    monkeypatch.setattr(dkim_keys, "_system_resolver", lambda: FakeResolver(dns_record(DOMAIN, "s2026", key)))

    assert postbote(tenants_db, "dkim", "check", "--tenant", "acme") == 0
    assert "main  s2026._domainkey.acme.example: MATCH" in capsys.readouterr().out

    other = generate_private_key("rsa", 1024)
    monkeypatch.setattr(
        dkim_keys, "_system_resolver", lambda: FakeResolver(dns_record(DOMAIN, "s2026", other))
    )
    assert postbote(tenants_db, "dkim", "check", "--tenant", "acme", "--json") == 1
    assert json.loads(capsys.readouterr().out)[0]["status"] == "mismatch"


def test_dkim_check_exits_2_for_an_unknown_tenant(tenants_db: Settings) -> None:
    assert postbote(tenants_db, "dkim", "check", "--tenant", "nobody") == 2
