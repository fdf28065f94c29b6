"""The login circuit breaker: a wrong password costs a handful of logins, not one per queued job."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.auth_sinks import PASSWORD, attempts, running, smtp_settings
from tests.support.ledger import wait_final
from tests.support.observe import metrics_when, sample, wait_for
from tests.support.services import RunningWorker, postbote, send_jobs
from worker.db import Connection, make_pool
from worker.errors import MustWait, SmtpAuthFailed
from worker.job.breaker import LoginBreaker, failing_logins
from worker.settings import Settings
from worker.testbed.documents import make_job

JOBS = 500
HOLD_MS = 5000


def test_a_refused_login_holds_the_tenant_then_lets_one_probe_through_at_a_time(settings: Settings) -> None:
    pool = make_pool(settings.database_url, max_size=2)
    try:
        here = LoginBreaker(pool.connection, hold_ms=400, probe_ms=10_000)
        there = LoginBreaker(pool.connection, hold_ms=400, probe_ms=10_000)
        tenant = f"t{uuid.uuid4().hex[:10]}"
        here.admit(tenant)

        instead = here.failed(
            tenant, SmtpAuthFailed("login as mailer@acme.example with PLAIN failed: 535 5.7.8")
        )
        assert (instead.reason, instead.status, instead.wait_ms) == ("login_failing", "held", 400)
        with pytest.raises(MustWait) as held:
            there.admit(tenant)
        assert held.value.wait_ms is not None and 0 < held.value.wait_ms <= 400
        assert "535 5.7.8" in str(held.value)

        time.sleep(0.5)
        here.admit(tenant)  # the probe
        with pytest.raises(MustWait) as probing:
            there.admit(tenant)
        assert probing.value.wait_ms is not None and 500 <= probing.value.wait_ms <= 5000

        here.succeeded(tenant)
        there.admit(tenant)
        with pool.connection() as conn:
            assert tenant not in {f.tenant for f in failing_logins(conn)}
    finally:
        pool.close()


@pytest.fixture
def breaker_worker(own_queues: Settings) -> Any:
    running = RunningWorker(
        own_queues, processes=2, threads=4, queue_stats_interval_ms=300, login_hold_ms=HOLD_MS
    )
    yield running
    running.stop()


def test_a_wrong_password_with_queued_jobs_costs_a_handful_of_logins_and_every_job_goes_out_once_fixed(
    own_queues: Settings, breaker_worker: RunningWorker, make_tenant: Any, db: Connection, tmp_path: Path
) -> None:
    started = time.monotonic()
    with running(tmp_path) as sink:
        tenant = make_tenant(smtp=smtp_settings(sink, security="none", password="falsch-" + PASSWORD))
        ids = send_jobs(
            own_queues,
            [make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com") for n in range(JOBS)],
        )
        wait_for(
            lambda: (
                db.execute(
                    "SELECT count(*) = %s AS held FROM deliveries WHERE tenant_id = %s AND status = 'held'"
                    " AND reason = 'login_failing'",
                    (JOBS, tenant),
                ).fetchone()["held"]
                or None
            ),
            timeout=120,
            what="every job held for the failing login",
        )
        refused = attempts(sink)
        probes = (time.monotonic() - started) * 1000 / HOLD_MS + 1
        assert 1 <= len(refused) <= 2 * 3 + probes, refused
        assert not any(ok for _, _, ok in refused)
        text = wait_for(
            lambda: metrics_when(
                breaker_worker.metrics_port,
                lambda t: bool(sample(t, "postbote_login_failing", tenant=tenant)),
            ),
            what="postbote_login_failing for the tenant",
        )
        assert sample(text, "postbote_login_failing", tenant=tenant, reason="smtp_auth_failed") == 1
        used = db.execute(
            "SELECT count(*) AS n FROM deliveries WHERE tenant_id = %s AND attempts > 0", (tenant,)
        )
        assert used.fetchone()["n"] == 0, "waiting for the login uses no attempt"
        # Every HOLD_MS the jobs come back and one probes, so a job may be between two waits.
        status = wait_for(
            lambda: (
                (s := json.loads(postbote(own_queues, "status", ids[-1]).stdout))["status"] == "held" and s
            ),
            what="postbote status saying held",
        )
        assert status["reason"] == "login_failing"
        listed = json.loads(postbote(own_queues, "jobs", "--tenant", tenant, "--json").stdout)["jobs"]
        held = [j for j in listed if (j["status"], j["reason"]) == ("held", "login_failing")]
        assert len(held) >= JOBS // 2
        assert PASSWORD not in json.dumps(status) + json.dumps(listed)

        make_tenant(id=tenant, smtp=smtp_settings(sink, security="none", password=PASSWORD))
        rows = wait_final(db, ids, timeout=180)
        assert {r["status"] for r in rows.values()} == {"sent"}
        received = [str(r.rcpt_tos) for r in sink.handler.received]
        assert len(received) == JOBS and len(set(received)) == JOBS, "every job sent once"
        assert len(attempts(sink)) - len(refused) <= 2 * 4, "the fixed login is reused, not repeated per job"
    assert db.execute("SELECT 1 FROM login_breakers WHERE tenant_id = %s", (tenant,)).fetchone() is None
