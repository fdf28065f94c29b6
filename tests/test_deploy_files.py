"""The shipped deployment files: compose, image, Kubernetes, systemd, and no secrets in them."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.constants import DOCUMENTS_QUEUE, RECEIPTS_QUEUE, queue_name
from schemas.tenant import TenantFile
from tests.support.deploy import (
    DEPLOY,
    DOCS,
    KNOWN_METRICS,
    ROOT,
    bind_mounts,
    duration_seconds,
    load_yaml,
    load_yaml_docs,
)

KUBERNETES = DEPLOY / "kubernetes"
SYSTEMD_UNIT = DEPLOY / "systemd" / "postbote-worker.service"
SMTP_TIMEOUT_S = 30
METRICS_PORT = 9191

Manifests = dict[tuple[str, str], dict[str, Any]]


def _longest_pause_s(tenant_file: TenantFile) -> float:
    return max(t.series.pause_ms for t in tenant_file.tenants) / 1000


# --- compose -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(DEPLOY / "compose.yaml")
    return loaded


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    return " ".join(command) if isinstance(command, list) else str(command)


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {
        "rabbitmq",
        "postgres",
        "migrate",
        "worker",
        "prometheus",
        "grafana",
        "sink",
    }
    assert "management" in compose["services"]["rabbitmq"]["image"]


def test_compose_migrates_and_loads_tenants_once_before_the_workers_start(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert "postbote db upgrade" in _command(migrate) and "postbote tenants apply" in _command(migrate)
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker = compose["services"]["worker"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_compose_workers_can_be_scaled_and_stop_gracefully(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert _command(worker).startswith("worker")
    assert "container_name" not in worker and "ports" not in worker  # both break --scale
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    tenants = TenantFile.model_validate(load_yaml(DEPLOY / "compose" / "tenants.yaml"))
    assert duration_seconds(worker["stop_grace_period"]) > SMTP_TIMEOUT_S + _longest_pause_s(tenants)
    assert worker["environment"]["POSTBOTE_METRICS_PORT"] == str(METRICS_PORT)
    assert f"{METRICS_PORT}/readyz" in " ".join(worker["healthcheck"]["test"])


def test_compose_prometheus_finds_the_workers_by_service_name(compose: dict[str, Any]) -> None:
    assert bind_mounts(compose["services"]["prometheus"])["./prometheus"] == "/etc/prometheus"
    jobs = {j["job_name"]: j for j in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    [dns] = jobs["postbote"]["dns_sd_configs"]
    assert dns["names"] == ["worker"] and dns["port"] == METRICS_PORT


def test_compose_bind_mounts_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for host in bind_mounts(service):
            assert (DEPLOY / host).exists(), f"{name}: {host} does not exist"
    for service in compose["services"].values():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()


def test_compose_demo_tenant_is_valid_and_sends_to_the_sink(compose: dict[str, Any]) -> None:
    tenants = TenantFile.model_validate(load_yaml(DEPLOY / "compose" / "tenants.yaml"))
    sink = _command(compose["services"]["sink"])
    assert sink.startswith("sink ")
    port = int(re.search(r"--port (\d+)", sink).group(1))  # type: ignore[union-attr]
    assert {(t.smtp.host, t.smtp.port, t.smtp.security) for t in tenants.tenants} == {("sink", port, "none")}
    mounts = bind_mounts(compose["services"]["migrate"])
    assert mounts["./compose/tenants.yaml"] in _command(compose["services"]["migrate"])


# --- image ---------------------------------------------------------------------------------------


def test_worker_image_installs_the_package_and_runs_unprivileged() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert any("pip install /opt/postbote/src" in line for line in instructions)
    [user] = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert user.split(":")[0] not in {"root", "0"}
    assert 'ENTRYPOINT ["postbote"]' in instructions


# --- Kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    """Every Kubernetes object shipped, by (kind, name)."""
    objects = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            assert {"apiVersion", "kind"} <= set(doc), path.name
            if doc["kind"] == "Kustomization":
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def test_kubernetes_files_have_the_expected_kinds(manifests: Manifests) -> None:
    assert {kind for kind, _ in manifests} == {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "ScaledObject",
        "TriggerAuthentication",
        "PodDisruptionBudget",
        "Job",
        "ServiceMonitor",
    }


def test_kustomization_lists_every_manifest_except_the_examples_and_optional_ones() -> None:
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    listed = set(kustomization["resources"])
    shipped = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed <= shipped
    assert shipped - listed == {"secret.example.yaml", "servicemonitor.yaml"}


def _worker(manifests: Manifests) -> dict[str, Any]:
    return manifests[("Deployment", "postbote-worker")]


def _tenants(manifests: Manifests) -> TenantFile:
    text = manifests[("ConfigMap", "postbote-tenants")]["data"]["tenants.yaml"]
    return TenantFile.model_validate(yaml.safe_load(text))


def test_worker_probes_health_and_readiness_on_the_metrics_port(
    manifests: Manifests,
) -> None:
    [container] = _worker(manifests)["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "worker"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["POSTBOTE_METRICS_PORT"] == str(METRICS_PORT)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_worker_grace_period_outlasts_an_smtp_timeout_and_a_series_pause(
    manifests: Manifests,
) -> None:
    grace = _worker(manifests)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > SMTP_TIMEOUT_S + _longest_pause_s(_tenants(manifests))
    assert grace >= 60


def test_worker_runs_unprivileged(manifests: Manifests) -> None:
    spec = _worker(manifests)["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    [container] = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_service_pdb_and_scaler_select_the_worker_pods(manifests: Manifests) -> None:
    worker = _worker(manifests)
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert worker["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = manifests[("Service", "postbote-metrics")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
    pdb = manifests[("PodDisruptionBudget", "postbote-worker")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    monitor = manifests[("ServiceMonitor", "postbote")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()


def test_keda_scales_the_workers_on_both_queues(manifests: Manifests) -> None:
    scaled = manifests[("ScaledObject", "postbote-worker")]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "postbote-worker"
    assert scaled["minReplicaCount"] >= 1  # a receipt never waits for a pod to start
    [container] = _worker(manifests)["spec"]["template"]["spec"]["containers"]
    prefix = {e["name"]: e["value"] for e in container["env"]}["POSTBOTE_QUEUE_PREFIX"]
    triggers = scaled["triggers"]
    assert {t["type"] for t in triggers} == {"rabbitmq"}
    assert {t["metadata"]["queueName"] for t in triggers} == {
        queue_name(prefix, DOCUMENTS_QUEUE),
        queue_name(prefix, RECEIPTS_QUEUE),
    }
    for trigger in triggers:
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert ("TriggerAuthentication", trigger["authenticationRef"]["name"]) in manifests


def test_every_referenced_secret_and_key_has_an_example(manifests: Manifests) -> None:
    examples = {name: set(doc["stringData"]) for (kind, name), doc in manifests.items() if kind == "Secret"}
    for (kind, name), doc in manifests.items():
        if kind in {"Deployment", "Job"}:
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"]:
                for source in container.get("envFrom", []):
                    assert source["secretRef"]["name"] in examples, name
            for volume in pod.get("volumes", []):
                if "secret" in volume:
                    assert volume["secret"]["secretName"] in examples, name
        if kind == "TriggerAuthentication":
            for ref in doc["spec"]["secretTargetRef"]:
                assert ref["key"] in examples[ref["name"]]
    assert {"POSTBOTE_BROKER_URL", "POSTBOTE_DATABASE_URL"} <= examples["postbote-env"]


def test_tenant_configmap_is_valid_and_its_secret_files_are_mounted(
    manifests: Manifests,
) -> None:
    tenants = _tenants(manifests)
    candidates = [t.smtp.password_file for t in tenants.tenants]
    candidates += [t.dkim.private_key_file for t in tenants.tenants if t.dkim]
    files = [f for f in candidates if f is not None]
    assert files
    secret_keys = set(manifests[("Secret", "postbote-tenant-secrets")]["stringData"])
    for workload in (_worker(manifests), manifests[("Job", "postbote-migrate")]):
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        [container] = pod["containers"]
        mounts = {
            m["mountPath"]: volumes[m["name"]]
            for m in container["volumeMounts"]
            if "secret" in volumes[m["name"]]
        }
        for file in files:
            volume = mounts[str(file.parent)]
            assert volume["secret"]["secretName"] == "postbote-tenant-secrets"
            assert file.name in secret_keys


def test_migrate_job_upgrades_the_database_and_applies_the_mounted_tenant_file(
    manifests: Manifests,
) -> None:
    pod = manifests[("Job", "postbote-migrate")]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    script = " ".join(container["args"])
    assert "postbote db upgrade" in script
    tenant_file = re.search(r"postbote tenants apply (\S+)", script).group(1)  # type: ignore[union-attr]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {
        m["mountPath"]: volumes[m["name"]]["configMap"]["name"]
        for m in container["volumeMounts"]
        if "configMap" in volumes[m["name"]]
    }
    assert mounted[str(Path(tenant_file).parent)] == "postbote-tenants"
    assert Path(tenant_file).name in manifests[("ConfigMap", "postbote-tenants")]["data"]


# --- systemd -------------------------------------------------------------------------------------


def test_systemd_unit_parses_and_stops_gracefully() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(SYSTEMD_UNIT, encoding="utf-8")
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/postbote/")
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > SMTP_TIMEOUT_S + 10
    assert " worker" in service["ExecStart"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    env_example = (DEPLOY / "systemd" / "postbote.env.example").read_text(encoding="utf-8")
    variables = set(re.findall(r"^(POSTBOTE_\w+)=", env_example, re.M))
    assert {"POSTBOTE_BROKER_URL", "POSTBOTE_DATABASE_URL"} <= variables


def test_systemd_unit_passes_systemd_analyze_verify_where_available(tmp_path: Path) -> None:
    # configparser above checks the unit everywhere; systemd's own parser adds
    # unknown keys and bad values where systemd-analyze is installed.
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    unit = tmp_path / SYSTEMD_UNIT.name
    shutil.copy(SYSTEMD_UNIT, unit)
    result = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    # Only complaints about this unit count (not about the host's other units),
    # and not the missing ExecStart binary: it lives in the operator's venv.
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if SYSTEMD_UNIT.name in line and "is not executable: No such file or directory" not in line
    ]
    assert not problems, "\n".join(problems)


# --- secrets and docs ----------------------------------------------------------------------------


def test_no_private_key_is_shipped_outside_tests() -> None:
    begin = re.compile("-----BEGIN [A-Z0-9 ]*" + "PRIVATE KEY-----")
    skip = {".git", ".venv", "tests", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "var"}
    offenders = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in skip]
        for name in files:
            path = Path(directory) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if begin.search(text):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_operations_doc_lists_every_metric() -> None:
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\|\s*`(postbote_\w+)`", text, re.M))
    assert table == KNOWN_METRICS
