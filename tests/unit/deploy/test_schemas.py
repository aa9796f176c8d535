"""Every manifest validates offline: Kubernetes kinds against the bundled OpenAPI schemas in strict mode
(unknown fields are errors), custom resources against the field subsets in custom_resources.py."""

from __future__ import annotations

from pathlib import Path

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from tests.unit.deploy import manifests as m
from tests.unit.deploy.custom_resources import SCHEMAS

# The oldest Kubernetes we support (native gRPC probes, preStop sleep, matchLabelKeys all there by
# 1.30) and the newest whose schemas the package bundles.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def errors_in(docs: tuple[m.Manifest, ...] | list[m.Manifest], version: str) -> list[str]:
    errors: list[str] = []
    for doc in docs:
        where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        schema = SCHEMAS.get((doc.get("apiVersion", ""), doc.get("kind", "")))
        if schema is not None:
            errors += [f"{where}: {e.message} at {list(e.absolute_path)}" for e in _crd_errors(doc, schema)]
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {exc.message} at {list(exc.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: {doc.get('apiVersion')} {doc.get('kind')} has no schema here")
    return errors


def _crd_errors(doc: m.Manifest, schema: dict[str, object]) -> list[jsonschema.ValidationError]:
    return list(jsonschema.Draft202012Validator(schema).iter_errors(doc))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", sorted(m.TARGETS))
def test_rendered_manifests_validate(target: str, version: str) -> None:
    assert errors_in(m.render(target), version) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_every_resource_file_validates_on_its_own(version: str) -> None:
    files: set[Path] = set()
    for folder in m.kustomization_folders():
        files |= {p for p in m.resource_files(folder) if p.is_file()}
    assert len(files) >= 25
    docs = [doc for path in sorted(files) for doc in m.load_documents(path)]
    assert errors_in(docs, version) == []


def test_strict_mode_catches_a_misspelt_field() -> None:
    # The check above is only worth something if an unknown field fails it.
    deployment = m.named(m.render("base"), "Deployment", "proxy")
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    assert errors_in([broken], VERSIONS[0])


def test_custom_resource_schemas_catch_a_misspelt_field() -> None:
    cluster = m.named(m.render("base"), "Cluster", "rdbroker-pg")
    postgresql = {**cluster["spec"]["postgresql"], "synchronous": {"method": "any", "numbr": 1}}
    broken = {**cluster, "spec": {**cluster["spec"], "postgresql": postgresql}}
    assert errors_in([broken], VERSIONS[0])
