"""Clusters of our own for the high-availability tests and ``bench/ha_failover.py``: a RabbitMQ
cluster of private nodes and a PostgreSQL primary with a streaming standby, each on its own ports
and data directories under ``HA_ROOT``, never the machine's shared services.

Both are broken the unclean way (``SIGKILL``, ``SIGSTOP``) and always torn down: ``close`` kills
what is left, and a new cluster first kills the processes a crashed run left behind (found by
the pid files under ``HA_ROOT``, and only when the process still runs our own data directory).
So ``make test-ha`` and ``bench/ha_failover.py`` do not run at the same time on one machine.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from producer import publish
from schemas.job import Job
from worker.db import Connection, connect, ensure_database, upgrade
from worker.settings import Settings
from worker.testbed.sink import RecordingHandler, free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
HA_ROOT = Path(tempfile.gettempdir()) / "postbote-ha"
_RABBITMQ_HOME = "/var/lib/rabbitmq"  # the rabbitmq user's home: its Erlang cookie joins our nodes


def kill_leftovers() -> list[int]:
    """Kill (SIGKILL) the nodes and servers an earlier run under ``HA_ROOT`` left running; returns their pids."""
    killed: list[int] = []
    pid_files = glob.glob(str(HA_ROOT / "*" / "*" / "pid")) + glob.glob(
        str(HA_ROOT / "*" / "*" / "postmaster.pid")
    )
    for pid_file in pid_files:
        owner = str(Path(pid_file).parent.parent)
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(Path(pid_file).read_text().split()[0])
            # A PostgreSQL server names its directory in its command line, a RabbitMQ node in
            # its environment.
            if any(
                owner.encode() in Path(f"/proc/{pid}/{part}").read_bytes() for part in ("cmdline", "environ")
            ):
                for each in [*_children(pid), pid]:
                    _signal(each, signal.SIGCONT)
                    _signal(each, signal.SIGKILL)
                killed.append(pid)
    for directory in HA_ROOT.glob("*"):
        shutil.rmtree(directory, ignore_errors=True)
    return killed


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    with contextlib.suppress(OSError):
        return [int(p) for p in path.read_text().split()]
    return []


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _own_dir(prefix: str, user: str) -> Path:
    HA_ROOT.mkdir(mode=0o755, exist_ok=True)
    HA_ROOT.chmod(0o755)
    directory = Path(tempfile.mkdtemp(prefix=prefix, dir=HA_ROOT))
    directory.chmod(0o755)
    shutil.chown(directory, user, user)
    return directory


def _run_as(user: str, *command: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    settings = [f"{k}={v}" for k, v in (env or {}).items()]
    result = subprocess.run(
        ["runuser", "-u", user, "--", "env", *settings, *command],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, command, result.stdout, result.stderr)
    return result.stdout


# RabbitMQ


class RabbitmqNode:
    """One private RabbitMQ node: its own name, AMQP and distribution ports, data and log directories."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = directory / name
        self.dir.mkdir()
        self.node = f"{name}@localhost"
        self.port = free_port()
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        for path in [self.dir, *self.dir.iterdir()]:
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {
            "HOME": _RABBITMQ_HOME,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(self.dir / "feature_flags"),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self) -> None:
        """Start the node (also after a kill, with its data) and wait until it runs."""
        (self.dir / "pid").unlink(missing_ok=True)
        _run_as("rabbitmq", str(RABBITMQ_BIN / "rabbitmq-server"), "-detached", env=self.env)
        self.ctl("wait", str(self.dir / "pid"), "--timeout", "90", timeout=120)
        self.ctl("await_startup", "--timeout", "90", timeout=120)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        return _run_as(
            "rabbitmq",
            str(RABBITMQ_BIN / "rabbitmqctl"),
            "-n",
            self.node,
            *args,
            env={"HOME": _RABBITMQ_HOME},
            timeout=timeout,
        )

    def pid(self) -> int:
        return int((self.dir / "pid").read_text().split()[0])

    def kill(self) -> None:
        """``kill -9`` of the node's Erlang VM: no goodbye to its peers or its clients."""
        _signal(self.pid(), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.pid()}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = self.pid()
            for each in [*_children(pid), pid]:
                _signal(each, signal.SIGKILL)


