"""The repository's own checks, run as tests so the one test command covers them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PACKAGES = [
    "rdbroker_common",
    "rdbroker_rdp",
    "rdbroker_broker",
    "rdbroker_proxy",
    "rdbroker_health",
    "rdbroker_agent",
    "rdbroker_cli",
]


SOURCE_ROOTS = [
    "services/broker",
    "services/proxy",
    "services/health",
    "services/agent",
    "libs/rdp",
    "libs/common",
    "libs/proto",
    "cli",
]


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    # import-linter resolves packages from sys.path, which the editable install's hook does not feed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / r) for r in SOURCE_ROOTS)}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def existing_packages() -> list[str]:
    return [p for p in PACKAGES if any(ROOT.glob(f"*/*/{p}/__init__.py")) or (ROOT / "cli" / p).exists()]


def test_ruff_check_is_clean() -> None:
    result = run(str(BIN / "ruff"), "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = run(str(BIN / "ruff"), "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(600)
def test_mypy_strict_is_clean() -> None:
    args: list[str] = []
    for package in existing_packages():
        args += ["-p", package]
    result = run(sys.executable, "-m", "mypy", *args)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contracts_hold() -> None:
    result = run(str(BIN / "lint-imports"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_protos_are_up_to_date() -> None:
    result = run(sys.executable, "scripts/gen_protos.py", "--check")
    assert result.returncode == 0, "run `make proto`:\n" + result.stdout + result.stderr
