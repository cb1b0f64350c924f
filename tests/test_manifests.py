"""The deployment files under infra/, checked without Docker or Kubernetes (the team has neither).

What is checked, and how:
- every YAML and JSON file under infra/ parses;
- built-in Kubernetes kinds (Namespace, ConfigMap, Secret, Deployment, Service, Job) validate
  strictly (unknown fields fail) against the Kubernetes schemas bundled with kubernetes-validate;
- KEDA's ScaledObject and TriggerAuthentication and the Prometheus operator's PodMonitor are custom
  resources that kubernetes-validate has no schemas for: their key fields are checked by hand here,
  against the code (topics, consumer groups, partitions, Secret keys, KEDA's parameter names);
- names agree with the code: env vars are Settings fields, topics are real topics, consumer groups
  are CONSUMER_GROUPS, commands name real functions, `python -m` modules exist, dashboard and alert
  metrics are in the Prometheus registry;
- the entry script and the Docker health check script are run (with a stand-in `python` and with
  HTTP servers on 127.0.0.1);
- `lookalike topics create`, the command of the compose one-shot service and of the Kubernetes
  Job, runs against a local Tansu broker.
Not checked: that the images build, that Kafka/Qdrant/KEDA accept these files at runtime.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices

from lookalike.functions.wiring import FUNCTIONS
from lookalike.shared.config import Settings
from lookalike.shared.limits import MAX_MESSAGE_BYTES
from lookalike.shared.messages import ALL_TOPICS, dlq_topic
from lookalike.shared.runtime import CONSUMER_GROUPS, lag_per_function
from tests.conftest import REPO_ROOT

INFRA = REPO_ROOT / "infra"
K8S = INFRA / "k8s"
MONITORING = INFRA / "monitoring"
DOCKERFILES = (INFRA / "Dockerfile", INFRA / "Dockerfile.cuda")
PROCESSES = set(FUNCTIONS) | {"gateway"}  # what the entry script runs
KUBERNETES_VERSION = "1.34.0"

# Env vars set in the deployment files that are not Settings fields. Keep this tiny: every other
# name must be a field of shared/config.py, or the processes would silently ignore it.
NOT_SETTINGS_ENV = {
    "PYTHONUNBUFFERED",  # Python itself: print() reaches `docker logs` at once
    "PATH",  # Dockerfile.cuda: the project's venv first
}
# Kubernetes files that kustomization.yaml leaves out on purpose (each says why at its top).
NOT_IN_KUSTOMIZATION = {"secret.template.yaml", "podmonitor.yaml", "qdrant-values.yaml", "kustomization.yaml"}
# The outcomes of lookalike_records_total (shared/metrics.py).
RECORD_OUTCOMES = {"handled", "dead_lettered", "retried"}


# --------------------------------------------------------------------------- loading


def yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_resources() -> list[tuple[str, dict]]:
    """(file name, resource) for every manifest under infra/k8s (not kustomization or Helm values)."""
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            if path.name not in ("kustomization.yaml", "qdrant-values.yaml") for doc in yaml_docs(path)]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_resources() if doc["kind"] == kind]


def named(kind: str, name: str) -> dict:
    (found,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return found


def config() -> dict[str, str]:
    return named("ConfigMap", "lookalike-config")["data"]


def pod_specs() -> list[tuple[str, dict]]:
    """(workload name, pod spec) of every Deployment and Job."""
    return [(doc["metadata"]["name"], doc["spec"]["template"]["spec"])
            for doc in of_kind("Deployment") + of_kind("Job")]


def deployment_process(deployment: dict) -> str:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"][0]


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def compose_lookalike_services() -> dict[str, dict]:
    """The compose services that run our image (the others are Kafka, Qdrant, Prometheus, Grafana)."""
    return {name: svc for name, svc in compose()["services"].items() if "build" in svc}


def resolve_compose_vars(value: str) -> str:
    """``${NAME:-default}`` as compose would resolve it with NAME unset."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


