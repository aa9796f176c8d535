"""The README's examples, run as written: `rdbroker demo`, then the blocks marked `<!-- readme-test: NAME -->`
in a shell from the repository root, against the demo (with API tokens configured, as in production).

The only edits: the documented default address `http://127.0.0.1:8080` becomes the demo's real one (it
listens on free ports here), and `curl -s` becomes `curl -sf` so an HTTP error fails the block.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx

from tests.e2e.test_demo import demo_process

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DEFAULT_URL = "http://127.0.0.1:8080"
ADMIN = "readme-admin-token"
READ = "readme-read-token"
SET_UP = (
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/rdbroker demo",
    "bash scripts/test.sh",
)


def blocks() -> dict[str, str]:
    text = README.read_text(encoding="utf-8")
    found = re.findall(r"<!-- readme-test: ([\w-]+) -->\n```sh\n(.*?)```", text, flags=re.DOTALL)
    return dict(found)


def run_block(code: str, url: str, env: dict[str, str]) -> str:
    script = code.replace(DEFAULT_URL, url).replace("curl -s ", "curl -sf ")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout


def test_set_up_commands_are_still_there():
    text = README.read_text(encoding="utf-8")
    for command in SET_UP:
        assert f"```sh\n{command}\n```" in text


def test_readme_examples_run(tmp_path):
    examples = blocks()
    assert set(examples) == {"demo", "watch", "api", "admin"}
    assert examples["demo"] == ".venv/bin/rdbroker demo\n"
    assert (REPO / ".venv/bin/rdbroker").exists(), (
        "the README's commands need .venv (scripts/test.sh makes it)"
    )
    assert shutil.which("curl"), "the README's API examples use curl"
    tokens = {"RDBROKER_API_READ_TOKEN": READ, "RDBROKER_API_ADMIN_TOKEN": ADMIN}
    with demo_process(tmp_path, tokens) as banner:
        url = "http://" + banner["dashboard"].removeprefix("http://").rstrip("/")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "RDBROKER_URL": url,
            "RDBROKER_DEMO_PROXY": banner["RDP clients connect to"],
            "RDBROKER_TOKEN": ADMIN,
        }

        watched = run_block(examples["watch"], url, env)
        servers = re.findall(
            r"^alice: session \S+ on (\S+) in pool default \(active\)$", watched, re.MULTILINE
        )
        assert len(servers) == 2, watched
        assert servers[0] == servers[1], watched
        assert re.search(
            rf"^\S+ +alice +default +{re.escape(servers[0])} +(active|disconnected) ", watched, re.MULTILINE
        )
        assert watched.count("enabled") >= 3  # `servers list` shows the demo's three servers

        answers = run_block(examples["api"], url, env)
        for key in ("sessions", "servers", "pools"):
            assert f'"{key}":[{{' in answers

        run_block(examples["admin"], url, env)
        headers = {"Authorization": f"Bearer {READ}"}
        ended = httpx.get(f"{url}/v1/users/alice/sessions", params={"include_ended": "true"}, headers=headers)
        assert [s["state"] for s in ended.json()["sessions"]] == ["ended"]
        servers_now = httpx.get(f"{url}/v1/servers", headers=headers).json()["servers"]
        assert {s["admin_state"] for s in servers_now} == {"enabled"}  # drained, then enabled again
