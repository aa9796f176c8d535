"""`rdbroker-agent` / `python -m rdbroker_agent`: the load agent on a terminal server.

    RDBROKER_AGENT_TOKEN=... rdbroker-agent --config agent.toml
    rdbroker-agent wake-on-lan aa:bb:cc:dd:ee:ff [--broadcast 10.0.0.255]   (docs/power.md)

Flags win over `RDBROKER_AGENT_CONFIG`, `RDBROKER_AGENT_LISTEN`, `RDBROKER_AGENT_LOAD_CACHE_S`,
`RDBROKER_AGENT_MAX_CONNECTIONS`, `RDBROKER_AGENT_ALLOW_UNAUTHENTICATED`, `RDBROKER_LOG_LEVEL` and
`RDBROKER_LOG_FORMAT`. The token comes from `RDBROKER_AGENT_TOKEN` or the config's `token_file`, never
from a flag (a command line shows in `ps`). Runs until SIGTERM or SIGINT; logs the address it bound
(port 0 picks one).
"""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import SettingsConfigDict

from rdbroker_common import lifecycle, logs
from rdbroker_common.flags import settings_errors
from rdbroker_common.settings import ServiceSettings, join_host_port, split_host_port

from . import wake
from .auth import ALLOW_FLAG, AgentAuth, ListenRefused, default_listen, is_loopback
from .config import load_config
from .errors import ConfigError
from .server import AgentServer
from .sources import SystemSources

log = logging.getLogger("rdbroker_agent")


class AgentSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RDBROKER_", frozen=True, extra="ignore")

    agent_config: str = "agent.toml"
    # Empty: 0.0.0.0:8088 when requests are authenticated (a token or client certificates), else
    # 127.0.0.1:8088 (auth.default_listen).
    agent_listen: str = ""
    agent_token: SecretStr = SecretStr("")  # RDBROKER_AGENT_TOKEN; env only
    # Serve without authentication on a non-loopback address (a network only the health replicas reach).
    agent_allow_unauthenticated: bool = False
    # GET /load answers younger than this are reused; concurrent requests share one computation.
    agent_load_cache_s: float = Field(default=1.0, ge=0.0, le=60.0)
    # Connections served at once; more are closed at once (pollers need a handful).
    agent_max_connections: int = Field(default=64, ge=1, le=10_000)

    @field_validator("agent_listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if value.strip():
            split_host_port(value)
        return value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rdbroker-agent",
        description="Serve this terminal server's load (GET /load) and sessions (GET /sessions). "
        "`rdbroker-agent wake-on-lan MAC` sends a Wake-on-LAN magic packet instead.",
    )
    parser.add_argument(
        "--config", dest="agent_config", help="TOML config (env RDBROKER_AGENT_CONFIG; agent.toml)"
    )
    parser.add_argument(
        "--listen",
        dest="agent_listen",
        help="HOST:PORT (env RDBROKER_AGENT_LISTEN; 0.0.0.0:8088 with a token or tls_ca, "
        "else 127.0.0.1:8088)",
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
        help="connections served at once, a request on more gets 503 "
        "(env RDBROKER_AGENT_MAX_CONNECTIONS; 64)",
    )
    parser.add_argument(
        ALLOW_FLAG,
        dest="agent_allow_unauthenticated",
        action="store_const",
        const=True,
        help="serve without a token or client certificates on a non-loopback address "
        "(env RDBROKER_AGENT_ALLOW_UNAUTHENTICATED)",
    )
    parser.add_argument("--log-level", dest="log_level", help="env RDBROKER_LOG_LEVEL; INFO")
    parser.add_argument(
        "--log-format", dest="log_format", help="json or text (env RDBROKER_LOG_FORMAT; json)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wake-on-lan"]:
        return wake.main(argv[1:])
    args = build_parser().parse_args(argv)
    overrides = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = AgentSettings(**overrides)
    except ValidationError as exc:
        sys.stderr.write(f"rdbroker-agent: invalid settings:\n{settings_errors(exc)}\n")
        return 2
    logs.configure(settings.log_level, settings.log_format)
    # uvicorn's own lines (a 400 or 503 it answers) would let anyone on the network fill the log.
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
    try:
        config = load_config(settings.agent_config)
        auth = AgentAuth.from_config(config, settings.agent_token.get_secret_value())
    except ConfigError as exc:
        log.error("invalid config: %s", exc)
        return 2
    listen = settings.agent_listen or default_listen(auth)
    host, port = split_host_port(listen)
    try:
        server = AgentServer(
            config,
            SystemSources(),
            host,
            port,
            load_cache_s=settings.agent_load_cache_s,
            max_connections=settings.agent_max_connections,
            auth=auth,
            allow_unauthenticated=settings.agent_allow_unauthenticated,
        )
    except ListenRefused as exc:
        log.error("%s", exc)
        return 2
    except ConfigError as exc:
        log.error("invalid config: %s", exc)
        return 2
    try:
        lifecycle.run(lambda: _serve(server))
    except KeyboardInterrupt:  # Ctrl+C where the loop cannot take signal handlers (Windows)
        log.info("agent stopped")
    except OSError as exc:
        log.error("cannot listen on %s: %s", listen, exc)
        return 1
    return 0


async def _serve(server: AgentServer) -> None:
    stop = lifecycle.stop_event_on_signals()
    async with server:
        log.info(
            "agent listening on %s (%s), requests need %s",
            join_host_port(server.host, server.port),
            server.scheme,
            server.auth.describe(),
            extra={"port": server.port},
        )
        if not server.auth.required and not is_loopback(server.host):
            log.warning("anyone reaching %s may read this server's sessions (%s)", server.host, ALLOW_FLAG)
        await stop.wait()
    log.info("agent stopped")


if __name__ == "__main__":
    raise SystemExit(main())
