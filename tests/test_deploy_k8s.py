"""deploy/k8s checked by the tools that know its formats, offline, and against the services.

kubernetes-validate (PyPI; it bundles the Kubernetes JSON schemas) validates every manifest
strictly against Kubernetes 1.30: a misspelled field is an error, a kind it has no schema for
only a warning, so any warning fails too. nats-server checks the broker's configuration
(``nats-server -t``). The rest reads the manifests beside the code: every probe aims at a route
the service really serves, on the port its settings make it listen on; every ``GALVANI_*``
variable is a setting of the service it is given to; every multi-replica workload has a
PodDisruptionBudget that selects its pods; no Secret is committed, and README.md says how to
create each one referenced.
"""

import base64
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]
from pydantic_settings import BaseSettings

from deploy.stack.nats_cluster import CalloutConfig, NatsNode, find_nats_server, render_config
from deploy.stack.pki import DevelopmentPKI
from services.api.health.endpoints import router as health_router
from services.api.settings import ApiSettings
from services.broker_access.settings import BrokerAccessSettings
from services.common.metrics_server import READY_PATH
from services.common.settings import REPO_ROOT
from services.ingest.settings import IngestSettings
from services.maintenance.settings import MaintenanceSettings
from services.notify.settings import NotifySettings
from services.rules.settings import RulesSettings

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"

# What each service's container runs, and the settings class that reads its environment.
SETTINGS: dict[str, type[BaseSettings]] = {
    "services.api.main": ApiSettings,
    "services.ingest.main": IngestSettings,
    "services.rules.main": RulesSettings,
    "services.notify.main": NotifySettings,
    "services.maintenance.main": MaintenanceSettings,
    "services.broker_access.main": BrokerAccessSettings,
}
# Ingest and rules serve Prometheus' exposition and /ready (services/common/metrics_server.py);
# notify, maintenance and the responders the exposition only (prometheus_client).
WORKER_ROUTES = frozenset({"/metrics", READY_PATH})
METRICS_ONLY_ROUTES = frozenset({"/metrics"})
METRICS_MODULES = (
    "services.ingest.main",
    "services.rules.main",
    "services.notify.main",
    "services.maintenance.main",
    "services.broker_access.main",
)
# nats-server's monitoring routes the probes may use (its /healthz and two of its options).
NATS_HEALTH_ROUTES = frozenset(
    {"/healthz", "/healthz?js-enabled-only=true", "/healthz?js-server-only=true"}
)

Manifest = dict[str, Any]
# What a container must listen on for the kubelet's probes to reach it over the pod's IP.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104


def manifest_files() -> list[Path]:
    """The manifests kustomization.yaml applies, in its order."""
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    return [K8S_DIR / name for name in kustomization["resources"]]


def load_all() -> list[Manifest]:
    """Every object of every manifest."""
    objects: list[Manifest] = []
    for path in manifest_files():
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def validation_problems(paths: list[Path]) -> tuple[int, list[str], str]:
    """kubernetes-validate's exit status, its lines that are not INFO, and its whole output."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if line and not line.startswith("INFO ")]
    return result.returncode, problems, output


def workloads() -> list[Manifest]:
    """The Deployments and StatefulSets."""
    return [obj for obj in load_all() if obj["kind"] in ("Deployment", "StatefulSet")]


def pod_spec(workload: Manifest) -> Manifest:
    """A workload's pod spec."""
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def plain_env(container: Manifest) -> dict[str, str]:
    """A container's environment variables with a literal value."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def module_of(container: Manifest) -> str | None:
    """The module a container runs with ``python -m``, or None."""
    command = container.get("command", [])
    if command[:2] == ["python", "-m"]:
        return str(command[2])
    return None


def container_port(container: Manifest, port: int | str) -> int:
    """A probe's port as a number (a named port looked up in the container's ports)."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"{container['name']}: no port named {port}")


def env_prefix(settings: type[BaseSettings]) -> str:
    """A settings class's environment prefix (``GALVANI_API_``)."""
    return str(settings.model_config.get("env_prefix", ""))