class RabbitmqCluster:
    """``size`` private RabbitMQ nodes started in parallel and joined into one cluster."""

    def __init__(self, size: int = 3) -> None:
        self.dir = _own_dir("rabbitmq-", "rabbitmq")
        tag = uuid.uuid4().hex[:6]
        self.nodes = [RabbitmqNode(self.dir, f"pbha{tag}n{i}") for i in range(size)]
        try:
            with ThreadPoolExecutor(size) as pool:
                list(pool.map(RabbitmqNode.start, self.nodes))
            first = self.nodes[0]
            for node in self.nodes[1:]:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.node)
                node.ctl("start_app")
                node.ctl("await_startup", "--timeout", "60", timeout=90)
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """Every node, separated by ``;``: what ``POSTBOTE_BROKER_URL`` names for a cluster."""
        return ";".join(node.url for node in self.nodes)

    def alive(self) -> list[RabbitmqNode]:
        return [n for n in self.nodes if (n.dir / "pid").exists() and Path(f"/proc/{n.pid()}").exists()]

    def queues(self) -> dict[str, tuple[str, str, int]]:
        """Each queue's ``(type, leader node, messages)``, asked of a running node."""
        out = self.alive()[0].ctl(
            "list_queues", "-q", "--no-table-headers", "name", "type", "leader", "messages"
        )
        result = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                result[parts[0]] = (parts[1], parts[2], int(parts[3]) if parts[3].isdigit() else 0)
        return result

    def leader_of(self, queue: str) -> RabbitmqNode:
        leader = self.queues()[queue][1]
        return next(n for n in self.nodes if n.node == leader)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# PostgreSQL


