"""Loading deploy/k8s: kustomizations, their rendered output, and the settings names the services accept.

Rendering uses `kustomize build` or `kubectl kustomize` when one is installed (patches, generators and
all). Without either, `render` falls back to resolving the resource lists in Python (namespace and
images applied, patches not): every file still gets checked, only overlay patches go unchecked.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
TARGETS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
}
CONTRACTS = ROOT / "docs" / "contracts.md"

Manifest = dict[str, Any]

# Names the manifests set ahead of the part that reads them: the REST API's bearer tokens (issue 5),
# named by the deployment brief. Accepted only while no settings class defines any of them; once
# one does, they are checked like every other name.
PENDING_BROKER_NAMES = frozenset({"RDBROKER_API_READ_TOKEN", "RDBROKER_API_ADMIN_TOKEN"})

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


def contract_names() -> dict[str, set[str]]:
    """`RDBROKER_*` names per service from the table in docs/contracts.md ("all" rows go to every one)."""
    names: dict[str, set[str]] = {"broker": set(), "proxy": set(), "health": set()}
    for line in CONTRACTS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not line.lstrip().startswith("|"):
            continue
        service, flags = cells[0], cells[1]
        found = set(re.findall(r"RDBROKER_[A-Z0-9_]+", flags))
        # `--foo-bar` always has RDBROKER_FOO_BAR (the contract's first rule).
        found |= {
            "RDBROKER_" + f[2:].upper().replace("-", "_") for f in re.findall(r"--[a-z][a-z0-9-]*", flags)
        }
        for target in names:
            if service.startswith("all") or service == target:
                names[target] |= found
    return names


def settings_names(service: str) -> set[str] | None:
    """`RDBROKER_*` names of the service's settings classes, or None while the service has none."""
    try:
        module = importlib.import_module(f"rdbroker_{service}.config")
    except ImportError:
        return None
    from rdbroker_common.settings import ServiceSettings

    classes = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, ServiceSettings) and obj is not ServiceSettings
    ]
    if not classes:
        return None
    return {f"RDBROKER_{field.upper()}" for cls in classes for field in cls.model_fields}


def settings_class(service: str) -> type[Any] | None:
    try:
        module = importlib.import_module(f"rdbroker_{service}.config")
    except ImportError:
        return None
    from rdbroker_common.settings import ServiceSettings

    for obj in vars(module).values():
        if inspect.isclass(obj) and issubclass(obj, ServiceSettings) and obj is not ServiceSettings:
            return obj
    return None


@functools.cache
def accepted_names(service: str) -> frozenset[str]:
    """The names a manifest may set for `service`: its settings classes when they exist, else the contract."""
    real = settings_names(service)
    names = set(contract_names()[service]) if real is None else real
    if service == "broker":
        defined = any(
            PENDING_BROKER_NAMES & (settings_names(s) or set()) for s in ("broker", "proxy", "health")
        )
        if not defined:
            names |= PENDING_BROKER_NAMES
    return frozenset(names)


def contract_default(service: str, env: str) -> str:
    """The default the contract table gives for one service's variable (first backticked value)."""
    for line in CONTRACTS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] == service and env in cells[1]:
            match = re.search(r"`([^`]*)`", cells[2])
            assert match, f"no default for {service} {env} in {CONTRACTS}"
            return match.group(1)
    raise AssertionError(f"{service} {env} is not in the table of {CONTRACTS}")


def default_setting(service: str, env: str) -> str:
    """A setting's default, from the settings class when it exists, else the contract."""
    cls = settings_class(service)
    field = env.removeprefix("RDBROKER_").lower()
    if cls is not None and field in cls.model_fields:
        return str(cls.model_fields[field].default)
    return contract_default(service, env)


def default_port(service: str, env: str) -> int:
    """The port of a listen setting's default: from the settings class when it exists, else the contract."""
    cls = settings_class(service)
    field = env.removeprefix("RDBROKER_").lower()
    if cls is not None and field in cls.model_fields:
        default = str(cls.model_fields[field].default)
    else:
        default = contract_default(service, env)
    return int(default.rsplit(":", 1)[1])
