"""Framework-free pieces shared by every rdbroker service: settings, logs, lifecycle, gRPC serving."""
