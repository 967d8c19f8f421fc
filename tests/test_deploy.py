"""deploy/: what can be checked without a container engine or a cluster."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
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


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_stack():
    services = compose_file()["services"]
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


# -- the compose file against the Compose Specification -------------------------------


def compose_errors(document: dict[str, Any]) -> list[str]:
    """What the Compose Specification's JSON schema (as the check-jsonschema package ships
    it) finds wrong with a compose document: "path: message" lines."""
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)
    validator.check_schema(schema)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in validator(schema).iter_errors(document))


def test_compose_file_follows_the_compose_specification():
    assert compose_errors(compose_file()) == []


def _set(*path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        for key in path[:-1]:
            document = document[key]
        document[path[-1]] = value
    return change


@pytest.mark.parametrize(("change", "where", "why"), [
    (_set("services", "gateway", "replica", value=2), "services/gateway", "'replica'"),
    (_set("services", "gateway", "depends_on",
          value={"postgres": {"condition": "service_ready"}}),
     "services/gateway/depends_on", "service_ready"),
    (_set("services", "redis", "healthcheck",
          value={"test": ["CMD", "true"], "intervall": "5s"}),
     "services/redis/healthcheck", "'intervall'"),
    (_set("services", "postgres", "restart", value=["always"]),
     "services/postgres/restart", "not of type"),
    (_set("volumez", value={}), "", "'volumez'"),
], ids=["unknown service key", "bad depends_on condition", "unknown healthcheck key",
        "restart not a string", "unknown top-level key"])
def test_the_compose_check_rejects_a_broken_file(change, where, why):
    broken = copy.deepcopy(compose_file())
    change(broken)
    errors = compose_errors(broken)
    assert any(e.startswith(f"{where}: ") and why in e for e in errors), errors


def test_compose_references_resolve():
    """What the schema cannot see: every name a service refers to exists."""
    compose = compose_file()
    services = compose["services"]
    for name, service in services.items():
        for target, condition in service.get("depends_on", {}).items():
            assert target in services, (name, target)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[target], (name, target)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), (name, volume)
            else:
                assert source in compose["volumes"], (name, volume)
