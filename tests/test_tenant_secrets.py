"""A tenant file is one tenant administrator's input: its secrets are sealed in the database, its
files confined to its secrets directory, and no token command comes from it."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.services import ADMIN_URL, database_url, postbote
from worker.db import Connection, connect, drop_database, ensure_database, upgrade
from worker.errors import ConfigurationError
from worker.job.accounts import SecretAccess, load_account
from worker.runtime.secrets_box import generate_key, load_key_ring
from worker.settings import Settings

PASSWORD = "Sommer2026!-acme-smtp"


@pytest.fixture
def own_db(settings: Settings) -> Iterator[tuple[Settings, Connection]]:
    """Settings with a database of this test's own: ``secrets rotate`` reseals every tenant in it."""
    url = database_url(f"postbote_test_rotate_{uuid.uuid4().hex[:8]}")
    ensure_database(url)
    with connect(url, autocommit=True) as conn:
        upgrade(conn)
        yield settings.model_copy(update={"database_url": url}), conn
    drop_database(url)


def pem_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def tenant(tenant_id: str, **smtp: Any) -> dict[str, Any]:
    return {
        "id": tenant_id,
        "smtp": {"host": "smtp.acme.example", "user": "mailer@acme.example", **smtp},
        "employees": [{"id": "u1", "email": "anna@acme.example"}],
    }


def write_file(tmp_path: Path, *tenants: dict[str, Any]) -> Path:
    path = tmp_path / f"tenants-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump({"tenants": list(tenants)}))
    return path


def new_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def stored(db: Connection, tenant_id: str) -> dict[str, Any] | None:
    return db.execute("SELECT smtp, dkim FROM tenants WHERE id = %s", (tenant_id,)).fetchone()


