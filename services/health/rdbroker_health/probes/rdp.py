"""The RDP probe, shared with the broker: `rdbroker_common.rdp_probe`."""

from rdbroker_common.rdp_probe import ProbeResult, probe_rdp

__all__ = ["ProbeResult", "probe_rdp"]
