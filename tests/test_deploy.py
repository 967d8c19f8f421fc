"""deploy/: what can be checked without a container engine or a cluster (the Redis
high-availability script runs for real, on loopback)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from processes import free_port

from release_service.core.settings import Settings, load_settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
REDIS_HA_SCRIPT = DEPLOY / "redis" / "redis-ha.sh"
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
    assert {n for k, n in kinds if k == "PodDisruptionBudget"} == {*ROLES, "redis",
                                                                     "redis-sentinel"}


def named(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kubernetes_settings_are_valid_settings():
    docs = manifests()
    env = {**named(docs, "ConfigMap", "release-service-settings")["data"],
           **named(docs, "Secret", "release-service-secrets")["stringData"]}
    settings = load_settings(env)
    assert settings.kafka_enable_idempotence and settings.kafka_replication_factor == 3
    assert settings.redis_min_replicas == 1
    assert settings.redis_sentinel_master == "release"


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_stack():
    services = compose_file()["services"]
    assert {"kafka-1", "kafka-2", "kafka-3", "postgres", *ROLES} <= set(services)
    kafka = services["kafka-1"]["environment"]
    assert kafka["KAFKA_MIN_INSYNC_REPLICAS"] == 2
    assert kafka["KAFKA_DEFAULT_REPLICATION_FACTOR"] == 3
    assert kafka["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    assert "broker,controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert "synchronous_commit=on" in services["postgres"]["command"]
    assert services["gateway"]["deploy"]["replicas"] >= 2
    for role, args in ROLES.items():
        assert services[role]["command"] == args
        assert services[role]["env_file"] == ["release-service.env"]
        assert compose_role_settings(services, role).kafka_enable_idempotence


def compose_role_settings(services: dict[str, Any], role: str) -> Settings:
    """What a role's container loads: the env_file the operator fills in (every placeholder
    given a value) under the service's environment."""
    env_file = {}
    for line in (DEPLOY / "release-service.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name = line.split("=", 1)[0]
            env_file[name] = "https://sms.example.internal/m" if name.endswith("URL") else "x"
    env = {k: re.sub(r"\$\{POSTGRES_PASSWORD[^}]*\}", "pw", str(v))
           for k, v in services[role]["environment"].items()}
    return load_settings({**env_file, **env})


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
    (_set("services", "redis-1", "healthcheck",
          value={"test": ["CMD", "true"], "intervall": "5s"}),
     "services/redis-1/healthcheck", "'intervall'"),
    (_set("services", "sentinel-1", "restart", value=["always"]),
     "services/sentinel-1/restart", "not of type"),
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


# -- Redis high availability ----------------------------------------------------------


def flag(args: list[str], name: str) -> str:
    return args[args.index(f"--{name}") + 1]


def assert_durable_data_node(args: list[str]) -> None:
    """A primary-or-replica started by redis-ha.sh with AOF on, and refusing writes while
    no replica has acknowledged its stream within 10 s (a replica may become primary)."""
    assert args[:3] == ["sh", "/redis-ha/redis-ha.sh", "node"]
    assert flag(args, "appendonly") == "yes" and flag(args, "appendfsync") == "everysec"
    assert flag(args, "maxmemory-policy") == "noeviction"
    assert flag(args, "min-replicas-to-write") == "1"
    assert flag(args, "min-replicas-max-lag") == "10"


def addresses(listed: str) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, _, port in
            (part.strip().rpartition(":") for part in listed.split(","))]


def test_compose_redis_is_a_primary_two_replicas_and_three_sentinels():
    services = compose_file()["services"]
    by_role: dict[str, dict[str, Any]] = {"node": {}, "sentinel": {}}
    for name, service in services.items():
        command = service.get("command") or []
        if command[:2] == ["sh", "/redis-ha/redis-ha.sh"]:
            by_role[command[2]][name] = service
            assert "./redis:/redis-ha:ro" in service["volumes"]
            assert f"{name}:/data" in service["volumes"]  # its own volume
    nodes, sentinels = by_role["node"], by_role["sentinel"]
    assert sorted(nodes) == ["redis-1", "redis-2", "redis-3"]
    assert sorted(sentinels) == ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name, node in nodes.items():
        assert_durable_data_node(node["command"])
        assert node["environment"]["REDIS_SELF"] == f"{name}:6379"
    sentinel_addresses = {addresses(s["environment"]["REDIS_SELF"])[0]
                          for s in sentinels.values()}
    assert {host for host, _ in sentinel_addresses} == set(sentinels)
    members = [*nodes.values(), *sentinels.values()]
    assert {m["environment"]["REDIS_FIRST_PRIMARY"] for m in members} == {"redis-1:6379"}
    assert {m["environment"]["REDIS_MASTER_NAME"] for m in members} == {"release"}
    for member in members:
        assert set(addresses(member["environment"]["REDIS_SENTINELS"])) == sentinel_addresses
    # A failover needs 2 of the 3 sentinels to see the primary down.
    assert {s["environment"]["SENTINEL_QUORUM"] for s in sentinels.values()} == {"2"}
    for role in ROLES:
        settings = compose_role_settings(services, role)
        assert set(addresses(settings.redis_sentinels)) == sentinel_addresses
        assert settings.redis_sentinel_master == "release"
        assert settings.redis_min_replicas == 1
        assert set(sentinels) <= set(services[role]["depends_on"])


