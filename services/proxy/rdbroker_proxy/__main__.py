"""`rdbroker proxy ...` / `python -m rdbroker_proxy ...`: run one RDP proxy replica."""

from __future__ import annotations

import logging
import resource
import sys

from pydantic import ValidationError

from rdbroker_common import lifecycle, logs, telemetry
from rdbroker_common.flags import settings_errors
from rdbroker_proxy.config import ProxySettings, parse_args
from rdbroker_proxy.server import ProxyServer

log = logging.getLogger("rdbroker_proxy")


def raise_fd_limit(settings: ProxySettings) -> None:
    """Each connection holds two sockets: ask for enough descriptors, up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2 * settings.max_connections + 256
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 2 * settings.max_connections:
        log.warning("file descriptor limit %d is below 2 x max_connections", soft)


async def run(settings: ProxySettings) -> None:
    stop = lifecycle.stop_event_on_signals()
    await ProxyServer(settings).serve(stop)


def main(argv: list[str]) -> int:
    try:
        settings = parse_args(argv)
    except ValidationError as exc:
        sys.stderr.write(f"rdbroker proxy: invalid settings:\n{settings_errors(exc)}\n")
        return 2
    logs.configure(settings.log_level, settings.log_format)
    # Fields our formatters never print, looked up for every record (one line per connection).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    raise_fd_limit(settings)
    try:
        handle = telemetry.setup(
            "rdbroker-proxy", otlp_endpoint=settings.otlp_endpoint, metrics_listen=settings.metrics_listen
        )
    except OSError as exc:
        log.error("the proxy cannot serve metrics on %s: %s", settings.metrics_listen, exc)
        return 1
    try:
        lifecycle.run(lambda: run(settings))
    except (OSError, ValueError) as exc:  # a port in use or not ours to bind, a bad TLS setting
        log.error("the proxy cannot start: %s", exc)
        return 1
    finally:
        handle.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
