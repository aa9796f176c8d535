"""`python -m rdbroker_agent` as a process: config file, 127.0.0.1 port, drain file, SIGTERM, bad config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.postgres import free_port

SESSIONS_SCRIPT = 'import json; print(json.dumps([{"user": "alice", "state": "active"}]))'


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    command = [sys.executable, "-c", "print('30%')"]
    sessions = [sys.executable, "-c", SESSIONS_SCRIPT]
    path.write_text(
        "max_sessions = 10\n"
        'drain_file = "drain"\n'
        "[[counters]]\n"
        'kind = "command"\n'
        f"command = {toml_list(command)}\n"
        "weight = 1\n"
        "[[counters]]\n"
        'kind = "sessions"\n'
        "full_scale = 10\n"
        "weight = 1\n"
        "[sessions]\n"
        'source = "command"\n'
        f"command = {toml_list(sessions)}\n"
    )
    return path


def toml_list(items: list[str]) -> str:
    return json.dumps(items)  # JSON strings are TOML basic strings


def test_agent_serves_until_sigterm(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdbroker_agent", "--config", str(config), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "RDBROKER_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert f"agent listening on 127.0.0.1:{port}" in line
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/load").text == "20\n"  # (30 + 1 session of 10 -> 10) / 2
            assert client.get("/sessions").json() == {
                "omits_disconnected": False,  # a command source lists disconnected sessions too
                "sessions": [{"user": "alice", "state": "active"}],
            }
            (tmp_path / "drain").touch()
            assert client.get("/load").text == "drain\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert out == b""
        assert b"agent stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[[counters]]\nkind = "cpu"\nwieght = 2\n')
    result = subprocess.run(
        [sys.executable, "-m", "rdbroker_agent", "--config", str(path), "--listen", "127.0.0.1:0"],
        capture_output=True,
        timeout=30,
        check=False,
        env={**os.environ, "RDBROKER_LOG_FORMAT": "text"},
    )
    assert result.returncode == 2
    assert b"unknown key(s) in counters[0]: wieght" in result.stderr


def test_bad_listen_address_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rdbroker_agent", "--config", str(write_config(tmp_path)), "--listen", "x"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"missing port" in result.stderr
