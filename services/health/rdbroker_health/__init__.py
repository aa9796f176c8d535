"""The health service: RDP handshake and agent load probes, shared among replicas through the broker."""
