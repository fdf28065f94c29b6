"""The shape of the house holds: imports point one way (read from the source with ``ast``, never imported)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import ROOT

OPERATOR_SIDE = ("worker.tools", "worker.cli", "worker.testbed")


def imported_modules(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, also those inside functions;
    relative imports are resolved against ``package``. ``from a import b`` yields both ``a`` and
    ``a.b``, because ``b`` may be a module."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def package_of(path: Path) -> str:
    """The package a module file's relative imports start from: ``worker/job/smtp/pool.py`` and
    ``worker/job/smtp/__init__.py`` both give ``worker.job.smtp``."""
    return ".".join(path.relative_to(ROOT).parent.parts)


def forbidden_imports(directory: str, forbidden: tuple[str, ...]) -> list[str]:
    """``file:line imports module`` for each import under ``directory`` of one of ``forbidden``."""
    paths = sorted((ROOT / directory).rglob("*.py"))
    assert paths, f"no modules under {directory}/: the layout this test guards has moved"
    found = set()
    for path in paths:
        for line, module in imported_modules(path.read_text(encoding="utf-8"), package_of(path)):
            if any(module == f or module.startswith(f"{f}.") for f in forbidden):
                found.add(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(found)


@pytest.mark.parametrize("directory", ["producer", "schemas"])
def test_the_producer_and_the_schemas_do_not_import_the_worker(directory: str) -> None:
    assert forbidden_imports(directory, ("worker",)) == []


def test_the_job_path_does_not_import_operator_tools_the_cli_or_the_testbed() -> None:
    assert forbidden_imports("worker/job", OPERATOR_SIDE) == []


def test_the_runtime_does_not_import_operator_tools_the_cli_or_the_testbed() -> None:
    assert forbidden_imports("worker/runtime", OPERATOR_SIDE) == []


def test_the_bounce_stages_do_not_import_operator_tools_the_cli_or_the_testbed() -> None:
    assert forbidden_imports("worker/bounces", OPERATOR_SIDE) == []


def test_relative_and_nested_imports_are_seen_as_the_modules_they_name() -> None:
    source = (
        "from ..ratelimit import SeriesLimiter\n"
        "from . import auth\n"
        "def later() -> None:\n"
        "    from ...tools import dlq\n"
        "    import worker.cli\n"
    )
    found = {module for _, module in imported_modules(source, "worker.job.smtp")}
    assert {
        "worker.job.ratelimit",
        "worker.job.ratelimit.SeriesLimiter",
        "worker.job.smtp",
        "worker.job.smtp.auth",
        "worker.tools",
        "worker.tools.dlq",
        "worker.cli",
    } <= found