class PostgresServer:
    """One PostgreSQL server of a pair: a data directory of its own and its own port."""

    def __init__(self, bin_dir: Path, directory: Path) -> None:
        self.bin = bin_dir
        self.data = directory
        self.port = free_port()

    def pg_ctl(self, *args: str) -> str:
        return _run_as("postgres", str(self.bin / "pg_ctl"), "-D", str(self.data), *args)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1"
        self.pg_ctl(
            "-w", "-t", "60", "-l", str(self.data.parent / f"{self.data.name}.log"), "-o", options, "start"
        )

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def processes(self) -> list[int]:
        """The postmaster and its children (every backend and helper process)."""
        pid = self.postmaster()
        return [pid, *_children(pid)]

    def signal_all(self, sig: int) -> None:
        for pid in self.processes():
            _signal(pid, sig)

    def execute(self, sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description else []

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for pid in self.processes():
                _signal(pid, signal.SIGCONT)
                _signal(pid, signal.SIGKILL)


class PostgresPair:
    """A primary with one streaming standby, replicating synchronously or asynchronously."""

    def __init__(self, *, synchronous: bool) -> None:
        self.synchronous = synchronous
        self.dir = _own_dir("postgres-", "postgres")
        bin_dir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1])
        self.primary = PostgresServer(bin_dir, self.dir / "primary")
        self.standby = PostgresServer(bin_dir, self.dir / "standby")
        try:
            _run_as(
                "postgres",
                str(bin_dir / "initdb"),
                "-D",
                str(self.primary.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            )
            with (self.primary.data / "postgresql.conf").open("a") as conf:
                conf.write("wal_level = replica\nmax_wal_senders = 5\nwal_keep_size = '64MB'\n")
            self.primary.start()
            _run_as(
                "postgres",
                str(bin_dir / "pg_basebackup"),
                "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
                "-D", str(self.standby.data), "-R", "-X", "stream", "--no-sync",
                "--checkpoint=fast",
            )  # fmt: skip
            self.standby.start()
            if synchronous:
                # After the base backup: a copied setting would make the promoted standby wait forever.
                self.primary.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
                self.primary.execute("SELECT pg_reload_conf()")
            wanted = "sync" if synchronous else "async"
            deadline = time.monotonic() + 30
            while [r[0] for r in self.primary.execute("SELECT sync_state FROM pg_stat_replication")] != [
                wanted
            ]:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the standby did not become {wanted} within 30 s")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def url(self, dbname: str) -> str:
        """The libpq multi-host URL of both servers: writes go to whichever is the primary."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}/{dbname}"
            "?target_session_attrs=read-write"
        )

    def kill_primary(self) -> None:
        """``kill -9`` of the primary's postmaster and every backend: no goodbye to its clients."""
        self.primary.signal_all(signal.SIGKILL)

    def freeze_primary(self) -> None:
        """``kill -STOP`` of the primary: its sockets stay open, its kernel still acknowledges, nothing answers."""
        self.primary.signal_all(signal.SIGSTOP)

    def hold_replication(self) -> Callable[[], None]:
        """Stop the primary's WAL sender (``kill -STOP``), so that what the primary commits from now
        on stays on it, as behind a slow link; returns what lets it go on. (Stopping the standby's
        receiver instead would not do: the WAL would wait in its socket buffer and arrive after
        all.) Only for an asynchronous pair: a synchronous primary would wait for the standby."""
        (pid,) = self.primary.execute("SELECT pid FROM pg_stat_replication")[0]
        assert isinstance(pid, int)
        _signal(pid, signal.SIGSTOP)
        return lambda: _signal(pid, signal.SIGCONT)

    def promote(self) -> None:
        self.standby.pg_ctl("-w", "-t", "60", "promote")

    def close(self) -> None:
        self.primary.close()
        self.standby.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# Runs


def ha_settings(broker_url: str, database_url: str, **overrides: Any) -> Settings:
    """Settings of a run against private services: a migrated database, quorum queues, short backoffs."""
    ensure_database(database_url)
    with connect(database_url) as conn:
        upgrade(conn)
    values: dict[str, Any] = {
        "broker_url": broker_url,
        "database_url": database_url,
        "queue_prefix": f"pbha-{uuid.uuid4().hex[:8]}",
        "queue_type": "quorum",
        "metrics_port": free_port(),
        "settings_cache_ms": 200,
        "smtp_timeout_ms": 5000,
        "min_backoff_ms": 200,
        "max_backoff_ms": 1000,
        **overrides,
    }
    return Settings(**values)


def publish_jobs(settings: Settings, jobs: list[dict[str, Any]]) -> list[str]:
    """Publish ``jobs`` with the settings' broker URL (every node) and queue type; returns their ids."""
    models = [Job.model_validate(j) for j in jobs]
    ids = publish(
        models,
        broker_url=settings.broker_url,
        queue_prefix=settings.queue_prefix,
        queue_type=settings.queue_type,
    )
    return [str(i) for i in ids]


def wait_received(handler: RecordingHandler, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(handler.received) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(handler.received)} of {count} mails arrived within {timeout}s")
        time.sleep(0.01)


def longest_pause(handler: RecordingHandler, start: float, end: float | None = None) -> float:
    """The longest time without an arriving mail between ``start`` (a failure, ``time.time()``) and
    ``end`` (by default the last arrival): how long sending stalled. Mails already in a worker's
    hands when the failure struck still arrive; the stall comes once they are sent."""
    times = sorted(r.arrived_at for r in list(handler.received) if r.arrived_at >= start)
    if end is not None:
        times = [t for t in times if t <= end]
    points = [start, *times]
    return max((b - a for a, b in zip(points, points[1:], strict=False)), default=0.0)


def settled_statuses(
    db: Connection, ids: list[str], *, quiet_s: float = 8, timeout: float = 180
) -> dict[str, str]:
    """Each job's ledger status once all are ``sent`` or nothing changed for ``quiet_s`` (after an
    asynchronous failover some never end: their ``sent`` mark was lost with the primary)."""
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    since = time.monotonic()
    while time.monotonic() < deadline:
        rows = db.execute(
            "SELECT job_id::text AS job_id, status FROM deliveries WHERE job_id = ANY(%s::uuid[])", (ids,)
        ).fetchall()
        now = {str(r["job_id"]): str(r["status"]) for r in rows}
        if now != last:
            last, since = now, time.monotonic()
        elif (
            len(now) == len(ids) and all(s == "sent" for s in now.values())
        ) or time.monotonic() - since > quiet_s:
            return now
        time.sleep(0.2)
    return last


__all__ = [
    "HA_ROOT",
    "PostgresPair",
    "PostgresServer",
    "RabbitmqCluster",
    "RabbitmqNode",
    "ha_settings",
    "kill_leftovers",
    "longest_pause",
    "publish_jobs",
    "settled_statuses",
    "wait_received",
]
