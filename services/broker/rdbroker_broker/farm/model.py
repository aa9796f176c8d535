"""What a farm file declares, and the error that lists every problem in it."""

from __future__ import annotations

from dataclasses import dataclass, field

from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker.power_rules import PoolPower


class FarmError(Exception):
    """The farm file is invalid; the message lists every problem as `file:line: field: problem`."""


@dataclass
class Farm:
    pools: list[d.Pool] = field(default_factory=list)
    servers: list[d.Server] = field(default_factory=list)
    assignments: list[a.Rule] = field(default_factory=list)
    power: dict[str, PoolPower] = field(default_factory=dict)  # by pool name: its `power:` hooks
