"""The kustomizations: every listed file exists, every file is listed, and base and overlays build."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.deploy import manifests as m

NAMESPACED_EXEMPT = {"Namespace"}


def listed_paths(folder: Path) -> list[Path]:
    spec = m.kustomization(folder)
    paths = [folder / entry for entry in spec.get("resources", [])]
    paths += [folder / entry for entry in spec.get("components", [])]
    paths += [folder / patch["path"] for patch in spec.get("patches", []) if "path" in patch]
    paths += [folder / entry for entry in spec.get("patchesStrategicMerge", [])]
    for generator in [*spec.get("configMapGenerator", []), *spec.get("secretGenerator", [])]:
        for entry in generator.get("files", []):
            paths.append(folder / entry.split("=", 1)[-1])
        for entry in generator.get("envs", []):
            paths.append(folder / entry)
    return paths


@pytest.mark.parametrize("folder", m.kustomization_folders(), ids=lambda p: str(p.relative_to(m.K8S)))
def test_every_kustomization_lists_files_that_exist(folder: Path) -> None:
    paths = listed_paths(folder)
    assert paths, f"{folder}: lists nothing"
    for path in paths:
        assert path.exists(), (
            f"{folder}/kustomization.yaml lists {path.relative_to(folder)}, which is missing"
        )
        if path.is_dir():
            assert (path / "kustomization.yaml").is_file(), (
                f"{path} is listed but holds no kustomization.yaml"
            )


def test_every_manifest_file_is_listed_somewhere() -> None:
    listed = {p.resolve() for folder in m.kustomization_folders() for p in listed_paths(folder)}
    for path in sorted(m.K8S.rglob("*.yaml")):
        if path.name != "kustomization.yaml":
            assert path.resolve() in listed, f"{path.relative_to(m.K8S)} is in no kustomization"


def test_the_overlays_build_on_the_base() -> None:
    for overlay in ("dev", "prod"):
        resources = m.kustomization(m.TARGETS[overlay]).get("resources", [])
        assert "../../base" in resources, f"overlay {overlay} does not build on base"


@pytest.mark.parametrize("target", sorted(m.TARGETS))
def test_target_builds_into_one_namespace_without_duplicates(target: str) -> None:
    docs = m.render(target)
    assert len(docs) >= 25, f"{target}: only {len(docs)} objects"
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"{target}: duplicate objects"
    for doc in docs:
        if doc["kind"] not in NAMESPACED_EXEMPT:
            assert doc["metadata"].get("namespace") == "rdbroker", f"{doc['kind']}/{doc['metadata']['name']}"


@pytest.mark.skipif(m.kustomize_command() is None, reason="needs kustomize or kubectl to compare with")
def test_the_python_resolver_finds_what_kustomize_builds() -> None:
    # The fallback used where no kustomize is installed must see the same objects as the real thing.
    rendered = {(d["kind"], d["metadata"]["name"]) for d in m.render("base")}
    resolved = {(d["kind"], d["metadata"]["name"]) for d in m._resolve(m.TARGETS["base"])}
    assert resolved == rendered
