"""The broker: session directory and routing policy over PostgreSQL (or embedded SQLite), gRPC + REST."""
