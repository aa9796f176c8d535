"""A broker on its own PostgreSQL cluster, which the test stops and starts again: `/readyz` answers
ready throughout (a failover must not take every broker out of its Service), while `/v1/status`, the
`rdbroker_database_up` gauge and one log line per change say where the database is."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from rdbroker_broker.db import migrate
from tests.support import prom
from tests.support.postgres import Cluster, create_database, free_port

BOUND_S = 60.0  # a bound for a loaded machine, not a measure: the test fails only if it is passed


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    own = Cluster().init().start()
    try:
        yield own
    finally:
        own.destroy()


def _until(what: str, check: Callable[[], Any], log: Path) -> Any:
    deadline = time.monotonic() + BOUND_S
    while True:
        with_value = check()
        if with_value:
            return with_value
        assert time.monotonic() < deadline, f"not {what} within {BOUND_S} s: {log.read_text()[-3000:]}"
        time.sleep(0.1)


@pytest.mark.slow
def test_readyz_stays_ready_while_postgresql_is_stopped(cluster: Cluster, tmp_path: Path) -> None:
    url = create_database(cluster.url)
    http_port, metrics_port = free_port(), free_port()
    log = tmp_path / "broker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RDBROKER_", "OTEL_"))}
    args = [
        *("--database-url", url, "--migrate"),
        *("--grpc-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{http_port}"),
        *("--metrics-listen", f"127.0.0.1:{metrics_port}", "--db-check-interval-s", "0.5"),
    ]
    base = f"http://127.0.0.1:{http_port}"

    def get(path: str) -> httpx.Response | None:
        try:
            return httpx.get(base + path, timeout=5)
        except httpx.HTTPError:
            return None

    def database_state(state: str) -> dict[str, Any] | None:
        answer = get("/v1/status")
        body: dict[str, Any] | None = answer.json() if answer is not None else None
        return body if body is not None and body["database"]["state"] == state else None

    def gauge() -> float | None:
        return prom.sample(prom.scrape(metrics_port), "rdbroker_database_up")

    with log.open("wb") as out:
        broker = subprocess.Popen([sys.executable, "-m", "rdbroker_broker", *args], env=env, stderr=out)
    try:
        _until("ready", lambda: (r := get("/readyz")) is not None and r.status_code == 200, log)
        status = database_state("up")
        assert status is not None
        assert (status["ready"], status["schema_revision"]) == (True, migrate.head_revision())
        assert gauge() == 1

        cluster.stop("fast")
        down = _until("down", lambda: database_state("down"), log)
        assert down["database"]["last_error"]
        assert (readyz := get("/readyz")) is not None
        assert (readyz.status_code, readyz.json()) == (200, {"status": "ready"})
        assert down["ready"] is True
        assert gauge() == 0
        servers = get("/v1/servers")
        assert servers is not None
        assert servers.status_code == 503  # the calls that need the database fail meanwhile
        assert (readyz := get("/readyz")) is not None
        assert readyz.status_code == 200

        cluster.start()
        up = _until("up again", lambda: database_state("up"), log)
        # The last failure is kept, for the record (a later failure while down may have replaced the first).
        assert up["database"]["last_error"]
        assert up["database"]["last_error_at"] >= down["database"]["last_error_at"]
        assert gauge() == 1
        assert (servers := get("/v1/servers")) is not None
        assert servers.status_code == 200
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            assert broker.wait(30) == 0
        finally:
            if broker.poll() is None:
                broker.kill()
                broker.wait(10)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    changes = [
        line["msg"].split(" (")[0].split(":")[0] for line in lines if line.get("database") in ("up", "down")
    ]
    # One line per change, however many calls, sweeps and pings failed meanwhile.
    assert changes == ["the database does not answer", "the database answers again"], changes
    warnings = [
        line["msg"] for line in lines if line["level"] in ("WARNING", "ERROR") and "database" not in line
    ]
    assert [w for w in warnings if not w.startswith("REST API has no tokens")] == []
