"""The manifests agree with the services and with each other: settings names, ports, probes, selectors,
network reachability, shutdown timing, secrets."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import yaml

from rdbroker_common.settings import split_host_port
from tests.unit.deploy import manifests as m

TARGETS = sorted(m.TARGETS)
# Listen settings per service: (variable, container port name the probes and Services use).
LISTEN = {
    "broker": [
        ("RDBROKER_GRPC_LISTEN", "grpc"),
        ("RDBROKER_HTTP_LISTEN", "http"),
        ("RDBROKER_METRICS_LISTEN", "metrics"),
    ],
    "proxy": [
        ("RDBROKER_LISTEN", "rdp"),
        ("RDBROKER_GRPC_LISTEN", "grpc-health"),
        ("RDBROKER_METRICS_LISTEN", "metrics"),
    ],
    "health": [
        ("RDBROKER_GRPC_LISTEN", "grpc"),
        ("RDBROKER_PROBE_LISTEN", "probe"),
        ("RDBROKER_METRICS_LISTEN", "metrics"),
    ],
}
# Listeners off by default (empty setting) that the deployment turns on, at these ports.
OPT_IN_PORTS = {"RDBROKER_METRICS_LISTEN": 9464, "RDBROKER_PROBE_LISTEN": 50054}
# The port the kubelet's gRPC probes use: plaintext grpc.health.v1 only (probes send no certificate).
PROBE_LISTEN = {"proxy": "RDBROKER_GRPC_LISTEN", "health": "RDBROKER_PROBE_LISTEN"}
SENSITIVE = re.compile(r"TOKEN|PASSWORD|SECRET|DATABASE_URL|_KEY$|CREDENTIAL", re.IGNORECASE)


def deployment_container(target: str, name: str) -> m.Manifest:
    containers: list[m.Manifest] = m.named(m.render(target), "Deployment", name)["spec"]["template"]["spec"][
        "containers"
    ]
    assert len(containers) == 1
    return containers[0]


def config_maps(docs: tuple[m.Manifest, ...]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in m.of_kind(docs, "ConfigMap")}


def effective_env(docs: tuple[m.Manifest, ...], container: m.Manifest) -> dict[str, Any]:
    """What the container sees: envFrom ConfigMaps, then env entries (which win)."""
    env: dict[str, Any] = {}
    maps = config_maps(docs)
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref is not None, f"{container['name']}: envFrom only from ConfigMaps (secrets go by key)"
        assert ref["name"] in maps, f"{container['name']}: envFrom names missing ConfigMap {ref['name']}"
        env.update(maps[ref["name"]])
    env.update(m.env_values(container))
    return env


def pods(docs: tuple[m.Manifest, ...]) -> list[tuple[str, dict[str, str]]]:
    """(name, labels) of every pod the manifests make, CloudNativePG's instances included."""
    found = [(f"{d['kind']}/{d['metadata']['name']}", m.pod_labels(d)) for d in m.workloads(docs)]
    found += [
        (f"Cluster/{c['metadata']['name']}", {"cnpg.io/cluster": c["metadata"]["name"]})
        for c in m.of_kind(docs, "Cluster")
    ]
    return found


# --- settings names and values ------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_rdbroker_variable_is_a_setting_of_its_service(target: str) -> None:
    docs = m.render(target)
    checked = 0
    for workload in m.workloads(docs):
        for container in m.containers(workload):
            service = m.service_of(container)
            accepted = m.accepted_names(service)
            for name in effective_env(docs, container):
                if name.startswith("RDBROKER_"):
                    checked += 1
                    assert name in accepted, (
                        f"{container['name']} ({service}) sets {name}, which no setting reads"
                    )
    assert checked >= 20


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_come_from_secrets_never_from_config_maps(target: str) -> None:
    docs = m.render(target)
    for name, data in config_maps(docs).items():
        for key in data:
            assert not SENSITIVE.search(key), f"ConfigMap {name} holds {key}"
    for workload in m.workloads(docs):
        for container in m.containers(workload):
            for name, entry in m.env_values(container).items():
                if SENSITIVE.search(name) and not name.startswith("RDBROKER_TLS_"):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    assert ref, f"{container['name']}: {name} must come from a Secret"


