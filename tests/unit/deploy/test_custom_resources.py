"""The custom resources hold what the deployment relies on: PostgreSQL's replicas and synchronous
commit, the certificate chain behind mutual TLS, and (prod) continuous backup."""

from __future__ import annotations

import pytest

from tests.unit.deploy import manifests as m

TARGETS = sorted(m.TARGETS)
TLS_FILES = {"RDBROKER_TLS_CA": "ca.crt", "RDBROKER_TLS_CERT": "tls.crt", "RDBROKER_TLS_KEY": "tls.key"}


@pytest.mark.parametrize("target", ["base", "prod"])
def test_postgres_has_three_instances_and_quorum_synchronous_commit(target: str) -> None:
    cluster = m.named(m.render(target), "Cluster", "rdbroker-pg")
    spec = cluster["spec"]
    assert spec["instances"] == 3
    assert spec["postgresql"]["synchronous"] == {"method": "any", "number": 1, "dataDurability": "required"}
    assert spec["affinity"] == {
        "enablePodAntiAffinity": True,
        "topologyKey": "kubernetes.io/hostname",
        "podAntiAffinityType": "required",
    }
    assert spec["bootstrap"]["initdb"] == {"database": "rdbroker", "owner": "rdbroker"}


@m.needs_renderer
def test_dev_postgres_is_one_instance_without_synchronous_standbys() -> None:
    spec = m.named(m.render("dev"), "Cluster", "rdbroker-pg")["spec"]
    assert spec["instances"] == 1
    assert "synchronous" not in spec["postgresql"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_certificate_chains_to_the_rdbroker_ca(target: str) -> None:
    docs = m.render(target)
    issuers = {i["metadata"]["name"]: i["spec"] for i in m.of_kind(docs, "Issuer")}
    certificates = {c["metadata"]["name"]: c["spec"] for c in m.of_kind(docs, "Certificate")}
    ca = certificates["rdbroker-ca"]
    assert ca["isCA"] is True
    assert "selfSigned" in issuers[ca["issuerRef"]["name"]]
    assert issuers["rdbroker-ca"] == {"ca": {"secretName": ca["secretName"]}}
    for name, spec in certificates.items():
        if name != "rdbroker-ca":
            assert spec["issuerRef"]["name"] == "rdbroker-ca", name
            assert not spec.get("isCA"), name


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ["proxy", "broker", "health"])
def test_each_service_mounts_its_own_certificate(target: str, name: str) -> None:
    docs = m.render(target)
    certificate = m.named(docs, "Certificate", f"{name}-tls")["spec"]
    deployment = m.named(docs, "Deployment", name)
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    for env, file_name in TLS_FILES.items():
        path = m.env_value(container, env)
        [mount] = [v for v in container["volumeMounts"] if path == f"{v['mountPath']}/{file_name}"]
        assert volumes[mount["name"]]["secret"]["secretName"] == certificate["secretName"]
    usage = "server auth" if name == "broker" else "client auth"
    assert usage in certificate["usages"]


@pytest.mark.parametrize("target", TARGETS)
def test_each_client_certificate_names_its_role_in_the_trust_domain_of_its_servers(target: str) -> None:
    docs = m.render(target)
    domains = set()
    for server in ("broker", "health"):  # the health replica checks admin certificates for ProbeServer
        [container] = m.named(docs, "Deployment", server)["spec"]["template"]["spec"]["containers"]
        domains.add(m.env_value(container, "RDBROKER_GRPC_TRUST_DOMAIN"))
    [domain] = domains
    for role in ("proxy", "health"):
        spec = m.named(docs, "Certificate", f"{role}-tls")["spec"]
        assert spec["uris"] == [f"spiffe://{domain}/rdbroker/{role}"], role
    # The broker is no client of anyone: its certificate carries no role.
    assert "uris" not in m.named(docs, "Certificate", "broker-tls")["spec"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_broker_certificate_names_the_host_its_clients_dial(target: str) -> None:
    docs = m.render(target)
    dns_names = m.named(docs, "Certificate", "broker-tls")["spec"]["dnsNames"]
    for client in ("proxy", "health"):
        [container] = m.named(docs, "Deployment", client)["spec"]["template"]["spec"]["containers"]
        target_uri = m.env_value(container, "RDBROKER_BROKER")
        host = target_uri.removeprefix("dns:///").rsplit(":", 1)[0]
        assert host in dns_names


@m.needs_renderer
def test_prod_backs_postgres_up_continuously_to_object_storage() -> None:
    docs = m.render("prod")
    cluster = m.named(docs, "Cluster", "rdbroker-pg")["spec"]
    [plugin] = cluster["plugins"]
    assert plugin["isWALArchiver"] is True
    store = m.named(docs, "ObjectStore", plugin["parameters"]["barmanObjectName"])
    assert store["spec"]["configuration"]["destinationPath"].startswith("s3://")
    scheduled = m.named(docs, "ScheduledBackup", "rdbroker-pg-nightly")["spec"]
    assert scheduled["cluster"]["name"] == "rdbroker-pg"
    assert scheduled["method"] == "plugin"
    assert scheduled["pluginConfiguration"]["name"] == plugin["name"]