def settings_env_names() -> set[str]:
    """Every env var name Settings reads: field names upper-cased, or their aliases."""
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(name.upper())
    return names


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: comments dropped, continuations joined, heredocs skipped."""
    instructions, lines = [], iter(path.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        keyword, _, args = line.strip().partition(" ")
        heredoc = re.search(r'<<"?(\w+)"?', args)
        if heredoc:
            for body in lines:
                if body == heredoc.group(1):
                    break
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def instruction(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in dockerfile_instructions(path) if kw == keyword]


def healthcheck_script(path: Path) -> str:
    match = re.search(r'^COPY <<"EOF" /usr/local/lib/lookalike-healthcheck\.py\n(.*?)^EOF$', path.read_text(),
                      re.MULTILINE | re.DOTALL)
    assert match, f"{path.name} writes no /usr/local/lib/lookalike-healthcheck.py"
    return match.group(1)


# --------------------------------------------------------------------------- every file


def test_every_yaml_and_json_file_under_infra_parses():
    yaml_files = [p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml")]
    json_files = list(INFRA.rglob("*.json"))
    assert len(yaml_files) >= 10 and json_files
    for path in yaml_files:
        assert yaml_docs(path), f"{path} holds no document"
    for path in json_files:
        json.loads(path.read_text())


def test_built_in_kubernetes_resources_validate_and_the_others_are_known_custom_resources():
    custom = []
    for name, doc in k8s_resources():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom.append((name, doc["kind"]))
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    # Custom resources have no schema here: only the kinds whose fields the tests below check.
    assert {kind for _, kind in custom} == {"ScaledObject", "TriggerAuthentication", "PodMonitor"}
    assert {doc["kind"] for _, doc in k8s_resources()} >= {"Namespace", "ConfigMap", "Secret", "Deployment",
                                                            "Service", "Job"}


def test_every_resource_is_in_the_lookalike_namespace_and_the_kustomization_lists_the_manifests():
    for name, doc in k8s_resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "lookalike", f"{name}: {doc['metadata']['name']}"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "lookalike"
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")}
    assert listed <= present, f"listed but missing: {listed - present}"
    assert listed == present - NOT_IN_KUSTOMIZATION
    # Every image a workload names is one the kustomization points at a registry.
    images = {image["name"] for image in kustomization["images"]}
    for name, spec in pod_specs():
        for container in spec["containers"]:
            assert container["image"] in images, f"{name}: {container['image']}"


# --------------------------------------------------------------------------- env vars and settings


def test_env_vars_set_anywhere_are_settings_fields():
    known = settings_env_names() | NOT_SETTINGS_ENV
    where: dict[str, set[str]] = {}
    for service, svc in compose_lookalike_services().items():
        where[f"compose.yaml {service}"] = set(svc.get("environment", {}))
    where["configmap.yaml"] = set(config())
    for secret in of_kind("Secret"):
        if secret["metadata"]["name"] != "lookalike-kafka-ca":  # a mounted file, not env vars
            where[f"Secret {secret['metadata']['name']}"] = set(secret["stringData"])
    for name, spec in pod_specs():
        for container in spec["containers"]:
            where[f"{name} env"] = {e["name"] for e in container.get("env", [])}
    for dockerfile in DOCKERFILES:
        where[dockerfile.name] = {m for args in instruction(dockerfile, "ENV")
                                  for m in re.findall(r"(\w+)=", args)}
    unknown = {place: names - known for place, names in where.items() if names - known}
    assert not unknown, f"env vars no Settings field reads: {unknown}"
    assert sum(len(names) for names in where.values()) > 30  # the collection above found the files


def test_the_configmap_and_secrets_make_valid_settings(monkeypatch):
    from lookalike.shared.bus import kafka_options
    from lookalike.shared.embedders import REGISTRY

    # GIVEN a pod's environment: the ConfigMap and the template Secrets that every pod loads
    for key in list(os.environ):
        if key.upper() in settings_env_names():
            monkeypatch.delenv(key)
    values = dict(config())
    values.update(named("Secret", "lookalike-secrets")["stringData"])
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    # WHEN the processes read their settings
    settings = Settings()
    # THEN the values parse, and the Kafka security settings are complete
    assert settings.topic_replication_factor == 3 and settings.allow_download is False
    assert settings.embed_model in REGISTRY and settings.log_format == "json"
    options = kafka_options(settings)
    assert options["security_protocol"] == "SASL_SSL" and options["ssl_cafile"] == config()["KAFKA_SSL_CAFILE"]
    assert options["sasl_plain_username"] and options["sasl_plain_password"]


def test_the_compose_environment_makes_valid_settings(monkeypatch):
    from lookalike.shared.embedders import REGISTRY

    for service, svc in compose_lookalike_services().items():
        for key in list(os.environ):
            if key.upper() in settings_env_names():
                monkeypatch.delenv(key)
        for key, value in svc["environment"].items():
            monkeypatch.setenv(key, resolve_compose_vars(value))
        settings = Settings()
        assert settings.embed_model in REGISTRY, service
        assert settings.kafka_bootstrap_servers == "kafka:9092" and settings.qdrant_url == "http://qdrant:6333"


def test_the_kafka_ca_file_is_mounted_wherever_the_configmap_is_loaded():
    ca_file = Path(config()["KAFKA_SSL_CAFILE"])
    ca_secret = named("Secret", "lookalike-kafka-ca")
    assert ca_file.name in ca_secret["stringData"]
    for name, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (container,) = spec["containers"]
        assert {"configMapRef": {"name": "lookalike-config"}} in container["envFrom"], name
        mounts = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == ca_file.parent]
        assert mounts, f"{name} does not mount {ca_file.parent}"
        assert volumes[mounts[0]["name"]]["secret"]["secretName"] == "lookalike-kafka-ca", name


def test_secrets_come_from_secrets_never_from_inline_values():
    secret_names = {"KAFKA_SASL_PASSWORD", "KAFKA_SASL_OAUTH_CLIENT_SECRET", "KAFKA_SSL_PASSWORD", "QDRANT_API_KEY",
                    "GATEWAY_API_KEYS"}
    assert not secret_names & set(config())
    for name, spec in pod_specs():
        for container in spec["containers"]:
            assert not secret_names & {e["name"] for e in container.get("env", [])}, name
    for service, svc in compose_lookalike_services().items():
        assert not secret_names & set(svc.get("environment", {})), service
    # Every value in the template is a placeholder to replace.
    for secret in of_kind("Secret"):
        for key, value in secret["stringData"].items():
            assert "REPLACE-ME" in value, f"{secret['metadata']['name']}.{key}"
    # The gateway's API keys reach the gateway only.
    for deployment in of_kind("Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        loads_gateway_keys = {"secretRef": {"name": "lookalike-gateway"}} in container["envFrom"]
        assert loads_gateway_keys == (deployment_process(deployment) == "gateway")


# --------------------------------------------------------------------------- workloads


def test_one_deployment_per_function_and_the_gateway_each_running_its_process():
    deployments = of_kind("Deployment")
    assert {deployment_process(d) for d in deployments} == PROCESSES
    assert len(deployments) == len(PROCESSES)
    for deployment in deployments:
        process = deployment_process(deployment)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == [process] and "command" not in container  # the image's entry script runs it
        assert container["name"] == process and deployment["metadata"]["name"] == f"lookalike-{process}"
        assert container["image"] == ("lookalike-cuda" if process == "embed" else "lookalike")


def test_probes_and_prometheus_annotations_use_the_port_the_process_serves():
    for deployment in of_kind("Deployment"):
        process = deployment_process(deployment)
        template = deployment["spec"]["template"]
        (container,) = template["spec"]["containers"]
        port_setting = "GATEWAY_PORT" if process == "gateway" else "METRICS_PORT"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        (port_name,) = ports
        assert ports[port_name] == int(config()[port_setting]), process
        for probe in ("startupProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": port_name}, f"{process} {probe}"
        liveness = container["livenessProbe"]
        assert liveness.get("httpGet", {}).get("path") == "/healthz" or "tcpSocket" in liveness, process
        assert (liveness.get("httpGet") or liveness["tcpSocket"])["port"] == port_name, process
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(ports[port_name])
        assert annotations["prometheus.io/path"] == "/metrics"


def test_pods_run_as_the_images_non_root_user_with_resources():
    (user,) = instruction(INFRA / "Dockerfile", "USER")
    for name, spec in pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == int(user), name
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"], name


def test_embed_runs_on_a_gpu_node_with_the_cuda_image():
    embed = named("Deployment", "lookalike-embed")["spec"]["template"]["spec"]
    (container,) = embed["containers"]
    assert container["image"] == "lookalike-cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "EMBED_DEVICE", "value": "cuda"} in container["env"]
    assert embed["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in embed["tolerations"])
    for deployment in of_kind("Deployment"):
        if deployment_process(deployment) != "embed":
            (other,) = deployment["spec"]["template"]["spec"]["containers"]
            assert "nvidia.com/gpu" not in other["resources"].get("limits", {})


def test_the_gateway_service_targets_the_gateway_pods():
    service = named("Service", "lookalike-gateway")
    gateway = named("Deployment", "lookalike-gateway")
    assert service["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}


def test_the_topics_job_creates_the_topics_with_three_replicas():
    job = named("Job", "lookalike-topics")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["lookalike"]
    args = container["args"]
    assert args[:2] == ["topics", "create"]
    assert args[args.index("--replication-factor") + 1] == config()["TOPIC_REPLICATION_FACTOR"] == "3"


# --------------------------------------------------------------------------- KEDA


KEDA_KAFKA_METADATA = {  # the trigger metadata KEDA's Kafka scaler reads (pkg/scalers/kafka_scaler.go)
    "bootstrapServers", "bootstrapServersFromEnv", "consumerGroup", "consumerGroupFromEnv", "topic", "topicFromEnv",
    "partitionLimitation", "lagThreshold", "activationLagThreshold", "offsetResetPolicy", "allowIdleConsumers",
    "excludePersistentLag", "scaleToZeroOnInvalidOffset", "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions", "version", "tls", "unsafeSsl", "sasl", "saslTokenProvider", "awsRegion",
}
KEDA_KAFKA_AUTH_PARAMETERS = {"sasl", "tls", "username", "password", "ca", "cert", "key", "keyPassword", "scopes",
                              "oauthTokenEndpointUri", "oauthExtensions", "saslTokenProvider"}
KEDA_SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                           "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512",
             "OAUTHBEARER": "oauthbearer"}


def function_of_group(group: str) -> str:
    (function,) = lag_per_function({group: 0})  # the code's own mapping of a group to its function
    return function


def test_each_function_scales_on_the_lag_of_exactly_its_consumer_groups_and_topics():
    scaled = {}
    for so in of_kind("ScaledObject"):
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert set(so["spec"]) <= KEDA_SCALED_OBJECT_SPEC, so["metadata"]["name"]
        target = named("Deployment", so["spec"]["scaleTargetRef"]["name"])
        assert "replicas" not in target["spec"]  # KEDA owns the count; an apply must not reset it
        pairs = set()
        for trigger in so["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "kafka" and set(meta) <= KEDA_KAFKA_METADATA, meta
            group, topic = meta["consumerGroup"], meta["topic"]
            assert topic in ALL_TOPICS, f"{topic} is no pipeline topic"
            assert group in CONSUMER_GROUPS, f"{group} is no consumer group"
            assert topic in CONSUMER_GROUPS[group], f"{group} does not read {topic}"
            assert int(meta["lagThreshold"]) > 0
            pairs.add((group, topic))
        scaled[deployment_process(target)] = pairs
    # THEN every function has one ScaledObject covering every (group, topic) it consumes
    wanted: dict[str, set] = {}
    for group, topics in CONSUMER_GROUPS.items():
        wanted.setdefault(function_of_group(group), set()).update((group, t) for t in topics)
    assert scaled == wanted


def test_replicas_stay_within_the_partition_count():
    partitions = int(config()["TOPIC_PARTITIONS"])
    for so in of_kind("ScaledObject"):
        spec = so["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions, so["metadata"]["name"]


def test_keda_reaches_kafka_the_way_the_pods_do():
    protocol, mechanism = config()["KAFKA_SECURITY_PROTOCOL"], config()["KAFKA_SASL_MECHANISM"]
    secret_keys = {s["metadata"]["name"]: set(s["stringData"]) for s in of_kind("Secret")}
    for so in of_kind("ScaledObject"):
        target = named("Deployment", so["spec"]["scaleTargetRef"]["name"])
        (container,) = target["spec"]["template"]["spec"]["containers"]
        for trigger in so["spec"]["triggers"]:
            meta = trigger["metadata"]
            # The bootstrap servers: the ConfigMap's, read from the target container's env.
            assert meta["bootstrapServersFromEnv"] in config()
            assert {"configMapRef": {"name": "lookalike-config"}} in container["envFrom"]
            # Same security as the pods.
            assert meta["tls"] == ("enable" if protocol in ("SSL", "SASL_SSL") else "disable")
            assert meta["sasl"] == (KEDA_SASL[mechanism] if protocol.startswith("SASL_") else "none")
            # Our consumers start from the earliest offset (shared/bus.make_consumer).
            assert meta["offsetResetPolicy"] == "earliest"
            auth = named("TriggerAuthentication", trigger["authenticationRef"]["name"])
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["parameter"] in KEDA_KAFKA_AUTH_PARAMETERS, ref
                assert ref["key"] in secret_keys[ref["name"]], ref
            assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} >= {"username", "password"}


def test_the_pod_monitor_scrapes_the_ports_the_pods_name():
    (monitor,) = of_kind("PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    port_names = set()
    for deployment in of_kind("Deployment"):
        template = deployment["spec"]["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        port_names |= {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert {e["port"] for e in endpoints} == port_names and {e["path"] for e in endpoints} == {"/metrics"}


def test_qdrant_values_take_the_api_key_from_the_secret_and_the_collection_layout_fits_the_cluster():
    from lookalike.shared.stores.client import QUANTIZATIONS

    values = yaml.safe_load((K8S / "qdrant-values.yaml").read_text())
    assert values["replicaCount"] == 3 and values["persistence"]["size"]
    ref = values["apiKey"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in named("Secret", ref["name"])["stringData"]
    # The collection lookalike creates: every node holds shards, no shard has more copies than nodes.
    settings = Settings(**{k.lower(): v for k, v in config().items() if k.startswith("QDRANT_")})
    assert settings.qdrant_shards >= values["replicaCount"]
    assert 2 <= settings.qdrant_replication_factor <= values["replicaCount"]
    assert settings.qdrant_quantization in QUANTIZATIONS


# --------------------------------------------------------------------------- compose


def test_compose_runs_one_service_per_function_and_the_gateway():
    services = compose_lookalike_services()
    processes = {name: svc["command"] for name, svc in services.items() if "entrypoint" not in svc}
    assert set(processes) == PROCESSES
    for name, command in processes.items():
        assert command == [name], name  # the image's entry script runs it
    # The one other service of our image: the topics, created once before the functions start.
    (one_shot,) = set(services) - PROCESSES
    topics = services[one_shot]
    assert topics["entrypoint"] == ["lookalike"] and topics["command"] == ["topics", "create"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in PROCESSES:
        depends = services[name]["depends_on"]
        assert depends[one_shot]["condition"] == "service_completed_successfully", name
        assert depends["qdrant"]["condition"] == "service_healthy", name
    assert services["gateway"]["ports"] == ["8080:8080"]


def test_compose_services_reach_kafka_and_qdrant_where_they_listen():
    doc = compose()
    kafka, qdrant = doc["services"]["kafka"], doc["services"]["qdrant"]
    assert kafka["image"].startswith("apache/kafka:") and kafka["healthcheck"]["test"]
    assert qdrant["image"].startswith("qdrant/qdrant:") and qdrant["healthcheck"]["test"]
    advertised = kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
    for name, svc in compose_lookalike_services().items():
        assert f"PLAINTEXT://{svc['environment']['KAFKA_BOOTSTRAP_SERVERS']}" in advertised, name
    # The host reaches Kafka through the EXTERNAL listener (`lookalike index` from the host).
    assert "EXTERNAL://localhost:9094" in advertised and "9094:9094" in kafka["ports"]
    assert int(kafka["environment"]["KAFKA_MESSAGE_MAX_BYTES"]) >= MAX_MESSAGE_BYTES


def test_compose_monitoring_profile_mounts_files_that_exist():
    doc = compose()
    for name in ("prometheus", "grafana"):
        svc = doc["services"][name]
        assert svc["profiles"] == ["monitoring"]
        for volume in svc["volumes"]:
            source = volume.split(":")[0]
            assert (INFRA / source).exists(), f"{name} mounts missing {source}"
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    mounted = {v.split(":")[1] for v in doc["services"]["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in prometheus["scrape_configs"]}
    assert set(jobs["lookalike-functions"]["names"]) == set(FUNCTIONS)
    assert jobs["lookalike-functions"]["port"] == Settings.model_fields["metrics_port"].default
    assert jobs["lookalike-gateway"]["names"] == ["gateway"]
    assert jobs["lookalike-gateway"]["port"] == Settings.model_fields["gateway_port"].default
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/lookalike.yaml").read_text())
    (dashboards_path,) = {p["options"]["path"] for p in provider["providers"]}
    assert any(v.endswith(f":{dashboards_path}:ro") for v in doc["services"]["grafana"]["volumes"])


# --------------------------------------------------------------------------- images


def test_dockerfiles_run_as_a_non_root_user_with_a_health_check_and_the_entry_script():
    for dockerfile in DOCKERFILES:
        users = instruction(dockerfile, "USER")
        assert users and users[-1].isdigit() and int(users[-1]) != 0, f"{dockerfile.name}: USER {users}"
        (healthcheck,) = instruction(dockerfile, "HEALTHCHECK")
        assert 'CMD ["python", "/usr/local/lib/lookalike-healthcheck.py"]' in healthcheck
        (entrypoint,) = instruction(dockerfile, "ENTRYPOINT")
        assert json.loads(entrypoint) == ["/usr/local/bin/entrypoint.sh"]
        assert any(args.endswith("infra/entrypoint.sh /usr/local/bin/entrypoint.sh")
                   for args in instruction(dockerfile, "COPY"))
        (cmd,) = instruction(dockerfile, "CMD")
        assert json.loads(cmd)[0] in PROCESSES
    assert instruction(INFRA / "Dockerfile", "FROM") == ["python:3.11-slim"]
    assert instruction(INFRA / "Dockerfile.cuda", "FROM")[0].startswith("nvidia/cuda:")
    assert json.loads(instruction(INFRA / "Dockerfile.cuda", "CMD")[0]) == ["embed"]
    assert healthcheck_script(DOCKERFILES[0]) == healthcheck_script(DOCKERFILES[1])


def test_dockerfiles_copy_the_whole_package_and_nothing_the_dockerignore_hides():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"]["readme"], "infra/entrypoint.sh",
              *project["tool"]["setuptools"]["package-dir"].values()}
    ignored = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]

    def hidden(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
                   for pattern in ignored for prefix in prefixes)

    for dockerfile in DOCKERFILES:
        copied = set()
        for args in instruction(dockerfile, "COPY"):
            sources = [a for a in args.split()[:-1] if not a.startswith(("--", "<<"))]
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
                assert not hidden(source), f".dockerignore hides {source}, which {dockerfile.name} copies"
                copied.add(source)
        assert needed <= copied, f"{dockerfile.name} misses {needed - copied}"
    assert hidden(".venv") and hidden("tests") and hidden("infra/lookalike.env")


def test_the_cpu_image_pins_the_torch_versions_of_pyproject():
    pins = dict(re.findall(r'"(torch|torchvision)==([\w.]+)"', (REPO_ROOT / "pyproject.toml").read_text()))
    (install,) = [args for args in instruction(INFRA / "Dockerfile", "RUN") if "download.pytorch.org/whl/cpu" in args]
    assert dict(re.findall(r"\b(torch|torchvision)==([\w.]+)", install)) == pins


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def _serve(status: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Health", (_Health,), {"status": status}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_docker_health_check_asks_the_process_that_listens(tmp_path):
    script = tmp_path / "healthcheck.py"
    script.write_text(healthcheck_script(INFRA / "Dockerfile"))
    healthy, unhealthy = _serve(200), _serve(503)
    closed = _serve(200)
    closed.shutdown()
    closed.server_close()
    port = {"ok": healthy.server_address[1], "503": unhealthy.server_address[1], "closed": closed.server_address[1]}

    def check(metrics: str, gateway: str) -> int:
        env = {**os.environ, "METRICS_PORT": str(port[metrics]), "GATEWAY_PORT": str(port[gateway])}
        return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=60).returncode

    try:
        assert check(metrics="ok", gateway="closed") == 0  # a function
        assert check(metrics="closed", gateway="ok") == 0  # the gateway
        assert check(metrics="503", gateway="ok") != 0  # a function whose runner is stuck
        assert check(metrics="closed", gateway="503") != 0
        assert check(metrics="closed", gateway="closed") != 0  # nothing serves
    finally:
        healthy.shutdown()
        unhealthy.shutdown()


def test_the_entry_script_dispatches_exactly_the_functions_and_the_gateway(tmp_path):
    script = INFRA / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    # The names in its case patterns: every process, nothing else.
    patterns = re.findall(r"^\s*([a-z|]+)\)\s*$", script.read_text(), re.MULTILINE)
    assert {name for pattern in patterns for name in pattern.split("|")} == PROCESSES
    # A stand-in python that prints what it was asked to run.
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", str(script), *args], env=env, capture_output=True, text=True, timeout=30)

    for process in PROCESSES:
        ran = run(process)
        assert ran.returncode == 0, ran.stderr
        expected = "-m lookalike.gateway" if process == "gateway" else f"-m lookalike.functions {process}"
        assert ran.stdout.strip() == expected
        assert importlib.util.find_spec(expected.split()[1]) is not None
    for wrong in (["train"], [], ["embed", "query"]):
        ran = run(*wrong)
        assert ran.returncode == 2 and "usage" in ran.stderr, wrong


def test_python_module_paths_named_anywhere_in_infra_exist():
    pattern = re.compile(r"""python3?["']?\s*,?\s*["']?-m["']?\s*,?\s*["']?([A-Za-z_][\w.]*)""")
    found = set()
    for path in [*INFRA.rglob("*"), REPO_ROOT / ".dockerignore"]:
        if path.is_file():
            found |= set(pattern.findall(path.read_text()))
    assert {"lookalike.functions", "lookalike.gateway"} <= found
    missing = {module for module in found if importlib.util.find_spec(module) is None}
    assert not missing, f"python -m of modules that do not exist: {missing}"


