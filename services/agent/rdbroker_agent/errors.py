"""The agent's errors.

AgentError
 ├── ConfigError    the TOML config is unreadable or invalid: the agent does not start
 └── SourceError    a counter or the session source failed (command error, timeout, bad output)
"""

from __future__ import annotations


class AgentError(Exception):
    pass


class ConfigError(AgentError):
    pass


class SourceError(AgentError):
    pass
