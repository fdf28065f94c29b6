"""Fixtures: an own database and queue prefix per test run, the SMTP sink, tenants, a running worker."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

import producer.queues
from producer import publish
from schemas.constants import lane_queues
from schemas.job import Job
from worker.db import Connection, connect, drop_database, ensure_database, upgrade
from worker.settings import Settings
from worker.testbed.sink import RecordingHandler, Sink, free_port
from worker.tools.tenant_file import apply_tenants, read_tenant_file

ROOT = Path(__file__).resolve().parent.parent
BROKER_URL = os.environ.get("POSTBOTE_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
ADMIN_URL = os.environ.get("POSTBOTE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _database_url(name: str) -> str:
    return psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """Settings of this test run: its own database (migrated) and its own queue prefix."""
    token = uuid.uuid4().hex[:10]
    url = _database_url(f"postbote_test_{token}")
    ensure_database(url)
    with connect(url) as conn:
        upgrade(conn)
    test_settings = Settings(
        broker_url=BROKER_URL,
        database_url=url,
        queue_prefix=f"pbtest-{token}",
        metrics_port=free_port(),
        settings_cache_ms=200,
        smtp_timeout_ms=5000,
        min_backoff_ms=200,
        max_backoff_ms=1000,
    )
    yield test_settings
    delete_queues(test_settings)
    drop_database(url)


def delete_queues(settings: Settings) -> None:
    producer.queues.delete_queues(settings.broker_url, lane_queues(settings.queue_prefix))


def settings_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The environment a ``postbote`` subprocess needs to act on this test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBOTE_")}
    for key, value in {**settings.model_dump(), **overrides}.items():
        env[f"POSTBOTE_{key.upper()}"] = str(value)
    return env


def postbote(
    settings: Settings, *args: str, input: str | None = None, **overrides: Any
) -> subprocess.CompletedProcess[str]:
    """Run the ``postbote`` CLI as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        input=input,
        capture_output=True,
        text=True,
        env=settings_env(settings, **overrides),
        cwd=ROOT,
        timeout=120,
    )


@pytest.fixture
def own_queues(settings: Settings) -> Iterator[Settings]:
    """The run's settings with a queue prefix of this test's own, for tests that start their own workers."""
    isolated = settings.model_copy(update={"queue_prefix": f"{settings.queue_prefix}-{uuid.uuid4().hex[:6]}"})
    yield isolated
    delete_queues(isolated)


@pytest.fixture
def db(settings: Settings) -> Iterator[Connection]:
    with connect(settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    running = Sink(tmp_path / "maildir")
    yield running
    running.stop()


@pytest.fixture
def faulty_sink(tmp_path: Path) -> Iterator[Callable[..., Sink]]:
    """Start a sink with the given handler class; stopped after the test."""
    started: list[Sink] = []

    def start(
        handler: type[RecordingHandler], smtp_kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Sink:
        maildir = tmp_path / f"maildir-{len(started)}"
        sink = Sink(maildir, handler=handler(maildir, **options), **(smtp_kwargs or {}))
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()
    with warnings.catch_warnings():
        # aiosmtpd leaves the server side of a failed STARTTLS handshake for the collector.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture
def make_tenant(settings: Settings, sink: Sink, tmp_path: Path) -> Callable[..., str]:
    """Create a tenant sending to the test's sink; returns its id (unique per test)."""

    def make(**fields: Any) -> str:
        tenant_id = fields.pop("id", None) or f"t{uuid.uuid4().hex[:12]}"
        tenant = {
            "id": tenant_id,
            "smtp": {"host": sink.host, "port": sink.port, "security": "none", "helo": "test.postbote"},
            "series": {"batch_size": 1000, "pause_ms": 0},
            "employees": [{"id": "u1", "email": "anna@acme.example", "name": "Anna Berg"}],
            **fields,
        }
        path = tmp_path / f"{tenant_id}.yaml"
        path.write_text(yaml.safe_dump({"tenants": [tenant]}))
        with connect(settings.database_url) as conn:
            apply_tenants(conn, read_tenant_file(path))
        return tenant_id

    return make


class RunningWorker:
    """``postbote worker`` as a subprocess with its own log file."""

    def __init__(
        self,
        settings: Settings,
        *,
        processes: int = 1,
        threads: int = 4,
        options: tuple[str, ...] = (),
        **overrides: Any,
    ) -> None:
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"postbote-worker-{uuid.uuid4().hex[:8]}.log"
        self.metrics_port = int(overrides.pop("metrics_port", free_port()))
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker",
                    "worker",
                    "--processes",
                    str(processes),
                    "--threads",
                    str(threads),
                    *options,
                ],
                env=settings_env(settings, metrics_port=self.metrics_port, **overrides),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def output(self) -> str:
        """Everything the worker wrote so far (also after ``stop``)."""
        return self.log_path.read_text()


@pytest.fixture(scope="session")
def worker(settings: Settings) -> Iterator[RunningWorker]:
    """One worker for the run's ordinary end-to-end tests."""
    running = RunningWorker(settings, processes=1, threads=4)
    yield running
    running.stop()


def send_jobs(settings: Settings, jobs: list[dict[str, Any]]) -> list[str]:
    models = [Job.model_validate(j) for j in jobs]
    return [
        str(i) for i in publish(models, broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
    ]


def wait_final(db: Connection, job_ids: list[str], timeout: float = 60) -> dict[str, dict[str, Any]]:
    """Wait until every job has a final ledger status; returns the rows by job id."""
    deadline = time.monotonic() + timeout
    rows: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        found = db.execute(
            "SELECT * FROM deliveries WHERE job_id = ANY(%s::uuid[]) AND status IN ('sent', 'partial', 'failed')",
            (job_ids,),
        ).fetchall()
        rows = {str(r["job_id"]): r for r in found}
        if len(rows) == len(job_ids):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"only {len(rows)} of {len(job_ids)} jobs ended within {timeout}s")


def received_messages(sink: Sink, timeout: float = 10, count: int = 1) -> list[tuple[Any, Any]]:
    """(envelope record, parsed message) for what the sink received, waiting for ``count`` of them."""
    import email
    from email import policy

    deadline = time.monotonic() + timeout
    while len(sink.handler.received) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    out = []
    for record in list(sink.handler.received):
        data = (sink.handler.maildir / record.file).read_bytes()
        out.append((record, email.message_from_bytes(data, policy=policy.default)))
    return out