def test_a_database_dump_holds_neither_the_inline_password_nor_the_dkim_key(
    settings: Settings, tmp_path: Path, db: Connection
) -> None:
    key = pem_key()
    tenant_id = new_id()
    entry = tenant(tenant_id, password=PASSWORD)
    entry["dkim"] = {"domain": "acme.example", "selector": "s1", "private_key": key}
    result = postbote(settings, "tenants", "apply", str(write_file(tmp_path, entry)))
    assert result.returncode == 0, result.stderr

    dbname = psycopg.conninfo.conninfo_to_dict(settings.database_url)["dbname"]
    dump = subprocess.run(
        [
            "pg_dump",
            psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=dbname),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert tenant_id in dump
    assert PASSWORD not in dump
    key_lines = [line for line in key.splitlines() if not line.startswith("-----")]
    assert not [line for line in key_lines if line in dump]
    assert "PRIVATE KEY" not in dump

    account = load_account(db, tenant_id, SecretAccess.from_settings(settings))
    assert account.smtp.password is not None and account.smtp.password.get_secret_value() == PASSWORD
    assert account.dkim is not None and account.dkim.private_key is not None
    assert account.dkim.private_key.get_secret_value() == key


def test_applying_the_same_secrets_again_changes_nothing(
    settings: Settings, tmp_path: Path, db: Connection
) -> None:
    tenant_id = new_id()
    path = write_file(tmp_path, tenant(tenant_id, password=PASSWORD))
    assert postbote(settings, "tenants", "apply", str(path)).returncode == 0
    before = stored(db, tenant_id)
    again = postbote(settings, "tenants", "apply", str(path))
    assert again.returncode == 0, again.stderr
    assert f"tenant {tenant_id}: unchanged" in again.stdout
    assert stored(db, tenant_id) == before


def test_inline_secrets_without_a_sealing_key_are_refused_with_how_to_set_one(
    settings: Settings, tmp_path: Path, db: Connection
) -> None:
    tenant_id = new_id()
    no_key = {k: v for k, v in settings.model_dump().items() if k != "secrets_key_file"}
    result = postbote(
        Settings.model_validate({**no_key, "secrets_key_file": None}),
        "tenants",
        "apply",
        str(write_file(tmp_path, tenant(tenant_id, password=PASSWORD))),
    )
    assert result.returncode == 2
    assert "smtp.password" in result.stderr
    assert "POSTBOTE_SECRETS_KEY_FILE" in result.stderr and "postbote secrets keygen" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    assert stored(db, tenant_id) is None


def test_a_password_file_of_another_tenant_a_key_outside_and_a_token_command_are_refused_and_nothing_is_applied(
    settings: Settings, tmp_path: Path, db: Connection
) -> None:
    secrets = tmp_path / "secrets"
    victim, evil, other = new_id(), new_id(), new_id()
    (secrets / victim).mkdir(parents=True)
    (secrets / evil).mkdir()
    (secrets / victim / "smtp").write_text(PASSWORD)
    (secrets / evil / "link").symlink_to(secrets / victim / "smtp")
    per_tenant = settings.model_copy(update={"secrets_dir": str(secrets / "{tenant}")})

    stealing = tenant(evil, password_file=str(secrets / victim / "smtp"))
    stealing["dkim"] = {"domain": "evil.example", "selector": "s1", "private_key_file": "/etc/passwd"}
    linked = tenant(other, password_file=f"../{victim}/smtp")
    through_link = tenant(new_id(), password_file=str(secrets / evil / "link"))
    commanding = tenant(new_id(), auth="xoauth2", token_command="env")
    fine = tenant(new_id(), password_file="smtp")
    result = postbote(
        per_tenant,
        "tenants",
        "apply",
        str(write_file(tmp_path, stealing, linked, through_link, fine)),
    )
    assert result.returncode == 2
    assert f"tenant {evil}: smtp.password_file" in result.stderr
    assert (
        f"tenant {evil}: dkim.private_key_file: /etc/passwd is outside the secrets directory" in result.stderr
    )
    assert f"tenant {other}: smtp.password_file" in result.stderr
    assert f"tenant {through_link['id']}: smtp.password_file" in result.stderr
    assert PASSWORD not in result.stderr
    for entry in (stealing, linked, through_link, fine):
        assert stored(db, entry["id"]) is None, "nothing of the file is applied"

    command = postbote(per_tenant, "tenants", "apply", str(write_file(tmp_path, commanding)))
    assert command.returncode == 2
    assert "token_command is not a tenant-file key" in command.stderr
    assert "POSTBOTE_TOKEN_HELPERS" in command.stderr


def test_files_inside_the_tenants_own_directory_are_applied_and_read_from_there(
    settings: Settings, tmp_path: Path, db: Connection
) -> None:
    secrets = tmp_path / "own"
    tenant_id = new_id()
    (secrets / tenant_id).mkdir(parents=True)
    (secrets / tenant_id / "smtp").write_text(PASSWORD)
    per_tenant = settings.model_copy(update={"secrets_dir": str(secrets / "{tenant}")})
    result = postbote(
        per_tenant, "tenants", "apply", str(write_file(tmp_path, tenant(tenant_id, password_file="smtp")))
    )
    assert result.returncode == 0, result.stderr
    account = load_account(db, tenant_id, SecretAccess(None, per_tenant.secrets_dir))
    assert account.smtp.password_file == (secrets / tenant_id / "smtp").resolve()


def test_a_yaml_error_on_a_password_line_names_line_and_column_but_not_the_password(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        f"tenants:\n  - id: acme\n    smtp:\n      host: smtp.acme.example\n      password: {PASSWORD}: x\n"
    )
    result = postbote(settings, "tenants", "apply", str(path))
    assert result.returncode == 2
    assert "line 5, column" in result.stderr
    assert PASSWORD not in result.stderr + result.stdout
    assert "Sommer" not in result.stderr


def test_an_invalid_environment_names_the_variable_but_never_its_value(settings: Settings) -> None:
    result = postbote(settings, "check", metrics_port="postgresql://postbote:geheim-77@db/postbote")
    assert result.returncode == 2
    assert "POSTBOTE_METRICS_PORT" in result.stderr
    assert "geheim-77" not in result.stderr + result.stdout


def test_rotate_seals_every_secret_with_the_new_key_and_the_old_key_can_go(
    own_db: tuple[Settings, Connection], tmp_path: Path
) -> None:
    settings, db = own_db
    old_key = tmp_path / "old.key"
    old_key.write_text(generate_key() + "\n")
    with_old = settings.model_copy(update={"secrets_key_file": old_key})
    tenant_id = new_id()
    applied = postbote(
        with_old, "tenants", "apply", str(write_file(tmp_path, tenant(tenant_id, password=PASSWORD)))
    )
    assert applied.returncode == 0, applied.stderr

    both = tmp_path / "both.key"
    new = postbote(with_old, "secrets", "keygen", "--file", str(both))
    assert new.returncode == 0, new.stderr
    both.write_text(both.read_text() + old_key.read_text())
    assert os.stat(both).st_mode & 0o077 == 0
    rotated = postbote(with_old, "secrets", "rotate", secrets_key_file=str(both))
    assert rotated.returncode == 0, rotated.stderr
    assert "sealed" in rotated.stdout

    only_new = tmp_path / "new.key"
    only_new.write_text(both.read_text().splitlines()[0] + "\n")
    ring = load_key_ring(only_new)
    assert ring is not None
    row = stored(db, tenant_id)
    assert row is not None and row["smtp"]["password"]["sealed"].split(".")[1] == ring.current_id
    account = load_account(db, tenant_id, SecretAccess(ring))
    assert account.smtp.password is not None and account.smtp.password.get_secret_value() == PASSWORD


def test_a_sealed_password_copied_to_another_tenant_does_not_open(
    settings: Settings, tmp_path: Path, db: Connection
) -> None:
    owner, thief = new_id(), new_id()
    path = write_file(tmp_path, tenant(owner, password=PASSWORD), tenant(thief, password="mine"))
    assert postbote(settings, "tenants", "apply", str(path)).returncode == 0
    db.execute(
        "UPDATE tenants SET smtp = jsonb_set(smtp, '{password}', (SELECT smtp->'password' FROM tenants WHERE id = %s))"
        " WHERE id = %s",
        (owner, thief),
    )
    try:
        with pytest.raises(ConfigurationError, match="does not open") as caught:
            load_account(db, thief, SecretAccess.from_settings(settings))
        assert PASSWORD not in str(caught.value)
    finally:
        db.execute("DELETE FROM tenants WHERE id = %s", (thief,))


def test_plain_secrets_stored_before_sealing_are_reported_by_check_and_sealed_by_rotate(
    own_db: tuple[Settings, Connection], tmp_path: Path
) -> None:
    settings, db = own_db
    tenant_id = new_id()
    assert (
        postbote(
            settings, "tenants", "apply", str(write_file(tmp_path, tenant(tenant_id, password=PASSWORD)))
        ).returncode
        == 0
    )
    db.execute(
        "UPDATE tenants SET smtp = jsonb_set(smtp, '{password}', %s) WHERE id = %s",
        (json.dumps(PASSWORD), tenant_id),
    )
    check = postbote(settings, "check")
    assert "database role:" in check.stdout
    assert "stored in plain text" in check.stdout
    rotated = postbote(settings, "secrets", "rotate")
    assert rotated.returncode == 0, rotated.stderr
    row = stored(db, tenant_id)
    assert row is not None and PASSWORD not in json.dumps(row)
    assert "plain text" not in postbote(settings, "check").stdout