# --------------------------------------------------------------------------- monitoring


def registry_metric_names() -> set[str]:
    """Every sample name the function processes and the gateway can expose."""
    import prometheus_client

    import lookalike.gateway.app  # noqa: F401  (its request metrics)
    import lookalike.shared.metrics  # noqa: F401

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
                "gauge": ("",), "summary": ("", "_sum", "_count")}
    return {family.name + suffix for family in prometheus_client.REGISTRY.collect()
            for suffix in suffixes.get(family.type, ("",))}


def dashboard_expressions() -> list[str]:
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                found.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in MONITORING.rglob("*.json"):
        walk(json.loads(path.read_text()))
    return found


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
            for rule in group["rules"]]


def test_dashboard_and_alerts_name_only_metrics_that_exist():
    known = registry_metric_names()
    expressions = dashboard_expressions() + [rule["expr"] for rule in alert_rules()]
    assert len(expressions) > 15
    used = set()
    for expr in expressions:
        names = set(re.findall(r"\blookalike_[a-z0-9_]+", expr))
        assert names, f"no lookalike metric in {expr!r}"
        assert names <= known, f"unknown metrics {names - known} in {expr!r}"
        used |= names
        for outcome in re.findall(r'outcome=~?"([^"]+)"', expr):
            assert set(outcome.split("|")) <= RECORD_OUTCOMES, expr
    # The dashboard shows the gateway and every function metric.
    assert {"lookalike_gateway_requests_total", "lookalike_gateway_request_seconds_bucket",
            "lookalike_gateway_rate_limited_total", "lookalike_consumer_lag", "lookalike_store_points",
            "lookalike_handler_seconds_bucket", "lookalike_end_to_end_seconds_bucket",
            "lookalike_batch_size_bucket"} <= used


