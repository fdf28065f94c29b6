"""`postbote tenants apply FILE` upserts tenants in one transaction and reports what changed."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.support.services import postbote
from worker.db import Connection
from worker.settings import Settings


def tenant_file(tmp_path: Path, tenant: dict[str, Any], name: str = "tenants.yaml") -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps({"tenants": [tenant]}))
    else:
        path.write_text(yaml.safe_dump({"tenants": [tenant]}))
    return path


def acme(tenant_id: str) -> dict[str, Any]:
    return {
        "id": tenant_id,
        "smtp": {"host": "smtp.acme.example", "password": "s3cret-pass"},
        "senders": {"invoice": "rechnung@acme.example"},
        "groups": [{"id": "sales", "senders": ["angebote@acme.example"]}],
        "employees": [{"id": "u1", "email": "anna@acme.example", "group": "sales"}],
    }


def test_apply_creates_then_reports_unchanged(settings: Settings, tmp_path: Path, db: Connection) -> None:
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    path = tenant_file(tmp_path, acme(tenant_id))
    first = postbote(settings, "tenants", "apply", str(path))
    assert first.returncode == 0, first.stderr
    assert f"tenant {tenant_id}: created" in first.stdout
    second = postbote(settings, "tenants", "apply", str(path))
    assert f"tenant {tenant_id}: unchanged" in second.stdout
    grants = db.execute("SELECT address FROM group_senders WHERE tenant_id = %s", (tenant_id,)).fetchall()
    assert [g["address"] for g in grants] == ["angebote@acme.example"]


def test_apply_reports_what_changed(settings: Settings, tmp_path: Path) -> None:
    tenant_id = f"t{uuid.uuid4().hex[:8]}"
    tenant = acme(tenant_id)
    postbote(settings, "tenants", "apply", str(tenant_file(tmp_path, tenant)))
    tenant["employees"].append({"id": "u2", "email": "ben@acme.example"})
    tenant["series"] = {"batch_size": 10, "pause_ms": 500}
    result = postbote(settings, "tenants", "apply", str(tenant_file(tmp_path, tenant, "tenants.json")))
    assert result.returncode == 0, result.stderr
    assert f"tenant {tenant_id}: updated" in result.stdout
    assert "employees added: u2" in result.stdout
    assert "batch_size" in result.stdout and "pause_ms" in result.stdout


def test_an_invalid_file_names_the_field_and_changes_nothing(
    settings: Settings, tmp_path: Path, db: Connection
) -> None:
    good, bad = acme(f"t{uuid.uuid4().hex[:8]}"), acme(f"t{uuid.uuid4().hex[:8]}")
    bad["employees"][0]["email"] = "not an address"
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [good, bad]}))
    result = postbote(settings, "tenants", "apply", str(path))
    assert result.returncode == 2
    assert "tenants.1.employees.0.email" in result.stderr
    assert "Traceback" not in result.stderr
    assert db.execute("SELECT 1 FROM tenants WHERE id = %s", (good["id"],)).fetchone() is None


def test_the_password_is_stored_but_never_printed(settings: Settings, tmp_path: Path) -> None:
    result = postbote(
        settings, "tenants", "apply", str(tenant_file(tmp_path, acme(f"t{uuid.uuid4().hex[:8]}")))
    )
    assert "s3cret-pass" not in result.stdout + result.stderr


def test_a_missing_file_is_bad_input(settings: Settings, tmp_path: Path) -> None:
    result = postbote(settings, "tenants", "apply", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
