"""Least privilege: the worker role reads tenants and writes the ledger, but cannot change a tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.support.ledger import wait_final
from tests.support.services import RunningWorker, postbote, send_jobs
from worker.db import Connection, connect
from worker.settings import Settings
from worker.testbed.documents import make_job


@pytest.fixture
def worker_login(settings: Settings) -> Iterator[Settings]:
    """The run's settings, logged in as a fresh login role that is a member of postbote_worker."""
    name = f"pbtest_worker_{uuid.uuid4().hex[:8]}"
    with connect(settings.database_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE postbote_worker").format(sql.Identifier(name)))
    try:
        yield settings.model_copy(
            update={"database_url": psycopg.conninfo.make_conninfo(settings.database_url, user=name)}
        )
    finally:
        with connect(settings.database_url, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_the_worker_role_reads_tenants_but_cannot_update_them(db: Connection, make_tenant: Any) -> None:
    tenant = make_tenant()
    with db.transaction(force_rollback=True):
        db.execute("SET LOCAL ROLE postbote_worker")
        assert db.execute("SELECT id FROM tenants WHERE id = %s", (tenant,)).fetchone() == {"id": tenant}
        db.execute(
            "INSERT INTO login_breakers (tenant_id, reason, detail, failures, failing_since, retry_at)"
            " VALUES (%s, 'smtp_auth_failed', 'test', 1, now(), now())",
            (tenant,),
        )
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute(
                'UPDATE tenants SET smtp = smtp || \'{"host": "evil.example"}\' WHERE id = %s', (tenant,)
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege), db.transaction():
            db.execute("DELETE FROM employees WHERE tenant_id = %s", (tenant,))


def test_check_reports_the_role_it_runs_as(settings: Settings, worker_login: Settings) -> None:
    result = postbote(worker_login, "check")
    assert result.returncode == 0, result.stderr
    assert "(member of postbote_worker)" in result.stdout
    assert "superuser" in postbote(settings, "check").stdout


def test_a_worker_logged_in_with_the_worker_role_sends_and_records_a_job(
    worker_login: Settings, own_queues: Settings, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    running = RunningWorker(own_queues, database_url=worker_login.database_url)
    try:
        [job_id] = send_jobs(
            own_queues, [make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")]
        )
        assert wait_final(db, [job_id])[job_id]["status"] == "sent"
    finally:
        running.stop()
    assert "permission denied" not in running.output()