def test_alert_rules_are_complete_and_cover_the_failures_we_page_for():
    rules = alert_rules()
    for rule in rules:
        assert rule["alert"].startswith("Lookalike") and rule["expr"].strip()
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
    names = {rule["alert"] for rule in rules}
    assert len(names) == len(rules)
    assert {"LookalikeConsumerLagGrowing", "LookalikeDeadLetters", "LookalikeNoProgress", "LookalikeFunctionDown",
            "LookalikeGateway5xx"} <= names
    # The absent() checks name every function.
    (missing,) = [rule for rule in rules if rule["alert"] == "LookalikeFunctionMissing"]
    assert set(re.findall(r'function="(\w+)"', missing["expr"])) == set(FUNCTIONS)


def test_dashboard_panels_use_its_datasource_variable():
    dashboard = json.loads((MONITORING / "grafana/dashboards/lookalike.json").read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"].strip("${}") in variables, panel["title"]
            assert panel["targets"], panel["title"]


# --------------------------------------------------------------------------- lookalike topics create


@pytest.fixture(scope="module")
def fresh_broker(tmp_path_factory):
    """A Tansu broker of our own, so the topics start absent (the session broker has them already)."""
    from lookalike.shared.bus import TansuBroker

    with TansuBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as broker:
        yield broker.bootstrap_servers


def run_lookalike(args: list[str], bootstrap: str | None, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k.upper() not in settings_env_names()}
    clean.update(LOOKALIKE_DATA_DIR=str(tmp_path), **env)
    if bootstrap:
        clean["KAFKA_BOOTSTRAP_SERVERS"] = bootstrap
    return subprocess.run([sys.executable, "-m", "lookalike.cli", *args], env=clean, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.e2e
def test_topics_create_as_the_job_and_compose_run_it(fresh_broker, tmp_path):
    from kafka import KafkaAdminClient

    from lookalike.shared.bus import pipeline_topics

    partitions = config()["TOPIC_PARTITIONS"]
    (job,) = of_kind("Job")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    # WHEN the Kubernetes Job's command runs (partitions from the ConfigMap, as in the pod)
    created = run_lookalike(container["args"], fresh_broker, tmp_path, TOPIC_PARTITIONS=partitions)
    # THEN every pipeline topic and DLQ exists with the partitions and replicas asked for
    assert created.returncode == 0, created.stderr
    admin = KafkaAdminClient(bootstrap_servers=fresh_broker)
    try:
        described = {t["name"]: t["partitions"] for t in admin.describe_topics(pipeline_topics())}
    finally:
        admin.close()
    for topic in ALL_TOPICS:
        assert len(described[topic]) == int(partitions) and len(described[dlq_topic(topic)]) == 1
        assert len(described[topic][0]["replica_nodes"]) == 3
        assert re.search(rf"^{re.escape(topic)} +partitions +{partitions} +replicas 3 +created$", created.stdout,
                         re.MULTILINE), created.stdout
    assert f"{len(pipeline_topics())} created" in created.stdout
    # WHEN compose's one-shot service runs afterwards (defaults from its environment)
    topics_service = compose()["services"]["topics"]
    again = run_lookalike(topics_service["command"], fresh_broker, tmp_path, TOPIC_PARTITIONS="2")
    # THEN nothing changes, and the listing says the topics existed
    assert again.returncode == 0, again.stderr
    assert f"0 created, {len(pipeline_topics())} existed" in again.stdout
    assert re.search(rf"^catalog\.events +partitions +{partitions} +replicas 3 +existed$", again.stdout, re.MULTILINE)


def test_topics_create_refuses_counts_below_one(tmp_path):
    refused = run_lookalike(["topics", "create", "--partitions", "0"], None, tmp_path)
    assert refused.returncode == 1 and "at least 1" in refused.stderr