@pytest.mark.parametrize("target", TARGETS)
def test_database_url_is_the_operator_generated_uri(target: str) -> None:
    docs = m.render(target)
    clusters = {c["metadata"]["name"] for c in m.of_kind(docs, "Cluster")}
    users = 0
    for workload in m.workloads(docs):
        for container in m.containers(workload):
            entry = m.env_values(container).get("RDBROKER_DATABASE_URL")
            if entry is None:
                continue
            users += 1
            ref = entry["valueFrom"]["secretKeyRef"]
            assert ref["key"] == "uri"
            assert ref["name"].removesuffix("-app") in clusters
            assert ref["name"].endswith("-app")
            # libpq's own variable: only the primary is accepted, whichever host answers.
            assert m.env_value(container, "PGTARGETSESSIONATTRS") == "read-write"
    assert users == 3  # broker, migrate, apply


@pytest.mark.parametrize("target", m.patched_targets())
def test_api_tokens_come_from_a_secret(target: str) -> None:
    broker = deployment_container(target, "broker")
    for name, key in (("RDBROKER_API_READ_TOKEN", "read-token"), ("RDBROKER_API_ADMIN_TOKEN", "admin-token")):
        ref = m.env_values(broker)[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"].startswith("rdbroker-api-tokens")
        assert ref["key"] == key
    if target == "dev":  # generated there; production creates it (docs/deploy.md)
        secret = next(
            s for s in m.of_kind(m.render(target), "Secret") if s["metadata"]["name"] == ref["name"]
        )
        assert set(secret["data"]) == {"read-token", "admin-token"}


@pytest.mark.parametrize("target", m.patched_targets())
def test_the_log_hash_key_comes_from_a_secret(target: str) -> None:
    proxy = deployment_container(target, "proxy")
    ref = m.env_values(proxy)["RDBROKER_LOG_HASH_KEY"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"].startswith("rdbroker-log-hash-key"), ref["key"]) == (True, "key")
    if target == "dev":  # generated there; production creates it (docs/deploy.md)
        secret = next(
            s for s in m.of_kind(m.render(target), "Secret") if s["metadata"]["name"] == ref["name"]
        )
        assert set(secret["data"]) == {"key"}


@pytest.mark.parametrize("target", m.patched_targets())
def test_the_agent_token_comes_from_a_secret(target: str) -> None:
    health = deployment_container(target, "health")
    ref = m.env_values(health)["RDBROKER_AGENT_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"].startswith("rdbroker-agent-token")  # dev's generator adds a hash
    assert ref["key"] == "token"
    if target == "dev":  # generated there; production creates it (docs/deploy.md)
        secrets = {s["metadata"]["name"]: s for s in m.of_kind(m.render(target), "Secret")}
        assert set(secrets[ref["name"]]["data"]) == {"token"}


# --- ports and probes -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("service", sorted(LISTEN))
def test_listen_ports_match_container_ports_and_defaults(target: str, service: str) -> None:
    container = deployment_container(target, service)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for env, port_name in LISTEN[service]:
        host, port = split_host_port(m.env_value(container, env))
        assert host == "0.0.0.0", f"{service} {env} must listen on every interface in a pod"
        if env in OPT_IN_PORTS:
            assert m.default_setting(service, env) == "", f"{service} {env} is off by default"
            assert port == ports[port_name] == OPT_IN_PORTS[env], f"{service} {env}"
        else:
            assert port == ports[port_name] == m.default_port(service, env), f"{service} {env}"
    assert len(ports) == len(LISTEN[service]), f"{service} declares ports nothing listens on"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("service", ["proxy", "health"])
def test_grpc_services_are_probed_natively_on_their_health_port(target: str, service: str) -> None:
    container = deployment_container(target, service)
    _, port = split_host_port(m.env_value(container, PROBE_LISTEN[service]))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, f"{service} {probe}"
        # The overall status "" is what the services flip to NOT_SERVING on SIGTERM.
        assert container[probe]["grpc"].get("service", "") == ""


@pytest.mark.parametrize("target", TARGETS)
def test_health_probes_skip_the_mutual_tls_port(target: str) -> None:
    container = deployment_container(target, "health")
    assert m.env_value(container, "RDBROKER_TLS_CERT")  # ProbeServer is under mutual TLS ...
    _, tls_port = split_host_port(m.env_value(container, "RDBROKER_GRPC_LISTEN"))
    _, probe_port = split_host_port(m.env_value(container, "RDBROKER_PROBE_LISTEN"))
    assert probe_port != tls_port  # ... so the kubelet, which has no certificate, probes elsewhere


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("service", sorted(LISTEN))
def test_metrics_are_served_and_announced_for_scraping(target: str, service: str) -> None:
    deployment = m.named(m.render(target), "Deployment", service)
    container = deployment_container(target, service)
    _, port = split_host_port(m.env_value(container, "RDBROKER_METRICS_LISTEN"))
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    docs = m.render(target)
    policies = [
        p
        for p in m.of_kind(docs, "NetworkPolicy")
        if m.selects(p["spec"]["podSelector"]["matchLabels"], m.pod_labels(deployment))
    ]
    scrape_ports = {
        p["port"] for policy in policies for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])
    }
    assert port in scrape_ports, f"no NetworkPolicy lets Prometheus reach {service}'s metrics"


