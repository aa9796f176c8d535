"""The gRPC edge: the rdbroker.v1.Broker servicer, status mapping and proto conversion."""
