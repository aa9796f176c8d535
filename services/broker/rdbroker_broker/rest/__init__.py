"""The REST edge (FastAPI): lookups for operators and other systems, health endpoints."""
