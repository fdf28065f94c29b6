"""Reading the shipped deployment and observability files: metric names, YAML, durations, anchors."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas import constants
from tests.support.services import ROOT

DEPLOY = ROOT / "deploy"
DOCS = ROOT / "docs"

# The metric names are fixed in one place, schemas/constants.py (METRIC_*).
KNOWN_METRICS = frozenset(
    value for name, value in vars(constants).items() if name.startswith("METRIC_") and isinstance(value, str)
)
# Their types, which the names alone do not tell: a histogram has no series of
# its own name, only _bucket/_sum/_count.
GAUGES = frozenset(
    {
        "postbote_queue_messages",
        "postbote_queue_oldest_age_seconds",
        "postbote_login_failing",
        "postbote_jobs_parked",
        "postbote_tenant_paused_seconds",
    }
)
COUNTERS = frozenset(m for m in KNOWN_METRICS if m.endswith("_total"))
HISTOGRAMS = KNOWN_METRICS - GAUGES - COUNTERS
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_METRIC_REF = re.compile(r"\bpostbote_[A-Za-z0-9_]+")


def referenced_metrics(text: str) -> set[str]:
    """Every ``postbote_*`` series name mentioned in a rule file, dashboard or query."""
    return set(_METRIC_REF.findall(text))


def unknown_metrics(refs: set[str]) -> set[str]:
    """The references that name no exported series (a bare histogram name counts as unknown)."""
    series = set(COUNTERS | GAUGES)
    series |= {h + s for h in HISTOGRAMS for s in HISTOGRAM_SUFFIXES}
    return refs - series


def base_metric(ref: str) -> str:
    for h in HISTOGRAMS:
        if ref in {h + s for s in HISTOGRAM_SUFFIXES}:
            return h
    return ref


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def require_promtool() -> str:
    """The promtool binary; the test fails (is never skipped) when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install prometheus (Debian/Ubuntu) provides it")
    return path


def markdown_anchors(path: Path) -> set[str]:
    """GitHub-style anchors of the headings in a Markdown file."""
    anchors = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            title = m.group(1).strip().lower()
            title = re.sub(r"[^\w\- ]", "", title)
            anchors.add(title.replace(" ", "-"))
    return anchors


def duration_seconds(text: str) -> float:
    """A compose/Prometheus duration such as ``90s``, ``1m30s`` or ``2m``."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def bind_mounts(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's bind mounts (short syntax, host path relative): host path -> container path."""
    mounts = {}
    for volume in service.get("volumes", []):
        parts = volume.split(":")
        if parts[0].startswith((".", "/")):
            mounts[parts[0]] = parts[1]
    return mounts


__all__ = [
    "COUNTERS",
    "DEPLOY",
    "DOCS",
    "GAUGES",
    "HISTOGRAMS",
    "HISTOGRAM_SUFFIXES",
    "KNOWN_METRICS",
    "ROOT",
    "base_metric",
    "bind_mounts",
    "duration_seconds",
    "load_yaml",
    "load_yaml_docs",
    "markdown_anchors",
    "referenced_metrics",
    "require_promtool",
    "unknown_metrics",
]
