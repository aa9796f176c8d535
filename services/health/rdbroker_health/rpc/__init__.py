"""gRPC edges of the health service: the `rdbroker.v1.Health` servicer and the broker client."""
