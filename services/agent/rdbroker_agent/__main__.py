"""`rdbroker-agent` / `python -m rdbroker_agent`: the load agent on a terminal server.

    rdbroker-agent --config agent.toml --listen 0.0.0.0:8088

Flags win over `RDBROKER_AGENT_CONFIG`, `RDBROKER_AGENT_LISTEN`, `RDBROKER_AGENT_LOAD_CACHE_S`,
`RDBROKER_AGENT_MAX_CONNECTIONS`, `RDBROKER_LOG_LEVEL` and `RDBROKER_LOG_FORMAT`. Runs until SIGTERM or
SIGINT; logs the address it bound (port 0 picks one).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from rdbroker_common import lifecycle, logs
from rdbroker_common.settings import ServiceSettings, join_host_port, split_host_port

from .config import AgentConfig, load_config
from .errors import ConfigError
from .server import AgentServer
from .sources import SystemSources

log = logging.getLogger("rdbroker_agent")


class AgentSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RDBROKER_", frozen=True, extra="ignore")

    agent_config: str = "agent.toml"
    agent_listen: str = "0.0.0.0:8088"
    # GET /load answers younger than this are reused; concurrent requests share one computation.
    agent_load_cache_s: float = Field(default=1.0, ge=0.0, le=60.0)
    # Connections served at once; more are closed at once (pollers need a handful).
    agent_max_connections: int = Field(default=64, ge=1, le=10_000)

    @field_validator("agent_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_host_port(value)
        return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdbroker-agent",
        description="Serve this terminal server's load (GET /load) and sessions (GET /sessions).",
    )
    parser.add_argument(
        "--config", dest="agent_config", help="TOML config (env RDBROKER_AGENT_CONFIG; agent.toml)"
    )
    parser.add_argument(
        "--listen", dest="agent_listen", help="HOST:PORT (env RDBROKER_AGENT_LISTEN; 0.0.0.0:8088)"
    )
    parser.add_argument(
        "--load-cache-s",
        dest="agent_load_cache_s",
        type=float,
        help="reuse a /load answer this many seconds (env RDBROKER_AGENT_LOAD_CACHE_S; 1)",
    )
    parser.add_argument(
        "--max-connections",
        dest="agent_max_connections",
        type=int,
        help="connections served at once, more are closed (env RDBROKER_AGENT_MAX_CONNECTIONS; 64)",
    )
    parser.add_argument("--log-level", dest="log_level", help="env RDBROKER_LOG_LEVEL; INFO")
    parser.add_argument(
        "--log-format", dest="log_format", help="json or text (env RDBROKER_LOG_FORMAT; json)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = AgentSettings(**overrides)
    except ValidationError as exc:
        sys.stderr.write(f"rdbroker-agent: invalid settings:\n{exc}\n")
        return 2
    logs.configure(settings.log_level, settings.log_format)
    try:
        config = load_config(settings.agent_config)
    except ConfigError as exc:
        log.error("invalid config: %s", exc)
        return 2
    host, port = split_host_port(settings.agent_listen)
    try:
        lifecycle.run(lambda: _serve(config, settings, host, port))
    except KeyboardInterrupt:  # Ctrl+C where the loop cannot take signal handlers (Windows)
        log.info("agent stopped")
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.agent_listen, exc)
        return 1
    return 0


async def _serve(config: AgentConfig, settings: AgentSettings, host: str, port: int) -> None:
    stop = lifecycle.stop_event_on_signals()
    server = AgentServer(
        config,
        SystemSources(),
        host,
        port,
        load_cache_s=settings.agent_load_cache_s,
        max_connections=settings.agent_max_connections,
    )
    async with server:
        log.info("agent listening on %s", join_host_port(host, server.port), extra={"port": server.port})
        await stop.wait()
    log.info("agent stopped")


if __name__ == "__main__":
    raise SystemExit(main())
