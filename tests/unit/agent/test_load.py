"""GET /load from fixed counter values: weights, full scale, clamping, max sessions, drain, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from rdbroker_agent.config import parse_config
from rdbroker_agent.errors import SourceError
from rdbroker_agent.load import measure_load
from rdbroker_agent.sources import Session
from tests.unit.agent.fakes import FakeSources

GPU = ("gpu",)


def config(**top: object) -> dict[str, object]:
    return {
        "counters": [
            {"kind": "cpu", "weight": 2, "full_scale": 100},
            {"kind": "memory", "weight": 1, "full_scale": 50},
        ],
        **top,
    }


async def load(data: dict[str, Any], sources: FakeSources) -> str:
    return await measure_load(parse_config(data), sources)


async def test_weighted_average() -> None:
    # cpu 30 % of 100 -> 30; memory 20 of full scale 50 -> 40; (2*30 + 1*40) / 3 = 33.3 -> 33
    assert await load(config(), FakeSources(cpu=30, memory=20)) == "33"


async def test_rounds_half_up() -> None:
    data = {"counters": [{"kind": "cpu"}, {"kind": "memory"}]}
    assert await load(data, FakeSources(cpu=10, memory=11)) == "11"  # 10.5 -> 11
    assert await load(data, FakeSources(cpu=10, memory=10.8)) == "10"  # 10.4 -> 10


async def test_each_counter_is_clamped_to_its_full_scale() -> None:
    # memory 80 over full scale 50 counts as 100, not 160: (2*0 + 100) / 3 = 33
    assert await load(config(), FakeSources(cpu=0, memory=80)) == "33"
    assert await load(config(), FakeSources(cpu=500, memory=500)) == "100"
    assert await load(config(), FakeSources(cpu=-20, memory=-1)) == "0"


async def test_idle_and_full() -> None:
    assert await load(config(), FakeSources(cpu=0, memory=0)) == "0"
    assert await load(config(), FakeSources(cpu=100, memory=50)) == "100"


async def test_sessions_counter_and_max_sessions() -> None:
    data = {
        "counters": [{"kind": "sessions", "full_scale": 10}],
        "max_sessions": 4,
    }
    users = [Session(f"u{i}", "active") for i in range(3)]
    assert await load(data, FakeSources(users=users)) == "30"
    users.append(Session("u3", "disconnected"))  # disconnected sessions hold resources too
    assert await load(data, FakeSources(users=users)) == "100"  # max reached, whatever the average


async def test_max_sessions_overrides_a_low_average() -> None:
    users = [Session("a", "active"), Session("b", "active")]
    assert await load(config(max_sessions=2), FakeSources(cpu=1, memory=1, users=users)) == "100"
    assert await load(config(max_sessions=3), FakeSources(cpu=1, memory=1, users=users)) == "1"


async def test_drain_flag() -> None:
    assert await load(config(drain=True), FakeSources(cpu=100, memory=100)) == "drain"


async def test_drain_file(tmp_path: Path) -> None:
    flag = tmp_path / "drain"
    data = config(drain_file=str(flag))
    sources = FakeSources(cpu=30, memory=20)
    assert await load(data, sources) == "33"
    flag.touch()
    assert await load(data, sources) == "drain"
    flag.unlink()
    assert await load(data, sources) == "33"


async def test_drain_wins_over_a_failed_counter() -> None:
    data = config(drain=True, on_counter_error="down")
    assert await load(data, FakeSources(cpu=SourceError("boom"))) == "drain"


async def test_failed_counter_is_skipped_by_default(caplog: pytest.LogCaptureFixture) -> None:
    # cpu left out: memory 20 of 50 -> 40
    assert await load(config(), FakeSources(cpu=SourceError("no cpu"), memory=20)) == "40"
    assert "counter cpu failed (skip): no cpu" in caplog.text


async def test_every_counter_failed_is_down() -> None:
    assert await load(config(), FakeSources(cpu=SourceError("a"), memory=SourceError("b"))) == "101"


async def test_failed_counter_with_rule_down() -> None:
    assert await load(config(on_counter_error="down"), FakeSources(cpu=SourceError("x"), memory=1)) == "101"


async def test_command_counter() -> None:
    data = {
        "counters": [
            {"kind": "command", "name": "gpu", "command": list(GPU), "full_scale": 80},
            {"kind": "cpu"},
        ]
    }
    assert await load(data, FakeSources(cpu=0, outputs={GPU: "40\n"})) == "25"  # (50 + 0) / 2
    assert await load(data, FakeSources(cpu=0, outputs={GPU: " 60% "})) == "38"  # (75 + 0) / 2 = 37.5
    assert await load(data, FakeSources(cpu=30, outputs={GPU: "lots"})) == "30"  # gpu skipped
    assert await load(data, FakeSources(cpu=30, outputs={GPU: "nan"})) == "30"


async def test_failed_session_source_with_max_sessions() -> None:
    broken = FakeSources(cpu=10, memory=5, users=SourceError("no utmp"))
    assert await load(config(max_sessions=5), broken) == "10"  # skip: judged on the counters
    assert await load(config(max_sessions=5, on_counter_error="down"), broken) == "101"


async def test_session_list_is_read_once_per_answer() -> None:
    data = {
        "counters": [{"kind": "sessions", "full_scale": 10}],
        "max_sessions": 9,
        "sessions": {"source": "command", "command": ["list"]},
    }
    sources = FakeSources(outputs={("list",): '[{"user": "a", "state": "active"}]'})
    assert await measure_load(parse_config(data), sources) == "10"
    assert sources.runs == [("list",)]


async def test_command_counters_run_side_by_side() -> None:
    started: list[str] = []
    both = asyncio.Event()

    class Together(FakeSources):
        async def run(self, command: Sequence[str], timeout_s: float) -> str:
            started.append(command[0])
            if len(started) == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 5)  # one at a time would time out here
            return "50"

    data = {"counters": [{"kind": "command", "name": n, "command": [n]} for n in ("a", "b")]}
    assert await load(data, Together()) == "50"
    assert sorted(started) == ["a", "b"]
