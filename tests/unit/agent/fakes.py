"""A Sources double with fixed readings, for the agent's tests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rdbroker_agent.errors import SourceError
from rdbroker_agent.sources import Session


@dataclass
class FakeSources:
    cpu: float | Exception = 0.0
    memory: float | Exception = 0.0
    users: list[Session] | Exception = field(default_factory=list)
    desktops: list[Session] | Exception = field(default_factory=list)
    outputs: dict[tuple[str, ...], str | Exception] = field(default_factory=dict)
    runs: list[tuple[str, ...]] = field(default_factory=list)

    async def cpu_percent(self) -> float:
        return _value(self.cpu)

    async def memory_percent(self) -> float:
        return _value(self.memory)

    async def logged_in_sessions(self) -> list[Session]:
        if isinstance(self.users, Exception):
            raise self.users
        return list(self.users)

    async def xrdp_sessions(self) -> list[Session]:
        if isinstance(self.desktops, Exception):
            raise self.desktops
        return list(self.desktops)

    async def run(self, command: Sequence[str], timeout_s: float) -> str:
        self.runs.append(tuple(command))
        out = self.outputs.get(tuple(command), SourceError(f"no such command {command!r}"))
        if isinstance(out, Exception):
            raise out
        return out


def _value(value: float | Exception) -> float:
    if isinstance(value, Exception):
        raise value
    return value
