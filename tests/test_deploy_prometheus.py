"""The shipped Prometheus configuration and alert rules: valid, tested, documented."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.deploy import (
    DEPLOY,
    DOCS,
    KNOWN_METRICS,
    load_yaml,
    markdown_anchors,
    referenced_metrics,
    require_promtool,
    unknown_metrics,
)

PROMETHEUS = DEPLOY / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "alerts.yml"
RULE_TESTS = PROMETHEUS / "alerts_test.yml"

# What operators asked to be alerted on, and the alert that covers it.
REQUIRED_ALERTS = {
    "dead-letter queue growing": "PostboteDeadLetterGrowing",
    "failure ratio high": "PostboteFailureRatioHigh",
    "oldest queued job too old (receipts)": "PostboteReceiptsDelayed",
    "oldest queued job too old (documents)": "PostboteDocumentsDelayed",
    "a worker down": "PostboteWorkerDown",
    "no worker up at all": "PostboteNoWorkers",
    "nothing sent while a backlog exists": "PostboteStalled",
}


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def _alerts() -> list[dict[str, object]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"] if "alert" in rule]


def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    result = _promtool("check", "rules", str(RULES), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_passes_promtool_check_from_any_directory(tmp_path: Path) -> None:
    # rule_files and file_sd paths resolve relative to the config file, not the caller.
    result = _promtool("check", "config", str(CONFIG), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass(tmp_path: Path) -> None:
    result = _promtool("test", "rules", str(RULE_TESTS), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_config_loads_the_shipped_rules() -> None:
    config = load_yaml(CONFIG)
    assert [(CONFIG.parent / f).resolve() for f in config["rule_files"]] == [RULES.resolve()]


def test_every_postbote_scrape_job_matches_the_alerts_job_selector() -> None:
    jobs = [job["job_name"] for job in load_yaml(CONFIG)["scrape_configs"]]
    postbote_jobs = [j for j in jobs if j != "prometheus"]
    assert postbote_jobs and all(j.startswith("postbote") for j in postbote_jobs)
    assert 'job=~"postbote.*"' in RULES.read_text(encoding="utf-8")


def test_every_required_condition_has_an_alert() -> None:
    names = {rule["alert"] for rule in _alerts()}
    missing = {need: alert for need, alert in REQUIRED_ALERTS.items() if alert not in names}
    assert not missing


def test_every_alert_has_a_severity_summary_description_and_runbook_in_the_docs() -> None:
    anchors = markdown_anchors(DOCS / "operations.md")
    for rule in _alerts():
        annotations = rule["annotations"]
        assert isinstance(annotations, dict)
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]  # type: ignore[index]
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        page, _, anchor = str(annotations["runbook_url"]).partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: docs/operations.md has no heading #{anchor}"


def test_every_alert_is_seen_firing_in_the_rule_unit_tests() -> None:
    fired = {
        case["alertname"]
        for test in load_yaml(RULE_TESTS)["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in _alerts()} <= fired


def test_every_alert_is_also_seen_not_firing_in_the_rule_unit_tests() -> None:
    quiet = {
        case["alertname"]
        for test in load_yaml(RULE_TESTS)["tests"]
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in _alerts()} <= quiet


def test_rules_and_their_tests_use_only_metrics_that_exist() -> None:
    for path in (RULES, RULE_TESTS):
        refs = referenced_metrics(path.read_text(encoding="utf-8"))
        assert refs, path
        assert not unknown_metrics(refs), f"{path.name} uses metrics not in schemas/constants.py"


def test_the_metric_list_is_the_one_in_schemas_constants() -> None:
    assert "postbote_mails_sent_total" in KNOWN_METRICS
    assert len(KNOWN_METRICS) >= 12