def nats_config() -> str:
    """nats.conf from the broker's ConfigMap."""
    (config_map,) = [
        obj
        for obj in load_all()
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "galvani-nats-config"
    ]
    return str(config_map["data"]["nats.conf"])


def nats_statefulset() -> Manifest:
    """The broker's StatefulSet."""
    (statefulset,) = [obj for obj in workloads() if obj["kind"] == "StatefulSet"]
    return statefulset


def listen_port(config: str, key: str) -> int:
    """The port of a top-level ``key: "host:port"`` line of a NATS configuration."""
    match = re.search(rf'^\s*{key}:\s*"[^"]*:(\d+)"', config, re.MULTILINE)
    assert match, f"no {key} listener in nats.conf"
    return int(match.group(1))


def config_shape(text: str) -> set[str]:
    """The dotted paths of every key of a NATS configuration (``mqtt.stream_replicas``,
    ``accounts.AUTH.users.{}.user``), its values, comments and URLs left out."""
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    text = re.sub(r'"[^"]*"', '""', text)
    text = re.sub(r"[a-z-]+://[^\s,\]]+", "url", text)
    paths: set[str] = set()
    stack: list[str] = []
    for match in re.finditer(r"([A-Za-z_][\w-]*)\s*(:\s*\{|:|\{)|(\{)|(\})", text):
        key, separator, anonymous, close = match.groups()
        if close:
            stack.pop()
        elif anonymous:
            stack.append("{}")
        else:
            paths.add(".".join([*stack, key]))
            if "{" in separator:
                stack.append(key)
    assert not stack, "unbalanced braces"
    return paths


def block_listen_port(config: str, block: str) -> int:
    """The port of the ``listen`` line of a NATS configuration's ``block { ... }``."""
    match = re.search(rf'^\s*{block} \{{[^}}]*?listen: "[^"]*:(\d+)"', config, re.MULTILINE)
    assert match, f"no listen in the {block} block of nats.conf"
    return int(match.group(1))


def account_nkey() -> str:
    """A fresh account public nkey (``A...``): base32 of the prefix byte, an Ed25519 public
    key and its CRC-16/XMODEM, as nats-server expects of an auth-callout issuer."""
    raw = bytes([0]) + os.urandom(32)  # prefix byte 0 << 3: an account
    crc = 0
    for byte in raw:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return base64.b32encode(raw + crc.to_bytes(2, "little")).decode().rstrip("=")


