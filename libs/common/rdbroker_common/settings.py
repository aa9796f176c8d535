"""Settings shared by every service. Each service builds its own settings class once, in `__main__`."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Fields every service has. Read from flags and `RDBROKER_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="RDBROKER_", frozen=True, extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    shutdown_grace_s: float = Field(default=10.0, ge=0, le=3600)
    otlp_endpoint: str = ""


def split_host_port(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Parse `host:port`, `[v6]:port` or (with a default port) a bare host. Raises ValueError."""
    text = value.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"unterminated IPv6 address: {value!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address: {value!r}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"missing host in {value!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"missing port in {value!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; any other name may resolve anywhere, so it is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


DNS_SCHEME = "dns:///"
# gRPC channel option for a `dns:///` target: spread calls over every address the name resolves to
# (a Kubernetes headless Service answers one per broker pod), re-resolving as pods come and go.
ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")
# gRPC re-resolves a `dns:///` name when a connection closes (a broker pod gone, or its max-age GOAWAY),
# but by default at most once every 30 s: a rolling update could leave a client on vanished addresses
# that long. One second bounds it and keeps DNS traffic low (only connection events ask).
DNS_MIN_RESOLUTION_INTERVAL = ("grpc.dns_min_time_between_resolutions_ms", 1000)
# A failed resolution (no broker ready, so no address) is retried with a backoff that grows to 120 s,
# which no channel option shortens: a `dns:///` channel failing this long is replaced (`Renewal`).
DNS_RENEW_AFTER_S = 5.0


def broker_targets(value: str) -> list[str]:
    """`--broker`: one `dns:///host:port` target (passed to gRPC as is, balanced round-robin) or a
    comma-separated `host:port` list (tried in order with failover). Raises ValueError."""
    text = value.strip()
    if text.startswith(DNS_SCHEME):
        split_host_port(text[len(DNS_SCHEME) :])
        if "," in text:
            raise ValueError(f"a dns:/// target names one host: {value!r}")
        return [text]
    if "://" in text or text.startswith("dns:"):
        raise ValueError(f"only dns:///host:port or host:port addresses are accepted, not {value!r}")
    targets = [part.strip() for part in text.split(",") if part.strip()]
    if not targets:
        raise ValueError("at least one broker address is needed")
    for target in targets:
        split_host_port(target)
    return targets


def channel_options(target: str) -> list[tuple[str, str | int]]:
    """Options a channel to `target` needs beyond the caller's own: round-robin and prompt
    re-resolution for `dns:///`."""
    return [ROUND_ROBIN, DNS_MIN_RESOLUTION_INTERVAL] if target.startswith(DNS_SCHEME) else []


class Renewal:
    """When to replace a `dns:///` channel that has been failing for `after_s`: a new channel resolves
    the name at once, where the old one waits out its resolver's backoff (up to 120 s after a long
    outage). Addresses other than `dns:///` are never replaced (their reconnect backoff is short)."""

    def __init__(
        self, after_s: float = DNS_RENEW_AFTER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.after_s = after_s
        self._clock = clock
        self._failing_since: dict[int, float] = {}

    def due(self, index: int, target: str, failing: bool) -> bool:
        """Whether channel `index` (to `target`, now `failing` or not) should be replaced now."""
        if not failing or not target.startswith(DNS_SCHEME):
            self._failing_since.pop(index, None)
            return False
        now = self._clock()
        since = self._failing_since.setdefault(index, now)
        if now - since < self.after_s:
            return False
        self._failing_since[index] = now  # the new channel gets its own `after_s`
        return True