def test_kubernetes_redis_is_a_primary_two_replicas_and_three_sentinels():
    docs = manifests()
    namespace = "release-service"
    redis_ha = named(docs, "ConfigMap", "redis-ha-settings")["data"]

    def members(name: str, port: int) -> list[str]:
        """The StatefulSet's pod names as the others reach them, checked on the way: 3 pods
        on 3 machines, a headless Service that names them before they are ready, a
        budget that keeps 2 up, the script mounted and REDIS_SELF set from the pod."""
        statefulset = named(docs, "StatefulSet", name)
        spec = statefulset["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["replicas"] == 3 and spec["selector"]["matchLabels"] == labels
        anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"] == [
            {"labelSelector": {"matchLabels": labels}, "topologyKey": "kubernetes.io/hostname"}]
        service = named(docs, "Service", spec["serviceName"])["spec"]
        assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"]
        assert service["selector"] == labels and service["ports"][0]["port"] == port
        budget = named(docs, "PodDisruptionBudget", name)["spec"]
        assert budget["minAvailable"] == 2 and budget["selector"]["matchLabels"] == labels
        pod = spec["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        suffix = f"{spec['serviceName']}.{namespace}.svc:{port}"
        assert env["REDIS_SELF"]["value"] == f"$(POD_NAME).{suffix}"
        assert {"configMapRef": {"name": "redis-ha-settings"}} in container["envFrom"]
        assert {"name": "scripts", "configMap": {"name": "redis-ha-scripts"}} in pod["volumes"]
        assert {"name": "scripts", "mountPath": "/redis-ha", "readOnly": True} in \
            container["volumeMounts"]
        assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
        assert [t["metadata"]["name"] for t in spec["volumeClaimTemplates"]] == ["data"]
        return [f"{name}-{i}.{suffix}" for i in range(spec["replicas"])]

    nodes = members("redis", 6379)
    sentinels = members("redis-sentinel", 26379)
    data = named(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
    assert_durable_data_node(data["command"] + data["args"])
    sentinel = named(docs, "StatefulSet", "redis-sentinel")
    assert sentinel["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "sh", "/redis-ha/redis-ha.sh", "sentinel"]
    assert redis_ha["REDIS_FIRST_PRIMARY"] == nodes[0]
    assert addresses(redis_ha["REDIS_SENTINELS"]) == addresses(",".join(sentinels))
    assert redis_ha["SENTINEL_QUORUM"] == "2"
    script = named(docs, "ConfigMap", "redis-ha-scripts")["data"]["redis-ha.sh"]
    assert script == REDIS_HA_SCRIPT.read_text()
    settings = load_settings({**named(docs, "ConfigMap", "release-service-settings")["data"],
                              **named(docs, "Secret", "release-service-secrets")["stringData"]})
    assert addresses(settings.redis_sentinels) == addresses(",".join(sentinels))
    assert settings.redis_sentinel_master == redis_ha["REDIS_MASTER_NAME"]
    assert settings.redis_min_replicas == 1


# -- redis-ha.sh run for real, on loopback --------------------------------------------


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def _until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError):
            result = check()
            if result:
                return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class RedisHaSet:
    """Three data nodes and three sentinels started by deploy/redis/redis-ha.sh, as the
    compose file and the manifests start them, on loopback ("localhost", so that hostnames
    are what the members announce) with free ports and a short down-after."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        ports = _free_ports(6)
        self.nodes = [f"localhost:{p}" for p in ports[:3]]
        self.sentinels = [f"localhost:{p}" for p in ports[3:]]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def env(self, member: str) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "REDIS_MASTER_NAME": "release",
                "REDIS_FIRST_PRIMARY": self.nodes[0],
                "REDIS_SENTINELS": ",".join(self.sentinels), "REDIS_SELF": member,
                "SENTINEL_QUORUM": "2", "SENTINEL_DOWN_AFTER_MS": "2000",
                "SENTINEL_FAILOVER_TIMEOUT_MS": "5000",
                "SENTINEL_CONFIG": str(self.folder / f"sentinel-{member[-5:]}.conf")}

    def start(self, member: str, **env: str) -> None:
        port = member.rpartition(":")[2]
        data = self.folder / f"data-{port}"
        data.mkdir(exist_ok=True)
        if member in self.nodes:
            # The same redis-server options as the compose file and the manifests.
            args = [*compose_file()["x-redis-node"]["command"][2:], "--dir", str(data)]
        else:
            args = ["sentinel"]
        with open(self.folder / f"{port}.log", "ab") as log:
            self.processes[member] = subprocess.Popen(
                ["sh", str(REDIS_HA_SCRIPT), *args, "--bind", "127.0.0.1"],
                env={**self.env(member), **env},
                cwd=data, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        client = self.client(member)
        _until(lambda: client.ping(), f"{member} to answer")

    def stop(self, member: str) -> None:
        process = self.processes.pop(member)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def client(self, member: str) -> redis.Redis:
        host, _, port = member.rpartition(":")
        return redis.Redis(host=host, port=int(port), socket_timeout=5, decode_responses=True)

    def primary(self) -> str | None:
        """The sentinels' answer when all three give the same one (not midway through a
        failover)."""
        answers = {tuple(self.client(s).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "release") or ()) for s in self.sentinels}
        if len(answers) != 1:
            return None
        (host, port), = answers
        return f"{host}:{port}"

    def log(self, member: str) -> str:
        return (self.folder / f"{member.rpartition(':')[2]}.log").read_text()


@pytest.fixture
def redis_ha_set(tmp_path: Path) -> Iterator[RedisHaSet]:
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (scripts/dev installs it)")
    ha = RedisHaSet(tmp_path)
    try:
        yield ha
    finally:
        for member in list(ha.processes):
            ha.stop(member)


def test_redis_ha_script_fails_over_and_a_restarted_node_follows_the_sentinels(redis_ha_set):
    ha = redis_ha_set
    # The sentinels first, as when the whole set starts: they answer from their config
    # (redis-1 is the first primary) and the nodes take their roles from that answer.
    for member in ha.sentinels + ha.nodes:
        ha.start(member)
    first, *replicas = ha.nodes
    for node in ha.nodes:
        config = ha.client(node).config_get("min-replicas-*")
        assert config == {"min-replicas-to-write": "1", "min-replicas-max-lag": "10"}
        assert ha.client(node).config_get("appendonly") == {"appendonly": "yes"}
    for replica in replicas:
        assert ha.client(replica).info("replication")["master_port"] == int(first[-5:])
    # Every sentinel sees the primary, both replicas and enough sentinels for a failover.
    for sentinel in ha.sentinels:
        client = ha.client(sentinel)
        _until(lambda c=client: c.execute_command("SENTINEL", "CKQUORUM", "release")
               .startswith("OK 3 usable"), f"{sentinel} to see all three sentinels")
        _until(lambda c=client: len(c.sentinel_slaves("release")) == 2,
               f"{sentinel} to see both replicas")
    assert ha.primary() == first  # announced by hostname, as in the deployments

    primary = ha.client(first)
    _until(lambda: primary.info("replication")["min_slaves_good_slaves"] == 2,
           "both replicas in sync")
    primary.set("claim", "kept")
    assert primary.execute_command("WAIT", 1, 2000) >= 1

    ha.stop(first)
    promoted = _until(lambda: (now := ha.primary()) != first and now, "a failover", 30)
    assert promoted in replicas
    assert ha.client(promoted).get("claim") == "kept"  # WAIT 1 got it to a replica

    # Restarted with its first-start settings, the old primary asks the sentinels and
    # comes back as a replica of the new one (not as a second primary).
    ha.start(first)
    assert f"primary: {promoted.replace(':', ' ')}" in ha.log(first)
    old = ha.client(first)

    def follows_the_sentinels() -> str | None:
        # The sentinels' current primary: on a loaded machine they may have failed over
        # once more since (a node stalled past down-after), and the node must follow that.
        info, current = old.info("replication"), ha.primary()
        following = (info["role"] == "slave" and info["master_link_status"] == "up"
                     and current and info["master_port"] == int(current[-5:]))
        return current if following else None
    promoted = _until(follows_the_sentinels, "the old primary to replicate the new one")
    assert old.get("claim") == "kept"

    # With no replica left the primary refuses writes (min-replicas-to-write 1); the
    # lag allowed shortened from the deployments' 10 s, so the test need not wait it out.
    ha.client(promoted).config_set("min-replicas-max-lag", 1)
    for node in ha.nodes:
        if node != promoted:
            ha.stop(node)
    def refused() -> bool:
        try:
            ha.client(promoted).set("claim", "lost")
        except redis.ResponseError as exc:
            return str(exc).startswith("NOREPLICAS")
        return False
    _until(refused, "the primary to refuse writes", 15)
    assert ha.client(promoted).get("claim") == "kept"


def test_redis_ha_script_without_sentinels_falls_back_to_the_first_primary(redis_ha_set):
    ha = redis_ha_set
    first, second, _ = ha.nodes
    started = time.monotonic()
    for node in (first, second):
        ha.start(node, REDIS_SENTINEL_WAIT_SECONDS="2")
        assert "no sentinel answered; first primary" in ha.log(node)
    assert time.monotonic() - started >= 4  # each waited for the sentinels first
    assert ha.client(first).info("replication")["role"] == "master"
    assert ha.client(second).info("replication")["master_port"] == int(first[-5:])
