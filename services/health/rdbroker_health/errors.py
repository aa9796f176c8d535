"""Errors of the health service.

    HealthError
    ├── ConfigError            bad settings, flags or TLS files (exit 2)
    └── BrokerError            a broker call failed
        ├── BrokerUnavailable  no broker address answered (UNAVAILABLE / DEADLINE_EXCEEDED on each)
        └── BrokerRefused      a broker answered with another error status

Probes never raise: they answer a failed result with the reason (`probes.rdp.ProbeResult`,
`probes.http.AgentResult`).
"""

from __future__ import annotations


class HealthError(Exception):
    """Base of every error the health service raises on purpose."""


class ConfigError(HealthError):
    """A setting, flag or TLS file is invalid."""


class BrokerError(HealthError):
    """A broker call failed; `__cause__` holds the gRPC error."""


class BrokerUnavailable(BrokerError):
    """Every broker address failed for one call."""


class BrokerRefused(BrokerError):
    """A broker answered the call with an error other than unavailability."""
