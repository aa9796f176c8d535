"""Markers by folder, and the real PostgreSQL every database test uses (never a mock)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from tests.support import postgres

ROOT = Path(__file__).resolve().parent.parent

# CI explores the same examples every run (a red CI must be reproducible); a developer's run explores
# new ones each time. `HYPOTHESIS_PROFILE=ci` selects the CI behaviour locally.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("dev")
hypothesis_settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
)
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
        if parts[0] == "integration":
            item.add_marker(pytest.mark.integration)
        elif parts[0] == "e2e":
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    postgres.stop_throwaway()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """libpq URL (no database) of a reachable PostgreSQL server."""
    return postgres.server_url()


@pytest.fixture
def pg_database_url(pg_server_url: str) -> Iterator[str]:
    """libpq URL of a fresh, empty database, dropped after the test."""
    url = postgres.create_database(pg_server_url)
    try:
        yield url
    finally:
        postgres.drop_database(url)


@pytest.fixture(scope="session")
def telemetry() -> Iterator[tuple[object, object]]:
    """The process's telemetry (set up once), with an in-memory span exporter and a Prometheus port.

    Yields (Telemetry, InMemorySpanExporter). Tests clear the exporter before use.
    """
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from rdbroker_common import telemetry as tel

    handle = tel.setup("rdbroker-tests", metrics_listen="127.0.0.1:0")
    exporter = InMemorySpanExporter()
    handle.add_span_exporter(exporter)
    yield handle, exporter
    handle.shutdown()