@pytest.mark.parametrize("target", TARGETS)
def test_the_broker_is_probed_on_readyz_and_healthz(target: str) -> None:
    container = deployment_container(target, "broker")
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_resources_and_a_locked_down_security_context(target: str) -> None:
    for workload in m.workloads(m.render(target)):
        spec = m.pod_spec(workload)
        assert spec is not None
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for container in m.containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            for part in ("requests", "limits"):
                assert set(container["resources"][part]) == {"cpu", "memory"}, where
            assert container["securityContext"] == {
                "runAsNonRoot": True,
                "readOnlyRootFilesystem": True,
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
                "seccompProfile": {"type": "RuntimeDefault"},
            }, where
            if workload["kind"] == "Deployment":
                assert "readinessProbe" in container, where
                assert "livenessProbe" in container, where
            else:  # a Job that runs to completion has nothing to probe
                assert "livenessProbe" not in container, where


# --- selectors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_service_selects_pods_that_serve_its_ports(target: str) -> None:
    docs = m.render(target)
    for service in m.of_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        matches = [w for w in m.workloads(docs) if m.selects(selector, m.pod_labels(w))]
        assert matches, f"Service {service['metadata']['name']} selects no pod"
        for workload in matches:
            assert workload["kind"] == "Deployment", f"Service {service['metadata']['name']} selects a Job"
            declared = {
                p["name"]: p["containerPort"] for c in m.containers(workload) for p in c.get("ports", [])
            }
            for port in service["spec"]["ports"]:
                target_port = port["targetPort"]
                assert target_port in declared or target_port in declared.values(), (
                    f"Service {service['metadata']['name']} targets {target_port}, not a port of "
                    f"{workload['metadata']['name']}"
                )


