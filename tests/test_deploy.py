"""deploy/: what can be checked without a container engine or a cluster."""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from release_service.core.settings import load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROLES = {"gateway": ["gateway"], "relay": ["relay"], "bookings": ["consume", "bookings"],
         "sms": ["consume", "sms"]}


def manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "release-service.yaml").read_text())
            if d]


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_manifest_is_valid(doc):
    kubernetes_validate.validate(doc, "1.37.0", strict=True)


def test_kubernetes_has_every_role_probes_and_budgets():
    docs = manifests()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == set(ROLES)
    for name, deployment in deployments.items():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == ROLES[name] and container["resources"]["limits"]
        assert "livenessProbe" in container
    gateway = deployments["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("HorizontalPodAutoscaler", "gateway") in kinds
    assert {n for k, n in kinds if k == "PodDisruptionBudget"} == set(ROLES)


def test_kubernetes_settings_are_valid_settings():
    docs = manifests()
    env = {**next(d for d in docs if d["kind"] == "ConfigMap")["data"],
           **next(d for d in docs if d["kind"] == "Secret")["stringData"]}
    settings = load_settings(env)
    assert settings.kafka_enable_idempotence and settings.kafka_replication_factor == 3


def test_compose_stack():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"kafka-1", "kafka-2", "kafka-3", "redis", "postgres", *ROLES} <= set(services)
    kafka = services["kafka-1"]["environment"]
    assert kafka["KAFKA_MIN_INSYNC_REPLICAS"] == 2
    assert kafka["KAFKA_DEFAULT_REPLICATION_FACTOR"] == 3
    assert kafka["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    assert "broker,controller" in kafka["KAFKA_PROCESS_ROLES"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert "synchronous_commit=on" in services["postgres"]["command"]
    assert services["gateway"]["deploy"]["replicas"] >= 2
    # The env_file the operator fills in, with every placeholder given a value.
    env_file = {}
    for line in (DEPLOY / "release-service.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name = line.split("=", 1)[0]
            env_file[name] = "https://sms.example.internal/m" if name.endswith("URL") else "x"
    for role, args in ROLES.items():
        assert services[role]["command"] == args
        assert services[role]["env_file"] == ["release-service.env"]
        env = {k: re.sub(r"\$\{POSTGRES_PASSWORD[^}]*\}", "pw", str(v))
               for k, v in services[role]["environment"].items()}
        assert load_settings({**env_file, **env}).kafka_enable_idempotence


def test_dockerfile_runs_as_a_user_and_copies_what_exists():
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["release-service"]' in text and re.search(r"^USER \d+", text, re.M)
    for source in re.findall(r"^COPY (?!--)(.+) \S+$", text, re.M):
        for path in source.split():
            assert (DEPLOY.parent / path).exists(), path


def test_grafana_dashboard_uses_only_metrics_we_export():
    import json

    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"release_[a-z_]+", target["expr"])}
    source = "".join(p.read_text() for p in (DEPLOY.parent / "release_service").rglob("*.py"))
    source += "".join(p.read_text() for p in (DEPLOY.parent / "consumers").rglob("*.py"))
    suffixes = ("_total", "_bucket", "_sum", "_count")
    for name in used:
        base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
        assert f'"{base}' in source or f'"{name}"' in source, name


def test_compose_file_passes_the_compose_client(tmp_path):
    """`docker-compose config` parses and checks the file (no engine needed)."""
    import shutil
    import subprocess

    shutil.copytree(DEPLOY, tmp_path / "deploy")
    folder = tmp_path / "deploy"
    shutil.copy(folder / "release-service.env.example", folder / "release-service.env")
    result = subprocess.run(["docker-compose", "-f", "compose.yaml", "config", "-q"],
                            cwd=folder, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "POSTGRES_PASSWORD": "x"},
                            check=False)
    assert result.returncode == 0, result.stderr
