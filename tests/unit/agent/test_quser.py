"""The Windows `quser` helper: its parser on real-shaped output, and its command line."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from rdbroker_agent import quser
from rdbroker_agent.sources import Session, parse_sessions

OUTPUT = """\
 USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME
>administrator         console             1  Active      none   11/27/2026 9:00 AM
 alice                 rdp-tcp#3           2  Active          .  11/27/2026 9:01 AM
 bob                                       3  Disc           12  11/27/2026 8:40 AM
 carol                 rdp-tcp#7          14  Conn            .  11/27/2026 9:05 AM
"""


def test_parse_quser() -> None:
    assert quser.parse_quser(OUTPUT) == [
        Session("administrator", "active"),
        Session("alice", "active"),
        Session("bob", "disconnected"),
    ]


def test_parse_quser_ignores_noise() -> None:
    assert quser.parse_quser("") == []
    assert quser.parse_quser(" USERNAME SESSIONNAME ID STATE\n\n garbage line\n") == []


def fake_run(stdout: str, stderr: str = "", returncode: int = 0) -> Any:
    def run(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["quser"], returncode, stdout, stderr)

    return run


def test_main_prints_agent_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(subprocess, "run", fake_run(OUTPUT))
    assert quser.main() == 0
    out = capsys.readouterr().out
    assert json.loads(out)[2] == {"user": "bob", "state": "disconnected"}
    assert len(parse_sessions(out)) == 3  # what the agent's command source reads back


def test_main_nobody_logged_on(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(subprocess, "run", fake_run("", "No User exists for *\n", 1))
    assert quser.main() == 0
    assert capsys.readouterr().out == "[]\n"


def test_main_quser_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(subprocess, "run", fake_run("", "Access is denied.\n", 5))
    assert quser.main() == 1
    assert "quser exited with 5: Access is denied." in capsys.readouterr().err


def test_main_without_quser(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(subprocess, "run", missing)
    assert quser.main() == 1
    assert "cannot run quser" in capsys.readouterr().err
