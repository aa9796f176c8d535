"""Loading deploy/k8s: kustomizations, their rendered output, and the settings names the services accept.

Rendering uses `kustomize build` or `kubectl kustomize` when one is installed (patches, generators and
all). Without either, `render` falls back to resolving the resource lists in Python (namespace and
images applied, patches and generators not): every file still gets checked; the tests of patched
output (`patched_targets`, `needs_renderer`) are skipped there instead of passing on unpatched objects.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rdbroker_common.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
TARGETS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
}

Manifest = dict[str, Any]

# The command a container runs (its first argument) -> the service whose settings it reads.
COMMAND_SERVICE = {
    "broker": "broker",
    "migrate": "broker",
    "apply": "broker",
    "proxy": "proxy",
    "health": "health",
}


def load_documents(path: Path) -> list[Manifest]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def kustomization(folder: Path) -> Manifest:
    docs = load_documents(folder / "kustomization.yaml")
    assert len(docs) == 1, f"{folder}: one kustomization document expected"
    return docs[0]


def kustomization_folders() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


# What the Python fallback does not apply: a target using any of these needs a real renderer to be
# checked on its rendered output.
_RENDERER_ONLY = (
    "patches",
    "patchesStrategicMerge",
    "patchesJson6902",
    "configMapGenerator",
    "secretGenerator",
    "replacements",
    "components",
)
needs_renderer = pytest.mark.skipif(
    kustomize_command() is None,
    reason="checks kustomize-patched output: needs kustomize or kubectl (the Python fallback resolves "
    "resource lists only)",
)


def renderer_only(target: str) -> bool:
    spec = kustomization(TARGETS[target])
    return any(key in spec for key in _RENDERER_ONLY)


def patched_targets() -> list[Any]:
    """TARGETS for tests of rendered output: those with patches or generators need a real renderer."""
    return [pytest.param(t, marks=needs_renderer) if renderer_only(t) else t for t in sorted(TARGETS)]


@functools.cache
def render(target: str) -> tuple[Manifest, ...]:
    """The manifests `kubectl apply -k` would send for one of TARGETS."""
    folder = TARGETS[target]
    command = kustomize_command()
    if command is None:
        return tuple(_resolve(folder))
    result = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"{' '.join(command)} {folder} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc is not None)


def resource_files(folder: Path) -> list[Path]:
    """Every manifest file a kustomization pulls in through `resources`, recursively."""
    files: list[Path] = []
    for entry in kustomization(folder).get("resources", []):
        path = (folder / entry).resolve()
        files.extend(resource_files(path) if path.is_dir() else [path])
    return files


def _resolve(folder: Path) -> Iterator[Manifest]:
    spec = kustomization(folder)
    namespace = spec.get("namespace")
    images = {i["name"]: i for i in spec.get("images", [])}
    for entry in spec.get("resources", []):
        path = (folder / entry).resolve()
        docs = list(_resolve(path)) if path.is_dir() else load_documents(path)
        for doc in docs:
            if namespace and doc.get("kind") != "Namespace":
                doc.setdefault("metadata", {})["namespace"] = namespace
            for container in containers(doc):
                image = images.get(container.get("image", ""))
                if image:
                    name = image.get("newName", image["name"])
                    container["image"] = f"{name}:{image['newTag']}" if "newTag" in image else name
            yield doc


def pod_spec(doc: Manifest) -> Manifest | None:
    if doc.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        spec: Manifest = doc["spec"]["template"]["spec"]
        return spec
    return None


def pod_labels(doc: Manifest) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(doc: Manifest) -> list[Manifest]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def workloads(docs: tuple[Manifest, ...]) -> list[Manifest]:
    return [d for d in docs if pod_spec(d) is not None]


def of_kind(docs: tuple[Manifest, ...], kind: str) -> list[Manifest]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: tuple[Manifest, ...], kind: str, name: str) -> Manifest:
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def env_values(container: Manifest) -> dict[str, Manifest]:
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: Manifest, name: str) -> str:
    entry = env_values(container)[name]
    assert "value" in entry, f"{container['name']}: {name} is not a literal value"
    value: str = entry["value"]
    return value


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def service_of(container: Manifest) -> str:
    args = container.get("args") or []
    assert args, f"{container['name']}: the command is given as args (ENTRYPOINT is rdbroker)"
    command: str = args[0]
    assert command in COMMAND_SERVICE, f"{container['name']}: unknown rdbroker command {command!r}"
    return COMMAND_SERVICE[command]


# --- the settings names each service accepts ---------------------------------------------------


@functools.cache
def settings_class(service: str) -> type[ServiceSettings]:
    """The service's settings class in `rdbroker_<service>.config` (every service has exactly one)."""
    module = importlib.import_module(f"rdbroker_{service}.config")
    classes = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, ServiceSettings)
        and obj is not ServiceSettings
        and obj.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"rdbroker_{service}.config: one settings class expected, found {classes}"
    return classes[0]


@functools.cache
def accepted_names(service: str) -> frozenset[str]:
    """The `RDBROKER_*` names a manifest may set for `service`: its settings class's fields."""
    return frozenset(f"RDBROKER_{field.upper()}" for field in settings_class(service).model_fields)


def default_setting(service: str, env: str) -> str:
    """A setting's default, from the service's settings class."""
    cls = settings_class(service)
    field = env.removeprefix("RDBROKER_").lower()
    assert field in cls.model_fields, f"{service} has no setting {field} ({env})"
    return str(cls.model_fields[field].default)


def default_port(service: str, env: str) -> int:
    """The port of a listen setting's default."""
    return int(default_setting(service, env).rsplit(":", 1)[1])
