"""The `rdbroker` command: starts a service, composes them (`up`, `demo`), or runs admin verbs."""
