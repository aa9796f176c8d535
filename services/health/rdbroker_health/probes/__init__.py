"""The probes: an RDP handshake (`rdp`) and the HTTP load agent and session list (`http`). None raises."""
