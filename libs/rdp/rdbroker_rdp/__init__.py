"""Sans-IO codec for the first RDP packets: TPKT, X.224 Connection Request/Confirm, routing tokens."""