def test_kustomization_applies_every_manifest() -> None:
    listed = {path.name for path in manifest_files()}
    present = {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_every_manifest_passes_kubernetes_validate_strict() -> None:
    status, problems, output = validation_problems(manifest_files())
    assert status == 0, output
    assert problems == [], output
    passed = [line for line in output.splitlines() if " passed for resource " in line]
    assert len(passed) == len(load_all()), output


def test_the_validator_refuses_a_misspelled_field_and_warns_on_an_unknown_kind(
    tmp_path: Path,
) -> None:
    statefulset = (K8S_DIR / "nats.yaml").read_text().replace("periodSeconds", "periodSecond")
    (tmp_path / "typo.yaml").write_text(statefulset)
    status, problems, output = validation_problems([tmp_path / "typo.yaml"])
    assert status != 0, output
    assert any("periodSecond" in line for line in problems), output
    (tmp_path / "crd.yaml").write_text(
        "apiVersion: example.com/v1\nkind: BrokerCluster\nmetadata: {name: x}\n"
    )
    _, problems, output = validation_problems([tmp_path / "crd.yaml"])
    assert any(line.startswith("WARN") for line in problems), output


def test_every_workload_probes_a_route_its_service_serves_on_the_port_it_listens_on() -> None:
    api_routes = {route.path for route in health_router.routes}  # type: ignore[attr-defined]
    assert {"/healthz", "/readyz"} <= api_routes
    nats_monitor_port = listen_port(nats_config(), "http")
    probed = set()
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            env = plain_env(container)
            module = module_of(container)
            for kind in ("livenessProbe", "readinessProbe"):
                probe = container.get(kind)
                assert probe, f"{workload['metadata']['name']}/{container['name']}: no {kind}"
                where = f"{workload['metadata']['name']} {kind}"
                if module == "services.api.main":
                    assert env["GALVANI_API_HOST"] == ALL_INTERFACES, where
                    get = probe["httpGet"]
                    assert get["path"] in api_routes, where
                    assert container_port(container, get["port"]) == int(env["GALVANI_API_PORT"])
                elif module in METRICS_MODULES:
                    prefix = env_prefix(SETTINGS[module])
                    assert env[f"{prefix}METRICS_HOST"] == ALL_INTERFACES, where
                    get = probe["httpGet"]
                    workers = module in ("services.ingest.main", "services.rules.main")
                    assert get["path"] in (WORKER_ROUTES if workers else METRICS_ONLY_ROUTES), where
                    if workers:
                        # Ready only while subscribed; alive while the endpoint answers.
                        wanted = READY_PATH if kind == "readinessProbe" else "/metrics"
                        assert get["path"] == wanted, where
                    port = container_port(container, get["port"])
                    assert port == int(env[f"{prefix}METRICS_PORT"]), where
                elif container["image"].startswith("nats:"):
                    get = probe["httpGet"]
                    assert get["path"] in NATS_HEALTH_ROUTES, where
                    assert container_port(container, get["port"]) == nats_monitor_port, where
                else:
                    raise AssertionError(f"{where}: no known health route for this container")
                probed.add(workload["metadata"]["name"])
    assert {"galvani-api", "galvani-ingest", "galvani-rules", "galvani-nats"} <= probed
    assert {"galvani-notify", "galvani-maintenance", "galvani-broker-access"} <= probed


def test_every_probe_is_an_http_get_on_a_named_port() -> None:
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                where = f"{workload['metadata']['name']}/{container['name']} {kind}"
                assert set(probe) & {"exec", "tcpSocket", "grpc"} == set(), where
                port = probe["httpGet"]["port"]
                assert isinstance(port, str), where
                container_port(container, port)


def test_every_service_with_a_metrics_port_is_scraped_on_it() -> None:
    scraped = set()
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            if module_of(container) not in METRICS_MODULES:
                continue
            name = workload["metadata"]["name"]
            annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
            assert annotations.get("prometheus.io/scrape") == "true", name
            assert int(annotations["prometheus.io/port"]) == container_port(container, "metrics")
            scraped.add(name)
    assert {
        "galvani-ingest",
        "galvani-rules",
        "galvani-notify",
        "galvani-maintenance",
        "galvani-broker-access",
    } <= scraped


def test_every_container_requests_resources_and_limits_its_memory() -> None:
    for workload in [*workloads(), *[o for o in load_all() if o["kind"] == "Job"]]:
        spec = pod_spec(workload)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            resources = container.get("resources", {})
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


def test_every_pod_runs_as_non_root_on_a_read_only_root_filesystem() -> None:
    for workload in [*workloads(), *[o for o in load_all() if o["kind"] == "Job"]]:
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            security = container["securityContext"]
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where


def test_every_workload_of_several_replicas_has_a_disruption_budget_for_its_pods() -> None:
    budgets = [obj for obj in load_all() if obj["kind"] == "PodDisruptionBudget"]
    several = [w for w in workloads() if w["spec"].get("replicas", 1) > 1]
    assert {w["metadata"]["name"] for w in several} >= {"galvani-api", "galvani-nats"}
    for workload in several:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [
            budget
            for budget in budgets
            if budget["metadata"]["namespace"] == workload["metadata"]["namespace"]
            and budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(covering) == 1, workload["metadata"]["name"]
        (budget,) = covering
        assert budget["spec"].get("maxUnavailable", 0) == 1 or (
            0 < budget["spec"].get("minAvailable", 0) < workload["spec"]["replicas"]
        ), budget["metadata"]["name"]
    assert nats_budget_max_unavailable(budgets) == 1


def nats_budget_max_unavailable(budgets: list[Manifest]) -> int:
    """The broker's budget's maxUnavailable."""
    (budget,) = [b for b in budgets if b["metadata"]["name"] == "galvani-nats"]
    return int(budget["spec"]["maxUnavailable"])


def test_workload_selectors_match_their_pod_labels() -> None:
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]


def test_every_galvani_variable_is_a_setting_of_the_service_it_is_given_to() -> None:
    # pydantic-settings ignores a variable it does not know: a misspelled one would silently
    # leave the setting at its default.
    config_maps = {
        obj["metadata"]["name"]: obj["data"] for obj in load_all() if obj["kind"] == "ConfigMap"
    }
    checked = 0
    for workload in workloads():
        for container in pod_spec(workload)["containers"]:
            module = module_of(container)
            if module is None:
                continue
            own = {e["name"] for e in container.get("env", []) if e["name"].startswith("GALVANI_")}
            unknown = own - settings_variables(SETTINGS[module])
            assert not unknown, f"{workload['metadata']['name']}: {sorted(unknown)}"
            # A shared ConfigMap may hold what only some of its readers use, but each key
            # must be read by one of them.
            for source in container.get("envFrom", []):
                keys = set(config_maps[source["configMapRef"]["name"]])
                assert keys <= all_settings_variables(), sorted(keys - all_settings_variables())
            checked += len(own)
    assert checked > 30


def settings_variables(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads: prefix + field, and its aliases."""
    prefix = env_prefix(settings)
    names = set()
    for field_name, field in settings.model_fields.items():
        names.add(f"{prefix}{field_name}".upper())
        alias = field.validation_alias
        for choice in getattr(alias, "choices", [alias] if isinstance(alias, str) else []):
            if isinstance(choice, str):
                names.add(choice.upper())
    return names


def all_settings_variables() -> set[str]:
    """What any of the services reads."""
    return set().union(*(settings_variables(s) for s in SETTINGS.values()))


def test_no_secret_is_committed_and_the_readme_says_how_to_make_each_one() -> None:
    assert [obj["metadata"]["name"] for obj in load_all() if obj["kind"] == "Secret"] == []
    readme = (K8S_DIR / "README.md").read_text()
    for name, key in referenced_secret_keys():
        assert f"`{name}`" in readme, f"README.md does not say how to create {name}"
        assert key in readme, f"README.md does not name {name}'s key {key}"


def referenced_secret_keys() -> Iterator[tuple[str, str]]:
    """Every (Secret, key) the workloads read."""
    for obj in [*workloads(), *[o for o in load_all() if o["kind"] == "Job"]]:
        spec = pod_spec(obj)
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    yield ref["name"], ref["key"]
        for volume in spec.get("volumes", []):
            secret = volume.get("secret")
            if secret:
                for item in secret.get("items", [{"key": ""}]):
                    yield secret["secretName"], item["key"]


def test_the_cluster_routes_and_client_lists_name_every_broker_pod() -> None:
    statefulset = nats_statefulset()
    config = nats_config()
    name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    pods = [f"{name}-{i}.{service}" for i in range(statefulset["spec"]["replicas"])]
    cluster_port = block_listen_port(config, "cluster")
    routes = re.findall(r'"nats-route://([^"]+)"', config)
    assert routes == [f"{pod}:{cluster_port}" for pod in pods]
    (common,) = [
        obj["data"]
        for obj in load_all()
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "galvani-common"
    ]
    client_port = listen_port(config, "listen")
    assert common["GALVANI_NATS_URLS"].split(",") == [f"tls://{p}:{client_port}" for p in pods]
    mqtt_port = block_listen_port(config, "mqtt")
    assert common["GALVANI_MQTT_NODES"].split(",") == [f"{p}:{mqtt_port}" for p in pods]


def test_the_broker_configuration_passes_nats_server_check(tmp_path: Path) -> None:
    config = nats_config()
    container = pod_spec(nats_statefulset())["containers"][0]
    provided = {e["name"] for e in container["env"]}
    referenced = set(re.findall(r"\$([A-Z_]+)", config))
    assert referenced <= provided, f"nats.conf uses {sorted(referenced - provided)}, not set"
    pki = DevelopmentPKI.ensure(tmp_path / "pki")
    tls = tmp_path / "tls"
    tls.mkdir()
    shutil.copy(pki.server_cert, tls / "tls.crt")
    shutil.copy(pki.server_key, tls / "tls.key")
    shutil.copy(pki.ca_file, tls / "ca.crt")
    local = config.replace("/etc/nats-tls/", f"{tls}/").replace("/data/", f"{tmp_path}/data/")
    local = local.replace("/var/run/nats/", f"{tmp_path}/")
    (tmp_path / "nats.conf").write_text(local)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "SERVER_NAME": "galvani-nats-0",
        "AUTH_PASSWORD": "auth-password-for-the-check",
        "SYS_PASSWORD": "sys-password-for-the-check",
        "CALLOUT_ISSUER": account_nkey(),
    }
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout + result.stderr


def test_nats_server_check_refuses_a_misspelled_key(tmp_path: Path) -> None:
    # The check above passes only because the configuration is right: nats-server -t refuses
    # an unknown key (here the gateway's replica count, misspelled).
    config = nats_config().replace("stream_replicas", "stream_replica")
    pki = DevelopmentPKI.ensure(tmp_path / "pki")
    config = (
        config.replace("/etc/nats-tls/tls.crt", str(pki.server_cert))
        .replace("/etc/nats-tls/tls.key", str(pki.server_key))
        .replace("/etc/nats-tls/ca.crt", str(pki.ca_file))
    )
    (tmp_path / "nats.conf").write_text(config)
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")],
        capture_output=True,
        text=True,
        env={
            "SERVER_NAME": "n",
            "AUTH_PASSWORD": "a",
            "SYS_PASSWORD": "b",
            "CALLOUT_ISSUER": account_nkey(),
        },
        timeout=60,
    )
    assert result.returncode != 0
    assert "stream_replica" in result.stdout + result.stderr


def test_the_api_and_the_responders_run_two_replicas_and_the_broker_three_nodes() -> None:
    replicas = {w["metadata"]["name"]: w["spec"]["replicas"] for w in workloads()}
    assert replicas["galvani-api"] == 2
    assert replicas["galvani-broker-access"] == 2
    assert replicas["galvani-nats"] == 3


def test_a_broker_pod_is_given_time_to_finish_its_lame_duck_mode() -> None:
    config = nats_config()

    def seconds(key: str) -> int:
        match = re.search(rf'^\s*{key}:\s*"(\d+)s"', config, re.MULTILINE)
        assert match, f"no {key} in nats.conf"
        return int(match.group(1))

    spec = pod_spec(nats_statefulset())
    lame_duck_s = seconds("lame_duck_duration") + seconds("lame_duck_grace_period")
    assert spec["terminationGracePeriodSeconds"] > lame_duck_s
    (container,) = spec["containers"]
    assert "ldm=" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])


# What the cluster's nodes have beyond what deploy/stack/nats_cluster.py renders for one
# machine: lame duck mode on stop, and TLS on the routes, which there stay on loopback.
PRODUCTION_ONLY_KEYS = frozenset(
    {
        "lame_duck_duration",
        "lame_duck_grace_period",
        "cluster.tls",
        "cluster.tls.cert_file",
        "cluster.tls.key_file",
        "cluster.tls.ca_file",
        "cluster.tls.verify",
        "cluster.tls.timeout",
    }
)


def test_the_broker_configuration_has_the_shape_make_run_cluster_renders() -> None:
    nodes = [NatsNode(f"n{i}", 4222, 1883, 6222, 8222, Path(f"/data/n{i}")) for i in range(3)]
    rendered = render_config(
        nodes[0],
        nodes[1:],
        tls=(Path("server.pem"), Path("server.key"), Path("ca.pem")),
        callout=CalloutConfig(issuer=account_nkey(), auth_password="x"),
        static_users=None,
        system_password="y",
    )
    development, cluster = config_shape(rendered), config_shape(nats_config())
    assert "mqtt.stream_replicas" in development
    assert development - cluster == set(), "keys make run-cluster has and the manifests lack"
    assert cluster - development <= PRODUCTION_ONLY_KEYS, sorted(cluster - development)
