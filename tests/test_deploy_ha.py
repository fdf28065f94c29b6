"""The shipped high-availability variants, read as files: the compose override with a three-node
RabbitMQ cluster, and the Kubernetes overlay with the RabbitMQ operator's ``RabbitmqCluster`` and
a CloudNativePG ``Cluster``. Workers and producers name every node and declare quorum queues."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg.conninfo
import pytest

from producer.queues import broker_parameters
from tests.support.deploy import DEPLOY, DOCS, bind_mounts, load_yaml, load_yaml_docs
from worker.settings import Settings

HA_COMPOSE = DEPLOY / "compose.ha.yaml"
HA_KUBERNETES = DEPLOY / "kubernetes" / "ha"
RABBITMQ_NODES = ("rabbitmq", "rabbitmq-2", "rabbitmq-3")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(HA_COMPOSE)
    return loaded


@pytest.fixture(scope="module")
def overlay() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(HA_KUBERNETES.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            if doc["kind"] != "Kustomization":
                objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _settings(environment: dict[str, str]) -> Settings:
    return Settings.model_validate({k.removeprefix("POSTBOTE_").lower(): v for k, v in environment.items()})


def test_compose_ha_runs_three_rabbitmq_nodes_that_form_one_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(RABBITMQ_NODES) <= set(services)
    cookies = {services[n]["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] for n in RABBITMQ_NODES}
    assert len(cookies) == 1
    config = (DEPLOY / "compose" / "rabbitmq-cluster.conf").read_text()
    for name in RABBITMQ_NODES:
        node = services[name]
        assert node["hostname"] == name
        assert f"rabbit@{name}" in config
        assert "healthcheck" in node
        mounts = bind_mounts(node)
        assert mounts and all((HA_COMPOSE.parent / source).exists() for source in mounts), mounts
    volumes = {v.split(":")[0] for n in RABBITMQ_NODES for v in services[n]["volumes"]}
    assert len([v for v in volumes if v.endswith("-data")]) == 3  # a data volume of its own each
    assert "pause_minority" in config


def test_compose_ha_workers_and_producers_name_every_node_and_declare_quorum_queues(
    compose: dict[str, Any],
) -> None:
    for name in ("worker", "migrate", "sink"):
        settings = _settings(compose["services"][name]["environment"])
        assert settings.queue_type == "quorum"
        assert sorted(p.host for p in broker_parameters(settings.broker_url)) == sorted(RABBITMQ_NODES)
    depends = compose["services"]["worker"]["depends_on"]
    assert all(depends[n]["condition"] == "service_healthy" for n in RABBITMQ_NODES[1:])


def test_kubernetes_ha_overlay_adds_both_clusters_to_the_base_and_lists_every_file(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kustomization = load_yaml(HA_KUBERNETES / "kustomization.yaml")
    listed = set(kustomization["resources"]) | {p["path"] for p in kustomization["patches"]}
    assert "../" in listed
    shipped = {p.name for p in HA_KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert shipped - listed == {"secret.example.yaml"}
    assert {kind for kind, _ in overlay} >= {"RabbitmqCluster", "Cluster", "Deployment", "Secret"}


def test_the_rabbitmq_cluster_has_an_odd_majority_on_separate_hosts(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    cluster = overlay[("RabbitmqCluster", "postbote-rabbitmq")]
    assert cluster["apiVersion"] == "rabbitmq.com/v1beta1"
    replicas = cluster["spec"]["replicas"]
    assert replicas >= 3 and replicas % 2 == 1
    anti = cluster["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert "pause_minority" in cluster["spec"]["rabbitmq"]["additionalConfig"]


def test_the_postgresql_cluster_has_a_synchronous_standby_on_another_host(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    cluster = overlay[("Cluster", "postbote-postgres")]
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = cluster["spec"]
    assert spec["instances"] >= 2
    assert 1 <= spec["minSyncReplicas"] <= spec["maxSyncReplicas"] < spec["instances"]
    assert spec["affinity"]["podAntiAffinityType"] == "required"
    assert spec["bootstrap"]["initdb"]["database"] == "postbote"


def test_the_ha_workers_declare_quorum_queues_and_the_example_secret_names_every_node(
    overlay: dict[tuple[str, str], dict[str, Any]],
) -> None:
    patch = overlay[("Deployment", "postbote-worker")]
    env = {e["name"]: e["value"] for e in patch["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTBOTE_QUEUE_TYPE"] == "quorum"
    secret = _settings(overlay[("Secret", "postbote-env")]["stringData"])
    hosts = [p.host for p in broker_parameters(secret.broker_url)]
    assert len(hosts) == 3 and all("postbote-rabbitmq-nodes" in h for h in hosts)
    database = psycopg.conninfo.conninfo_to_dict(secret.database_url)
    assert database["host"] == "postbote-postgres-rw.postbote.svc"
    assert database["target_session_attrs"] == "read-write"


def test_the_high_availability_doc_names_every_shipped_variant() -> None:
    text = (DOCS / "high-availability.md").read_text()
    for path in [HA_COMPOSE, *sorted(HA_KUBERNETES.glob("*.yaml"))]:
        assert str(Path(path).relative_to(DEPLOY.parent)) in text, path
