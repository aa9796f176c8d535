"""Schemathesis against the live broker (`rdbroker broker`, uvicorn on 127.0.0.1) on PostgreSQL: requests
generated from the OpenAPI document, valid and invalid, with the admin token; no answer may be a 5xx.

Bounded: a fixed seed, at most MAX_EXAMPLES per operation and a time budget for the whole run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.integration.rest.conftest import ADMIN, LiveBroker

MAX_EXAMPLES = 30
MAX_TIME_S = 40


def test_no_generated_request_gets_a_server_error(live_broker: LiveBroker, tmp_path):
    run = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", f"{live_broker.url}/openapi.json",
            "--checks", "not_a_server_error",
            "--max-examples", str(MAX_EXAMPLES),
            "--max-time", str(MAX_TIME_S),
            "--seed", "20261127",
            "--workers", "1",
            "--request-timeout", "10",
            "--phases", "examples,coverage,fuzzing",
            "--header", f"Authorization: Bearer {ADMIN}",
        ],
        capture_output=True,
        text=True,
        timeout=MAX_TIME_S + 240,
        cwd=tmp_path,
        env=dict(os.environ),
        check=False,
    )  # fmt: skip
    summary = run.stdout[-6000:] + run.stderr[-2000:]
    assert run.returncode == 0, summary
    selected = re.search(r"Selected: (\d+)/(\d+)", run.stdout)
    assert selected, summary
    assert selected[1] == selected[2], summary
    assert f"Tested: {selected[1]}" in run.stdout, summary  # every operation was exercised
    log_text = live_broker.log.read_text()
    assert "unexpected error" not in log_text
    assert "Traceback" not in log_text
