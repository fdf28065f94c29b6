"""What the benchmarks share: an own database and queue prefix, receivers, process figures."""

from __future__ import annotations

import json
import os
import platform
import pty
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import yaml
from cryptography.hazmat.backends.openssl import backend

from producer.queues import delete_prefix
from worker.db import connect, drop_database, ensure_database, upgrade
from worker.settings import Settings
from worker.testbed.sink import free_port
from worker.tools.tenant_file import TenantPolicy, apply_tenants, read_tenant_file

ROOT = Path(__file__).resolve().parent.parent
ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
BROKER_URL = os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SPAWNED: list[subprocess.Popen[bytes]] = []


def machine() -> str:
    """The CPU and versions the figures depend on, for the first line of a benchmark's output."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (
        f"machine: {os.cpu_count()} CPUs, {model} ({vector}), Python {platform.python_version()}, "
        f"{backend.openssl_version_text()} (cryptography)"
    )


@contextmanager
def bench_settings(**overrides: Any) -> Iterator[Settings]:
    """Settings with a fresh database and queue prefix, removed afterwards with the prefix's events exchange."""
    token = uuid.uuid4().hex[:8]
    name = f"postbote_bench_{token}"
    url = psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    ensure_database(url)
    with connect(url) as conn:
        upgrade(conn)
    settings = Settings(
        broker_url=BROKER_URL,
        database_url=url,
        queue_prefix=f"pbbench-{token}",
        metrics_port=free_port(),
        **{"secrets_dir": os.path.realpath(tempfile.gettempdir()), **overrides},
    )
    try:
        yield settings
    finally:
        while _SPAWNED:
            stop(_SPAWNED.pop())
        delete_prefix(settings.broker_url, settings.queue_prefix)
        drop_database(url)


def apply_tenant(settings: Settings, tenant: dict[str, Any], workdir: Path) -> None:
    path = workdir / f"{tenant['id']}.yaml"
    path.write_text(yaml.safe_dump({"tenants": [tenant]}))
    with connect(settings.database_url) as conn:
        apply_tenants(conn, read_tenant_file(path), TenantPolicy.from_settings(settings))


def env_for(settings: Settings, **overrides: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTBOTE_")}
    for key, value in {**settings.model_dump(), **overrides}.items():
        if value is not None:
            env[f"POSTBOTE_{key.upper()}"] = (
                json.dumps(value) if isinstance(value, dict | list) else str(value)
            )
    return env


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A worker started for a benchmark; ``bench_settings`` stops it at the latest on the way out,
    also when the benchmark fails."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    _SPAWNED.append(process)
    return process


def start_workers(
    settings: Settings,
    *,
    processes: int | None,
    threads: int | None,
    log: Path,
    pin_cpus: bool = False,
    **overrides: Any,
) -> subprocess.Popen[bytes]:
    """``postbote worker``; a count left ``None`` is the command's own default."""
    argv = [sys.executable, "-m", "worker", "worker"]
    if processes is not None:
        argv += ["--processes", str(processes)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    if pin_cpus:
        argv.append("--pin-cpus")
    return spawn(argv, env_for(settings, **overrides), log)


def stop(process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class SmtpSinkProcess:
    """Postfix's ``smtp-sink`` dumping every message to a file, in memory where ``/dev/shm`` exists
    (cheap enough not to be the bottleneck). Messages are counted from the running counter it
    prints (``-c``, on a terminal, the only place it flushes it after each message), so that
    polling the count costs nothing while the dump directory grows."""

    def __init__(self, port: int, dump_dir: Path, process: subprocess.Popen[bytes], counter: int) -> None:
        self.port = port
        self.dump_dir = dump_dir
        self.process = process
        self._received = 0
        self._cleared_at = 0
        threading.Thread(target=self._read_counter, args=(counter,), daemon=True).start()

    def _read_counter(self, fd: int) -> None:
        try:
            while chunk := os.read(fd, 65536):
                counters = chunk.rsplit(b"mesg=", 1)
                if len(counters) == 2 and (digits := counters[1].split(b"\r", 1)[0]).isdigit():
                    self._received = int(digits)
                time.sleep(0.02)
        except OSError:
            pass
        finally:
            os.close(fd)

    def count(self) -> int:
        return self._received - self._cleared_at

    def files(self) -> list[Path]:
        return [Path(e.path) for e in os.scandir(self.dump_dir)]

    def clear(self) -> None:
        self._cleared_at = self._received
        for path in self.files():
            path.unlink()


@contextmanager
def smtp_sink() -> Iterator[SmtpSinkProcess]:
    binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(binary).exists():
        raise SystemExit("bench: Postfix's smtp-sink is missing: apt-get install postfix")
    shm = Path("/dev/shm")
    memory = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    dump_dir = Path(tempfile.mkdtemp(prefix="postbote-smtp-sink-", dir=memory))
    dump_dir.chmod(0o777)
    port = free_port()
    user = ["-u", "postfix"] if os.geteuid() == 0 else []
    counter, terminal = pty.openpty()
    process = subprocess.Popen(
        [binary, *user, "-c", "-d", f"{dump_dir}/%H%M%S.", f"127.0.0.1:{port}", "1024"],
        stdout=terminal,
        stderr=subprocess.DEVNULL,
    )
    os.close(terminal)
    time.sleep(0.3)
    try:
        yield SmtpSinkProcess(port, dump_dir, process, counter)
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(dump_dir, ignore_errors=True)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(c) for c in children)
    return out


def service_pids(command: str) -> list[int]:
    """The processes whose command name is ``command`` (``postgres``, ``beam.smp``, ``smtp-sink``)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "comm").read_text().strip() == command:
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes (live ones)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def peak_rss_mb(pids: list[int]) -> float:
    """The largest peak resident set (VmHWM) among the processes, in MB."""
    return _largest_status_kb(pids, "VmHWM:") / 1024


def rss_mb(pids: list[int]) -> float:
    """The largest current resident set (VmRSS) among the processes, in MB."""
    return _largest_status_kb(pids, "VmRSS:") / 1024


def _largest_status_kb(pids: list[int], field: str) -> int:
    largest = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(field):
                largest = max(largest, int(line.split()[1]))
    return largest


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[index]
