"""The shared RabbitMQ and PostgreSQL a test run uses, and postbote driven as a user drives it:
the ``postbote`` CLI and ``postbote worker`` as subprocesses, jobs published through the producer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import psycopg
import yaml

import producer.queues
from producer import publish
from schemas.job import Job
from worker.db import connect
from worker.runtime.secrets_box import generate_key, load_key_ring
from worker.settings import Settings
from worker.testbed.sink import Sink, free_port
from worker.tools.tenant_file import TenantPolicy, apply_tenants, read_tenant_file

ROOT = Path(__file__).resolve().parents[2]
BROKER_URL = os.environ.get("POSTBOTE_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
ADMIN_URL = os.environ.get("POSTBOTE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


SECRETS_DIR = os.path.realpath(tempfile.gettempdir())
"""The test run's ``POSTBOTE_SECRETS_DIR``: every ``tmp_path`` lies inside it."""


def secrets_key_file() -> Path:
    """The test runs' ``POSTBOTE_SECRETS_KEY_FILE`` (made once, kept in ``var/``)."""
    path = ROOT / "var" / "test-secrets.key"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path.with_suffix(f".{os.getpid()}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_key() + "\n")
        os.replace(path.with_suffix(f".{os.getpid()}"), path)
    return path


def tenant_policy(settings: Settings | None = None) -> TenantPolicy:
    """What ``postbote tenants apply`` allows with ``settings`` (default: the test run's key and directory)."""
    if settings is None:
        return TenantPolicy(load_key_ring(secrets_key_file()), SECRETS_DIR)
    return TenantPolicy.from_settings(settings)


def helper_token_file(settings: Settings) -> Path:
    """The file the test run's token helper ``test-token`` prints (``cat FILE``)."""
    return Path(settings.token_helpers["test-token"].removeprefix("cat "))


def database_url(name: str) -> str:
    """The URL of database ``name`` on the test PostgreSQL server."""
    return psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)


def isolated_settings(settings: Settings, **overrides: Any) -> Settings:
    """``settings`` with a queue prefix of its own (so a dedicated worker gets only our jobs) and
    ``overrides``; the caller deletes its queues with :func:`delete_queues`."""
    return settings.model_copy(
        update={"queue_prefix": f"{settings.queue_prefix}-{uuid.uuid4().hex[:6]}", **overrides}
    )


def delete_queues(settings: Settings) -> None:
    """Delete every queue under ``settings.queue_prefix``, and its events exchange."""
    producer.queues.delete_prefix(settings.broker_url, settings.queue_prefix)


def settings_env(settings: Settings, **overrides: Any) -> dict[str, str]:
    """The environment a ``postbote`` subprocess needs to act on this test run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBOTE_")}
    for key, value in {**settings.model_dump(), **overrides}.items():
        if value is not None:
            env[f"POSTBOTE_{key.upper()}"] = (
                json.dumps(value) if isinstance(value, dict | list) else str(value)
            )
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


class RunningWorker:
    """``postbote worker`` as a subprocess with its own log file."""

    def __init__(
        self,
        settings: Settings,
        *,
        processes: int = 1,
        threads: int = 4,
        options: tuple[str, ...] = (),
        address_space_bytes: int | None = None,
        **overrides: Any,
    ) -> None:
        """``address_space_bytes`` limits the virtual memory of the supervisor and of each worker
        process (``RLIMIT_AS``, inherited), with glibc keeping two malloc arenas so that what
        counts is what the process uses rather than what its threads reserve."""
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"postbote-worker-{uuid.uuid4().hex[:8]}.log"
        self.metrics_port = int(overrides.pop("metrics_port", free_port()))
        env = settings_env(settings, metrics_port=self.metrics_port, **overrides)
        limit: list[str] = []
        if address_space_bytes is not None:
            env["MALLOC_ARENA_MAX"] = "2"
            limit = ["prlimit", f"--as={address_space_bytes}:{address_space_bytes}"]  # execs the command
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [
                    *limit,
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
                env=env,
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


def add_tenant(
    database_url: str, sink: Sink, workdir: Path, *, policy: TenantPolicy | None = None, **fields: Any
) -> str:
    """Load a tenant sending to ``sink`` (plaintext, unthrottled, employee ``u1``) with ``fields``
    on top, through a tenant file in ``workdir``; returns its id (a fresh one unless ``id`` is given).
    ``policy``: what apply allows (default: the test run's key ring and secrets directory)."""
    tenant_id = fields.pop("id", None) or f"t{uuid.uuid4().hex[:12]}"
    tenant = {
        "id": tenant_id,
        "smtp": {"host": sink.host, "port": sink.port, "security": "none", "helo": "test.postbote"},
        "series": {"batch_size": 1000, "pause_ms": 0},
        "employees": [{"id": "u1", "email": "anna@acme.example", "name": "Anna Berg"}],
        **fields,
    }
    path = workdir / f"{tenant_id}.yaml"
    path.write_text(yaml.safe_dump({"tenants": [tenant]}))
    with connect(database_url) as conn:
        apply_tenants(conn, read_tenant_file(path), policy or tenant_policy())
    return tenant_id


def send_jobs(settings: Settings, jobs: list[dict[str, Any]]) -> list[str]:
    """Validate and publish ``jobs`` as the producer does; returns their ids."""
    models = [Job.model_validate(j) for j in jobs]
    return [
        str(i) for i in publish(models, broker_url=settings.broker_url, queue_prefix=settings.queue_prefix)
    ]


__all__ = [
    "ADMIN_URL",
    "BROKER_URL",
    "ROOT",
    "add_tenant",
    "SECRETS_DIR",
    "RunningWorker",
    "database_url",
    "delete_queues",
    "helper_token_file",
    "isolated_settings",
    "postbote",
    "secrets_key_file",
    "send_jobs",
    "settings_env",
    "tenant_policy",
]
