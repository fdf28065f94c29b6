"""The installed libraries are ones pyproject.toml allows, so a dependency bump that leaves a
checked range fails here instead of in production."""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def declared() -> list[Requirement]:
    """Every requirement in pyproject.toml: ``[project] dependencies`` and each optional group."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    groups = project.get("optional-dependencies", {}).values()
    return [Requirement(line) for line in [*project["dependencies"], *(r for group in groups for r in group)]]


def distributions_whose_internals_the_worker_uses() -> set[str]:
    """The distributions ``worker/library_internals.py`` imports, for type checking too (the
    standard library aside)."""
    tree = ast.parse((ROOT / "worker" / "library_internals.py").read_text(encoding="utf-8"))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"__future__"}
    owners = packages_distributions()
    return {owners[module][0] for module in third_party}


REQUIREMENTS = declared()


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=[r.name for r in REQUIREMENTS])
def test_the_installed_version_is_in_the_range_pyproject_declares(requirement: Requirement) -> None:
    try:
        installed = version(requirement.name)
    except PackageNotFoundError:
        pytest.fail(
            f"{requirement.name} is not installed, pyproject.toml requires {requirement}: run make install"
        )
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is installed but pyproject.toml allows {requirement.specifier}. "
        "If this is an upgrade, run tests/test_library_internals.py with it and widen the range when it passes."
    )


def test_every_library_whose_internals_the_worker_uses_has_an_upper_bound() -> None:
    used = distributions_whose_internals_the_worker_uses()
    assert {"aiosmtpd", "dkimpy", "dramatiq", "pika"} <= used  # the scan finds what it is meant to
    bounds = {r.name.lower(): r.specifier for r in REQUIREMENTS}
    unbounded = sorted(
        name
        for name in used
        if not any(spec.operator in ("<", "<=", "==", "~=") for spec in bounds.get(name.lower(), ()))
    )
    assert unbounded == [], (
        f"worker/library_internals.py uses internals of {', '.join(unbounded)}, which pyproject.toml does "
        "not bound from above: pin the range the internals were checked in"
    )