@pytest.mark.parametrize("target", TARGETS)
def test_budgets_policies_and_autoscalers_select_what_exists(target: str) -> None:
    docs = m.render(target)
    all_pods = pods(docs)
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for doc in m.of_kind(docs, kind):
            selector = (doc["spec"].get("selector") or doc["spec"].get("podSelector"))["matchLabels"]
            assert any(m.selects(selector, labels) for _, labels in all_pods), (
                f"{kind} {doc['metadata']['name']}"
            )
    for hpa in m.of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        m.named(docs, ref["kind"], ref["name"])
    for deployment in m.of_kind(docs, "Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert m.selects(selector, m.pod_labels(deployment))
        others = [
            w for w in m.workloads(docs) if w is not deployment and m.selects(selector, m.pod_labels(w))
        ]
        assert not others, f"Deployment {deployment['metadata']['name']} selector overlaps {others}"


# --- network reachability ------------------------------------------------------------------------------


def admitted(docs: tuple[m.Manifest, ...], target_labels: dict[str, str], port: int) -> tuple[bool, set[str]]:
    """(open to anywhere?, names of our pods admitted) on `port` of pods with `target_labels`."""
    policies = [
        p
        for p in m.of_kind(docs, "NetworkPolicy")
        if m.selects(p["spec"]["podSelector"]["matchLabels"], target_labels)
    ]
    assert policies, f"no NetworkPolicy isolates {target_labels}"
    anywhere = False
    names: set[str] = set()
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            if ports and port not in ports:
                continue
            if "from" not in rule:
                anywhere = True
                continue
            for peer in rule["from"]:
                if "namespaceSelector" in peer or "ipBlock" in peer:
                    continue  # other namespaces (the operator's): none of our pods
                selector = peer["podSelector"].get("matchLabels", {})
                names |= {name for name, labels in pods(docs) if not selector or m.selects(selector, labels)}
    return anywhere, names


@pytest.mark.parametrize("target", TARGETS)
def test_only_proxies_and_health_reach_the_broker_grpc_port(target: str) -> None:
    docs = m.render(target)
    broker = m.named(docs, "Deployment", "broker")
    anywhere, names = admitted(docs, m.pod_labels(broker), 50051)
    assert not anywhere
    assert names == {"Deployment/proxy", "Deployment/health"}


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_broker_and_its_jobs_reach_postgres(target: str) -> None:
    docs = m.render(target)
    anywhere, names = admitted(docs, {"cnpg.io/cluster": "rdbroker-pg"}, 5432)
    assert not anywhere
    assert names == {"Deployment/broker", "Job/rdbroker-migrate", "Job/rdbroker-apply", "Cluster/rdbroker-pg"}


@pytest.mark.parametrize("target", TARGETS)
def test_proxies_accept_rdp_from_anywhere(target: str) -> None:
    docs = m.render(target)
    anywhere, _ = admitted(docs, m.pod_labels(m.named(docs, "Deployment", "proxy")), 3389)
    assert anywhere


# --- the parts the brief names --------------------------------------------------------------------------


@pytest.mark.parametrize("target", m.patched_targets())
def test_proxy_deployment_service_budget_autoscaler_and_spread(target: str) -> None:
    docs = m.render(target)
    proxy = m.named(docs, "Deployment", "proxy")
    assert proxy["spec"]["replicas"] >= 2
    service = m.named(docs, "Service", "proxy-rdp")
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert [p["port"] for p in service["spec"]["ports"]] == [3389]
    assert service["spec"]["type"] == ("NodePort" if target == "dev" else "LoadBalancer")
    hpa = m.named(docs, "HorizontalPodAutoscaler", "proxy")
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # CPU only: a memory target could block scale-down (Python rarely returns freed memory).
    resources = [(x["type"], x["resource"]["name"]) for x in hpa["spec"]["metrics"]]
    assert resources == [("Resource", "cpu")]
    m.named(docs, "PodDisruptionBudget", "proxy")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["proxy", "broker", "health"])
def test_replicas_spread_over_nodes_and_zones(target: str, name: str) -> None:
    deployment = m.named(m.render(target), "Deployment", name)
    assert deployment["spec"]["replicas"] >= 2
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    keys = {c["topologyKey"] for c in spread}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in spread:
        assert m.selects(constraint["labelSelector"]["matchLabels"], m.pod_labels(deployment))
    m.named(m.render(target), "PodDisruptionBudget", name)
    # Pods of a dead node are replaced in under a minute, not after the default five.
    tolerations = deployment["spec"]["template"]["spec"]["tolerations"]
    waits = {t["key"]: t["tolerationSeconds"] for t in tolerations if t.get("effect") == "NoExecute"}
    assert set(waits) == {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
    assert max(waits.values()) <= 60


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["proxy", "broker", "health"])
def test_termination_grace_covers_prestop_and_the_drain(target: str, name: str) -> None:
    deployment = m.named(m.render(target), "Deployment", name)
    container = deployment_container(target, name)
    grace_s = float(m.env_value(container, "RDBROKER_SHUTDOWN_GRACE_S"))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    total = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # The service gets its whole drain after the preStop pause, and a few seconds to close.
    assert pre_stop + grace_s + 5 <= total <= pre_stop + grace_s + 30
    if name == "proxy":
        assert pre_stop >= 5, "the load balancer needs time to stop sending new clients"
        assert grace_s >= 60, "live RDP sessions deserve more than the default 10 s"


