"""`rdbroker-agent` / `python -m rdbroker_agent`: the load agent on a terminal server.

    rdbroker-agent --config agent.toml --listen 0.0.0.0:8088

Flags win over `RDBROKER_AGENT_CONFIG`, `RDBROKER_AGENT_LISTEN`, `RDBROKER_LOG_LEVEL` and
`RDBROKER_LOG_FORMAT`. Runs until SIGTERM or SIGINT; logs the address it bound (port 0 picks one).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError, field_validator
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
        lifecycle.run(lambda: _serve(config, host, port))
    except KeyboardInterrupt:  # Ctrl+C where the loop cannot take signal handlers (Windows)
        log.info("agent stopped")
    except OSError as exc:
        log.error("cannot listen on %s: %s", settings.agent_listen, exc)
        return 1
    return 0


async def _serve(config: AgentConfig, host: str, port: int) -> None:
    stop = lifecycle.stop_event_on_signals()
    async with AgentServer(config, SystemSources(), host, port) as server:
        log.info("agent listening on %s", join_host_port(host, server.port), extra={"port": server.port})
        await stop.wait()
    log.info("agent stopped")


if __name__ == "__main__":
    raise SystemExit(main())
