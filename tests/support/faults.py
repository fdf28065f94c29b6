"""Tools of the fault tests: private RabbitMQ and PostgreSQL instances to break, raw publishing,
and the one assertion every fault test makes."""

from __future__ import annotations

import contextlib
import email
import glob
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from email import policy
from pathlib import Path
from typing import Any

import pika

from producer.queues import declare_queues
from schemas.constants import DOCUMENTS_QUEUE, queue_name
from tests.support.cluster import RabbitmqNode
from tests.support.ledger import dead_reasons, recipient_states, wait_final
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.sink import RecordingHandler, free_port


class PrivateRabbitmq:
    """A RabbitMQ node of our own (own name, ports and data directory) that a test may restart.

    The machine's shared node is never touched: ``rabbitmqctl -n`` always names ours.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pbfault-rmq-"))
        self.dir.chmod(0o755)
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        self.node = RabbitmqNode(self.dir, f"pbfault-{uuid.uuid4().hex[:8]}")
        try:
            self.node.start()
        except BaseException:
            self.close()
            raise

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def url(self) -> str:
        return self.node.url

    def ctl(self, *args: str) -> None:
        self.node.ctl(*args)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "90")

    def close(self) -> None:
        try:
            self.ctl("stop")
        except (subprocess.CalledProcessError, OSError):
            self.node.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL cluster of our own in a temporary directory, to stop and start at will."""

    def __init__(self) -> None:
        self.bin = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.dir = Path(tempfile.mkdtemp(prefix="pbfault-pg-"))
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.dir / "data"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        self.start()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-l", str(self.dir / "log"), "-o", options, "start")

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def _pg_ctl(self, *args: str) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-w", *args)

    @staticmethod
    def _as_postgres(*command: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command], check=True, capture_output=True, timeout=60
        )


def publish_raw(settings: Settings, body: bytes, lane: str = DOCUMENTS_QUEUE) -> None:
    """Put bytes on a lane's work queue as a careless publisher would, bypassing all validation."""
    queue = queue_name(settings.queue_prefix, lane)
    connection = pika.BlockingConnection(pika.URLParameters(settings.broker_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, queue)
        channel.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2))
    finally:
        connection.close()


def dramatiq_message(settings: Settings, *args: Any, actor: str = "send_document", **fields: Any) -> bytes:
    """A well-formed dramatiq message body carrying ``args``."""
    message = {
        "queue_name": queue_name(settings.queue_prefix, DOCUMENTS_QUEUE),
        "actor_name": actor,
        "args": list(args),
        "kwargs": {},
        "options": {},
        "message_id": str(uuid.uuid4()),
        "message_timestamp": int(time.time() * 1000),
        **fields,
    }
    return json.dumps(message).encode()


def copies_received(*handlers: RecordingHandler) -> Counter[tuple[str, str]]:
    """How often each (job id, envelope recipient) arrived at the sinks."""
    copies: Counter[tuple[str, str]] = Counter()
    for handler in handlers:
        for record in list(handler.received):
            message = email.message_from_bytes(
                (handler.maildir / record.file).read_bytes(), policy=policy.default
            )
            for rcpt in record.rcpt_tos:
                copies[(str(message["X-Postbote-Job"]), rcpt)] += 1
    return copies


def assert_sent_once_or_dead(
    db: Connection,
    job_ids: list[str],
    *handlers: RecordingHandler,
    timeout: float = 90,
    possible_duplicates: bool = False,
) -> dict[str, dict[str, Any]]:
    """Every accepted job ends sent exactly once (each accepted recipient has one copy) or dead
    with a reason (and nothing arrived). With ``possible_duplicates``, a second copy is allowed
    only where the ledger counted a takeover: the one documented duplicate window."""
    rows = wait_final(db, job_ids, timeout=timeout)
    time.sleep(0.3)  # a late duplicate would have arrived by now
    copies = copies_received(*handlers)
    dead = dead_reasons(db, job_ids)
    for job_id, row in rows.items():
        if row["status"] in ("sent", "partial"):
            allowed = {1, 2} if possible_duplicates and row["takeovers"] > 0 else {1}
            for rcpt, (_, state) in recipient_states(db, job_id).items():
                expected = allowed if state == "accepted" else {0}
                assert copies[(job_id, rcpt)] in expected, (job_id, rcpt, state, copies[(job_id, rcpt)], row)
            assert job_id not in dead, (job_id, dead[job_id])
        else:
            assert row["reason"], row
            assert dead.get(job_id), (
                f"job {job_id} failed ({row['reason']}) but is not in the dead-letter store"
            )
            assert not [k for k in copies if k[0] == job_id], f"dead job {job_id} arrived anyway"
    return rows


def worker_children(supervisor_pid: int) -> list[int]:
    """The worker processes a ``postbote worker`` supervisor runs (Linux /proc)."""
    path = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children")
    pids = [int(p) for p in path.read_text().split()] if path.exists() else []
    # multiprocessing's resource tracker is a child too; workers are the ones running our code.
    return [p for p in pids if b"multiprocessing.spawn" in Path(f"/proc/{p}/cmdline").read_bytes()]


__all__ = [
    "PrivatePostgres",
    "PrivateRabbitmq",
    "assert_sent_once_or_dead",
    "copies_received",
    "dramatiq_message",
    "publish_raw",
    "worker_children",
]
