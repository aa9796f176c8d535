"""`python -m rdbroker_agent` as a process: config file, 127.0.0.1 port, drain file, SIGTERM, bad config,
the token from the environment, the refusal to listen beyond loopback without authentication."""

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


def run_agent(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "rdbroker_agent", "--config", str(write_config(tmp_path)), *args],
        capture_output=True,
        timeout=30,
        check=False,
        env={**os.environ, "RDBROKER_LOG_FORMAT": "text"},
    )


def test_without_auth_a_non_loopback_listen_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run_agent(tmp_path, "--listen", "0.0.0.0:0")
    assert result.returncode == 2
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert "refusing to listen on 0.0.0.0 without authentication" in lines[0]
    assert "--allow-unauthenticated" in lines[0]


def test_allow_unauthenticated_lifts_the_refusal(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: past the refusal, the bind itself fails, so the
    # test never listens beyond loopback.
    result = run_agent(tmp_path, "--listen", "192.0.2.1:0", "--allow-unauthenticated")
    assert result.returncode == 1
    assert b"cannot listen on 192.0.2.1:0" in result.stderr
    assert b"refusing" not in result.stderr


def test_without_auth_the_default_listen_is_loopback(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rdbroker_agent", "--config", str(write_config(tmp_path))],
        stderr=subprocess.PIPE,
        env={**os.environ, "RDBROKER_LOG_FORMAT": "text", "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        # Listening, or the port is taken on this machine: either way, on 127.0.0.1:8088.
        assert "agent listening on 127.0.0.1:8088 (http)" in line or "cannot listen on 127.0.0.1:8088" in line
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)


def test_a_token_from_the_environment_is_required_and_never_logged(tmp_path: Path) -> None:
    token = "process-token-5f0c2d9a71"
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rdbroker_agent",
            "--config",
            str(write_config(tmp_path)),
            "--listen",
            f"127.0.0.1:{port}",
            "--log-level",
            "DEBUG",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={
            **os.environ,
            "RDBROKER_LOG_FORMAT": "text",
            "PYTHONUNBUFFERED": "1",
            "RDBROKER_AGENT_TOKEN": token,
        },
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert f"agent listening on 127.0.0.1:{port} (http), requests need a bearer token" in line
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert client.get("/load").status_code == 401
            assert (
                client.get("/load", headers={"Authorization": "Bearer wrong-token-000000"}).status_code == 401
            )
            assert client.get("/load", headers={"Authorization": f"Bearer {token}"}).text == "20\n"
            assert client.get("/healthz").text == "ok\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert b"refused 1 request(s) without valid credentials" in err  # logged once for both
        assert token.encode() not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