@pytest.mark.parametrize("target", TARGETS)
def test_clients_balance_over_the_headless_broker_service(target: str) -> None:
    docs = m.render(target)
    headless = m.named(docs, "Service", "broker-grpc-headless")
    assert headless["spec"]["clusterIP"] == "None"
    namespace = headless["metadata"]["namespace"]
    [port] = headless["spec"]["ports"]
    broker = deployment_container(target, "broker")
    _, grpc_port = split_host_port(m.env_value(broker, "RDBROKER_GRPC_LISTEN"))
    assert port["port"] == grpc_port
    expected = f"dns:///broker-grpc-headless.{namespace}.svc.cluster.local:{grpc_port}"
    for client in ("proxy", "health"):
        assert m.env_value(deployment_container(target, client), "RDBROKER_BROKER") == expected
    rest = m.named(docs, "Service", "broker-http")
    assert rest["spec"]["type"] == "ClusterIP"
    assert [p["port"] for p in rest["spec"]["ports"]] == [8080]


@pytest.mark.parametrize("target", TARGETS)
def test_migrate_and_apply_jobs(target: str) -> None:
    docs = m.render(target)
    [migrate] = m.named(docs, "Job", "rdbroker-migrate")["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    job = m.named(docs, "Job", "rdbroker-apply")
    [apply] = job["spec"]["template"]["spec"]["containers"]
    assert apply["args"][:2] == ["apply", "-f"]
    farm_path = apply["args"][2]
    [mount] = [v for v in apply["volumeMounts"] if farm_path.startswith(v["mountPath"] + "/")]
    [volume] = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    data = config_maps(docs)[volume["configMap"]["name"]]
    farm = yaml.safe_load(data[farm_path.rsplit("/", 1)[1]])
    assert farm["pools"]
    assert farm["servers"]
    assert all(s["pool"] in {p["name"] for p in farm["pools"]} for s in farm["servers"])


# --- values the services accept ---------------------------------------------------------------------

# Stand-ins for what comes from Secrets at run time.
SECRET_STAND_INS = {
    "RDBROKER_DATABASE_URL": "postgresql://rdbroker:secret@rdbroker-pg-rw.rdbroker:5432/rdbroker",
    "RDBROKER_API_READ_TOKEN": "read-token",
    "RDBROKER_API_ADMIN_TOKEN": "admin-token",
    "RDBROKER_LOG_HASH_KEY": "a-log-hash-key-of-32-characters!",
    "RDBROKER_AGENT_TOKEN": "agent-token-stand-in",
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("service", sorted(LISTEN))
def test_the_service_accepts_the_values_its_deployment_sets(
    target: str, service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_class = m.settings_class(service)
    docs = m.render(target)
    env = effective_env(docs, deployment_container(target, service))
    for name in [n for n in os.environ if n.startswith("RDBROKER_")]:
        monkeypatch.delenv(name)
    for name, entry in env.items():
        if name.startswith("RDBROKER_"):
            value = entry if isinstance(entry, str) else entry.get("value", SECRET_STAND_INS.get(name))
            assert value is not None, f"{service}: no stand-in for {name}"
            monkeypatch.setenv(name, value)
    settings = settings_class()
    if service in ("proxy", "health"):
        assert settings.broker_addresses == [env["RDBROKER_BROKER"]["value"]]  # one dns:/// target
