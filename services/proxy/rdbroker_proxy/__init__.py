"""The RDP proxy: reads the first packet, asks the broker, splices bytes to the chosen server."""
