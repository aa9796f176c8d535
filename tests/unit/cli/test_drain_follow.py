"""The drain's live line (`rdbroker servers drain ... ` without --no-wait): rewritten in place on a
terminal, a line per change otherwise, and Ctrl-C stops watching without stopping the drain."""

from __future__ import annotations

import io
from typing import Any

import pytest

from rdbroker_cli import drain

A = "10.0.0.11:3389"


def progress(step: str, left: int, **extra: Any) -> dict[str, Any]:
    return {
        "server_address": A,
        "step": step,
        "running": step not in ("done", "cancelled"),
        "detail": f"{left} sessions left: {left} active, 0 disconnected"
        if left
        else f"no sessions left: {A} is now maintenance",
        "sessions_left": left,
        "messaged": 2,
        "logged_off": 0,
        "errors": 0,
        "last_error": "",
        "next_logoff_at": None,
        **extra,
    }


class Client:
    def __init__(self, answers: list[dict[str, Any] | BaseException]) -> None:
        self.answers = answers

    def get_drain(self, address: str) -> dict[str, Any]:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drain, "POLL_S", 0)


def test_a_line_per_change_when_not_on_a_terminal():
    out = io.StringIO()
    answers = [progress("waiting", 2), progress("waiting", 1), progress("done", 0)]
    _, text = drain.follow(Client(answers), A, progress("messaging", 2), out)  # type: ignore[arg-type]
    counts = "messaged 2, logged off 0, errors 0"
    assert out.getvalue().splitlines() == [
        f"draining {A}: messaging, 2 sessions left: 2 active, 0 disconnected; {counts}",
        f"draining {A}: waiting, 2 sessions left: 2 active, 0 disconnected; {counts}",
        f"draining {A}: waiting, 1 sessions left: 1 active, 0 disconnected; {counts}",
    ]
    assert (
        text
        == f"drained {A}: no sessions left: {A} is now maintenance (messaged 2, logged off 0, errors 0)\n"
    )


def test_one_line_rewritten_in_place_on_a_terminal_with_errors_and_the_next_logoff():
    out = Terminal()
    late = progress(
        "waiting",
        1,
        errors=1,
        last_error="message of s1: the agent at x answered 503",
        next_logoff_at="2026-12-07T09:30:00Z",
    )
    drain.follow(Client([late, progress("done", 0)]), A, progress("waiting", 1), out)  # type: ignore[arg-type]
    shown = out.getvalue()
    assert "\n" not in shown
    assert shown.count("\r\x1b[K") == 3  # two progress lines, then the line cleared for the result
    assert (
        "; next logoff 2026-12-07 09:30:00 UTC; last error: message of s1: the agent at x answered 503"
        in shown
    )


def test_ctrl_c_stops_watching_not_the_drain(capsys):
    out = Terminal()
    answer, text = drain.follow(Client([KeyboardInterrupt()]), A, progress("waiting", 2), out)  # type: ignore[arg-type]
    assert (answer["step"], text) == ("waiting", "")
    assert out.getvalue().endswith("\n")
    assert capsys.readouterr().err == (
        "stopped watching; the drain goes on in the broker "
        f"(`rdbroker servers drain {A} --watch` follows it, `--cancel` stops it)\n"
    )
