"""The REST API's routes, one module per resource (docs/api.md)."""
