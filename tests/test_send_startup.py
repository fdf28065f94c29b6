"""A command loads only its own module: `postbote send` starts without the worker's libraries."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import ROOT
from worker.cli import COMMANDS, build_parser


def registered(module: str) -> list[str]:
    subparsers = argparse.ArgumentParser().add_subparsers()
    importlib.import_module(f"worker.cli.{module}").register(subparsers)
    return list(subparsers.choices)


@pytest.mark.parametrize("module", COMMANDS)
def test_each_command_module_registers_the_commands_listed_for_it(module: str) -> None:
    assert registered(module) == list(COMMANDS[module])


def test_a_command_alone_parses_as_in_the_full_parser() -> None:
    argv = ["send", "jobs.jsonl"]
    assert build_parser("send").parse_args(argv) == build_parser().parse_args(argv)


def test_send_loads_neither_dramatiq_nor_psycopg_nor_the_job_path(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"tenant": "acme"}\n')
    script = (
        "import sys\n"
        "from worker.cli import main\n"
        f"assert main(['send', {str(path)!r}]) == 2\n"
        "print('\\n'.join(sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    roots = {name.split(".")[0] for name in done.stdout.split()}
    assert not roots & {"dramatiq", "psycopg", "cryptography", "aiosmtpd", "prometheus_client"}
    assert not [name for name in done.stdout.split() if name.startswith(("worker.job", "worker.runtime"))]
