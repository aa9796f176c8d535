"""The RDP probe, shared with the broker: `rdbroker_common.rdp_probe`."""

from collections.abc import Callable, Coroutine
from typing import Any

from rdbroker_common.rdp_probe import ProbeResult, probe_rdp

__all__ = ["ProbeResult", "RdpProbe", "probe_rdp"]

# What the scheduler and the servicer call to probe (tests pass their own): address, timeout in seconds.
RdpProbe = Callable[[str, float], Coroutine[Any, Any, ProbeResult]]
