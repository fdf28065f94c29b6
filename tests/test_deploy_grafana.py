"""The shipped Grafana dashboard and its provisioning."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.deploy import (
    DEPLOY,
    KNOWN_METRICS,
    base_metric,
    bind_mounts,
    load_yaml,
    referenced_metrics,
    require_promtool,
    unknown_metrics,
)

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "postbote-dashboard.json"

_SMTP_QUANTILE = r"histogram_quantile\({q}, sum by \(le[^)]*\) \(rate\(postbote_smtp_send_seconds_bucket"

# What the dashboard must show, as a pattern one of its queries must match.
REQUIRED_QUERIES = {
    "throughput by tenant and doc type": r"sum by \(tenant, doc_type\) \(rate\(postbote_mails_sent_total",
    "failures by reason": r"sum by \([^)]*reason[^)]*\) \(rate\(postbote_mails_failed_total",
    "SMTP latency p50": _SMTP_QUANTILE.format(q=r"0\.5"),
    "SMTP latency p95": _SMTP_QUANTILE.format(q=r"0\.95"),
    "series wait": r"histogram_quantile\(0\.95, [^\n]*postbote_ratelimit_wait_seconds_bucket",
    "queue depth": r"max by \(queue\) \(postbote_queue_messages\)",
    "dead-letter size": r'postbote_queue_messages\{queue="dead"\}',
    "dead-letter oldest age": r'postbote_queue_oldest_age_seconds\{queue="dead"\}',
    "retries by reason": r"sum by \([^)]*reason[^)]*\) \(rate\(postbote_retries_total",
    "duplicates prevented": r"postbote_duplicates_prevented_total",
}

# Grafana's macros and variables, replaced by something Prometheus understands.
GRAFANA_SUBSTITUTIONS = {"$__rate_interval": "1m", "$__range": "1h", "$tenant": ".*"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    with DASHBOARD.open(encoding="utf-8") as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def _queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_is_a_current_importable_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "postbote" and dashboard["title"]
    assert dashboard["id"] is None  # importable into any Grafana
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"


def test_every_panel_has_the_datasource_and_targets(dashboard: dict[str, Any]) -> None:
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    panels = [p for p in _panels(dashboard) if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target.get("datasource", datasource) == datasource, panel["title"]


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        columns = range(pos["x"], pos["x"] + pos["w"])
        cells = {(x, y) for x in columns for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_dashboard_uses_only_metrics_that_exist(dashboard: dict[str, Any]) -> None:
    refs = referenced_metrics(json.dumps(dashboard))
    assert not unknown_metrics(refs), "the dashboard uses metrics not in schemas/constants.py"


def test_dashboard_shows_every_metric(dashboard: dict[str, Any]) -> None:
    shown = {base_metric(r) for r in referenced_metrics("\n".join(_queries(dashboard)))}
    assert shown >= KNOWN_METRICS


@pytest.mark.parametrize("need", sorted(REQUIRED_QUERIES))
def test_dashboard_shows(dashboard: dict[str, Any], need: str) -> None:
    pattern = re.compile(REQUIRED_QUERIES[need])
    assert any(pattern.search(q) for q in _queries(dashboard)), need


def test_every_dashboard_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    rules = []
    for i, query in enumerate(_queries(dashboard)):
        for macro, value in GRAFANA_SUBSTITUTIONS.items():
            query = query.replace(macro, value)
        assert "$" not in query, f"unknown Grafana variable in {query!r}"
        rules.append({"record": f"dashboard:query_{i}", "expr": query})
    rule_file = tmp_path / "dashboard-queries.yml"
    groups = {"groups": [{"name": "dashboard", "rules": rules}]}
    rule_file.write_text(yaml.safe_dump(groups), encoding="utf-8")
    result = subprocess.run(
        [require_promtool(), "check", "rules", str(rule_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_points_grafana_at_prometheus_and_the_dashboard() -> None:
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert [(d["type"], d["url"], d["isDefault"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090", True)
    ]
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "postbote.yaml")["providers"]
    assert [p["type"] for p in providers] == ["file"]
    path = providers[0]["options"]["path"]
    grafana = load_yaml(DEPLOY / "compose.yaml")["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert Path(mounts["./grafana/postbote-dashboard.json"]).parent == Path(path)
