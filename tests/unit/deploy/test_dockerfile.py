"""The Dockerfile's shape (no engine runs here): multi-stage, wheel built in a builder, a final stage
with no build tools that runs as a numeric non-root user with `rdbroker` as its entry point."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest

from tests.unit.deploy import manifests as m

DOCKERFILE = m.ROOT / "Dockerfile"
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|build-essential|python3-dev|libpq-dev|pip install|apt-get)\b"
)


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse() -> tuple[dict[str, str], list[Stage]]:
    """ARGs before the first FROM, and the stages (continuation lines joined, comments dropped)."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert keyword == "ARG", f"only ARG may precede FROM, got {keyword}"
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda mt: args[mt.group(1) or mt.group(2)], image)


def test_builder_and_runtime_share_a_slim_python_base() -> None:
    args, stages = parse()
    assert len(stages) >= 2
    bases = {resolve(s.base, args) for s in stages}
    assert len(bases) == 1, "the venv copied between stages needs the same Python at the same path"
    assert re.fullmatch(r"python:3\.(11|12)-slim(-\w+)?", bases.pop())


def test_the_wheel_is_built_in_the_builder_and_only_the_venv_is_copied() -> None:
    _, stages = parse()
    builder, final = stages[0], stages[-1]
    assert any("build --wheel" in run or "pip wheel" in run for run in builder.all("RUN"))
    copies = final.all("COPY")
    assert copies == [f"--from={builder.name} /opt/rdbroker /opt/rdbroker"]


def test_the_final_stage_has_no_build_tools() -> None:
    _, stages = parse()
    for run in stages[-1].all("RUN"):
        assert not BUILD_TOOLS.search(run), run


def test_the_final_stage_runs_as_the_numeric_user_the_manifests_expect() -> None:
    _, stages = parse()
    [user] = stages[-1].all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) > 0
    assert not gid or gid.isdigit()
    for workload in m.workloads(m.render("base")):
        spec = m.pod_spec(workload)
        assert spec is not None
        assert spec["securityContext"]["runAsUser"] == int(uid)


def test_entrypoint_is_rdbroker_in_exec_form() -> None:
    _, stages = parse()
    [entrypoint] = stages[-1].all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["rdbroker"]


@pytest.mark.parametrize("needed", ["pyproject.toml", "README.md", "cli", "libs", "services"])
def test_dockerignore_lets_the_wheel_sources_through(needed: str) -> None:
    ignore = (m.ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert "**" in ignore, "the context starts empty and lets back only what the wheel needs"
    assert any(line.startswith(f"!{needed}") for line in ignore)
    _, stages = parse()
    assert any(needed in copy for copy in stages[0].all("COPY"))
