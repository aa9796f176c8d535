"""The services as `up` runs them in one process: their settings and their in-process serve functions.

This is the only module of the CLI that knows the services' internals; `up.py` composes what is here
(and imports it: nothing here imports `up`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import SecretStr
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from rdbroker_broker.config import BrokerSettings
from rdbroker_common.redact import redact as redact_text
from rdbroker_health.config import HealthSettings
from rdbroker_proxy.config import ProxySettings
from rdbroker_rdp.fakeserver import FakeRdpServer

if TYPE_CHECKING:
    from rdbroker_cli.inprocess import HealthBroker, LocalBroker, ProxyBroker

log = logging.getLogger(__name__)

# Nothing probes the proxy's and health replica's own grpc.health.v1 ports inside `up`: any free port.
ANY_LOOPBACK_PORT = "127.0.0.1:0"


@dataclass(frozen=True)
class UpConfig:
    """What the command line asked for. None means: the service's own setting (flag > env > default)."""

    listen: str | None = None
    http_listen: str | None = None
    grpc_listen: str | None = None
    database_url: str | None = None
    servers: tuple[str, ...] = ()
    farm_file: Path | None = None
    log_level: str | None = None
    log_format: str = "text"
    replace_farm: bool = False  # remove servers the database holds that the farm does not name
    # The proxy and the health replica call the broker in-process; False: over its gRPC port as separate
    # processes would (no flag: benchmarks and tests compare the two).
    in_process: bool = True


class ComponentError(Exception):
    """A service could not start for a reason the operator can fix; the message is one line."""


@dataclass
class BrokerPorts:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    grpc_port: int = 0
    http_port: int = 0


@dataclass
class ProxyPorts:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0


def _given(**values: Any) -> dict[str, Any]:
    """Only what the command line set: the rest comes from RDBROKER_* or the settings' defaults."""
    return {name: value for name, value in values.items() if value is not None}


def broker_settings(config: UpConfig) -> BrokerSettings:
    """The broker's settings, each gRPC role token it lacks made up for this run (`grpc_tokens`)."""
    overrides = _given(
        database_url=config.database_url,
        grpc_listen=config.grpc_listen,
        http_listen=config.http_listen,
        log_level=config.log_level,
    )
    # One process owns its database here: upgrading the schema at start is what a newcomer expects.
    settings = BrokerSettings(migrate=True, log_format=config.log_format, **overrides)
    return settings.model_copy(update=grpc_tokens(settings))


def grpc_tokens(settings: BrokerSettings) -> dict[str, SecretStr]:
    """A random token for each role the environment gave none: the proxy and the health replica get
    their own, in process, so no other user of the host can call the broker's gRPC port, even on
    loopback (and the admin token, unknown outside this process, keeps admin RPCs to the REST API)."""
    tokens = {
        "grpc_proxy_token": settings.grpc_proxy_token,
        "grpc_health_token": settings.grpc_health_token,
        "grpc_admin_token": settings.grpc_admin_token,
    }
    return {
        name: SecretStr(secrets.token_urlsafe(32))
        for name, token in tokens.items()
        if not token.get_secret_value()
    }


def _first(tokens: SecretStr) -> SecretStr:
    """The token a client sends: the first of a rotation's `new,old` list."""
    return SecretStr(next((t.strip() for t in tokens.get_secret_value().split(",") if t.strip()), ""))


def proxy_settings(config: UpConfig, broker: BrokerSettings) -> ProxySettings:
    overrides = _given(listen=config.listen, log_level=config.log_level)
    return ProxySettings(
        broker=broker.grpc_listen,
        broker_token=_first(broker.grpc_proxy_token),
        broker_token_file="",
        grpc_listen=ANY_LOOPBACK_PORT,
        log_format=config.log_format,
        **overrides,
    )


LOG_HASH_KEY_SUFFIX = ".loghash-key"


def log_hash_key_beside(proxy: ProxySettings, broker: BrokerSettings) -> ProxySettings:
    """On an SQLite file, the proxy's log hash key is kept beside the database (made at the first start,
    readable by its owner only), so one user's hashes match across restarts with nothing to set up. A key
    the environment or a key file gives wins; on PostgreSQL nothing changes (the proxy's warning at start
    says what to set). Call it once the database exists: its directory is then known to be writable."""
    if proxy.log_identity != "hash" or proxy.log_hash_key.get_secret_value() or proxy.log_hash_key_file:
        return proxy
    url = make_url(broker.database_url_text)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return proxy
    path = Path(f"{url.database}{LOG_HASH_KEY_SUFFIX}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass  # kept from an earlier start
    except OSError as exc:
        log.warning("cannot keep a log hash key beside the database (%s): a random one per start", exc)
        return proxy
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    return proxy.model_copy(update={"log_hash_key_file": str(path)})


def health_settings(config: UpConfig, broker: BrokerSettings) -> HealthSettings:
    overrides = _given(log_level=config.log_level)
    return HealthSettings(
        broker=broker.grpc_listen,
        broker_token=_first(broker.grpc_health_token),
        broker_token_file="",
        # Its ProbeServer is an admin call, as the broker's admin RPCs are.
        grpc_admin_token=broker.grpc_admin_token,
        grpc_listen=ANY_LOOPBACK_PORT,
        log_format=config.log_format,
        **overrides,
    )


def first_line(exc: BaseException) -> str:
    """The driver's own message, first line only (SQLAlchemy adds its background links below), any
    password it quotes hidden."""
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return redact_text(lines[0]) if lines else type(cause).__name__


def redact(url: str) -> str:
    """A database URL fit to print: the password hidden (every form: `rdbroker_common.redact`)."""
    return redact_text(url)


async def apply_farm(
    settings: BrokerSettings, farm: dict[str, Any], source: str, *, replace: bool = False
) -> list[str]:
    """Upgrade the schema, then make the database hold exactly this farm: the command line is the farm,
    so servers left out are removed and their leftover sessions ended. Answers any refusals, one line each.

    Unless `replace`, a database already holding servers the farm does not name is refused untouched: a
    database shared with a real deployment must not lose its servers to a typo'd `--database-url`."""
    from rdbroker_broker.db import migrate
    from rdbroker_broker.db.engine import make_engine
    from rdbroker_broker.errors import BrokerError
    from rdbroker_broker.farm import FarmError, load_farm
    from rdbroker_broker.farm import apply_farm as apply

    try:
        parsed = load_farm(
            yaml.safe_dump(farm, sort_keys=False),
            source,
            default_probe_interval_ms=settings.probe_interval_ms,
        )
    except FarmError as exc:
        raise ComponentError(str(exc)) from exc
    engine = make_engine(settings.database_url_text)
    try:
        await migrate.upgrade(engine)
        if not replace:
            preview = await apply(engine, parsed, dry_run=True, prune=True, force=True)
            unnamed = [line.split()[-1] for line in preview.changes if line.startswith("delete server ")]
            if unnamed:
                shown = ", ".join(unnamed[:5]) + (f" and {len(unnamed) - 5} more" if len(unnamed) > 5 else "")
                named_by = "the command line" if source == "--server" else source
                where = redact(settings.database_url_text)
                raise ComponentError(
                    f"the database {where} holds servers {named_by} does not name ({shown}): "
                    "add --replace-farm to remove them (ending their sessions), or name them too"
                )
        plan = await apply(engine, parsed, dry_run=False, prune=True, force=True)
    except (BrokerError, FarmError) as exc:
        raise ComponentError(f"cannot apply the farm: {exc}") from exc
    except (OSError, SQLAlchemyError) as exc:  # the database is unreachable or refuses us
        where = redact(settings.database_url_text)
        raise ComponentError(f"cannot reach the database {where}: {first_line(exc)}") from exc
    finally:
        await engine.dispose()
    for line in plan.changes:
        log.info("farm: %s", line)
    return list(plan.refusals)


async def run_broker(
    settings: BrokerSettings, stop: asyncio.Event, ports: BrokerPorts, local: LocalBroker | None = None
) -> None:
    """Serve the broker; `local` gets its servicer for the in-process clients while it serves."""
    from rdbroker_broker.app import StartupError, serve
    from rdbroker_broker.errors import BrokerError

    bound: dict[str, int] = {}
    started = asyncio.Event()

    async def report_ready() -> None:
        await started.wait()
        ports.grpc_port, ports.http_port = bound["grpc"], bound["http"]
        ports.ready.set()

    try:
        async with asyncio.TaskGroup() as tg:
            waiter = tg.create_task(report_ready())
            try:
                await serve(
                    settings,
                    ready=started,
                    stop=stop,
                    bound=bound,
                    local=None if local is None else lambda servicer: setattr(local, "servicer", servicer),
                )
            finally:
                if local is not None:
                    local.servicer = None  # its engine is disposed: later calls fail as unreachable
            waiter.cancel()
    except* (StartupError, BrokerError) as group:
        raise ComponentError(f"the broker cannot start: {group.exceptions[0]}") from group


async def run_proxy(
    settings: ProxySettings, stop: asyncio.Event, ports: ProxyPorts, local: LocalBroker | None = None
) -> None:
    """Serve the proxy; with `local` it calls the broker in-process, else over gRPC (`settings.broker`)."""
    from rdbroker_cli.inprocess import ProxyBroker
    from rdbroker_proxy.server import ProxyServer

    def in_process() -> ProxyBroker:
        assert local is not None
        return ProxyBroker(
            local,
            settings.proxy_id,
            route_timeout_s=settings.route_timeout_s,
            route_attempt_timeout_s=settings.route_attempt_timeout_s,
            report_timeout_s=settings.report_timeout_s,
            report_buffer=settings.report_buffer,
            heartbeat_interval_s=settings.heartbeat_interval_s,
        )

    server = ProxyServer(settings, broker=None if local is None else in_process)

    async def report_ready() -> None:
        await server.ready.wait()
        ports.port = server.port
        ports.ready.set()

    try:
        async with asyncio.TaskGroup() as tg:
            waiter = tg.create_task(report_ready())
            await server.serve(stop)
            waiter.cancel()
    except* OSError as group:  # the RDP port is taken or not ours to bind
        raise ComponentError(
            f"the proxy cannot listen on {settings.listen}: {group.exceptions[0]}"
        ) from group


async def run_health(settings: HealthSettings, stop: asyncio.Event, local: LocalBroker | None = None) -> None:
    """Run the health replica; with `local` it calls the broker in-process, else over gRPC."""
    from rdbroker_cli.inprocess import HealthBroker
    from rdbroker_health import app
    from rdbroker_health.errors import ConfigError

    def in_process() -> HealthBroker:
        assert local is not None
        return HealthBroker(local, settings.rpc_timeout_s)

    try:
        await app.run(settings, stop, broker=None if local is None else in_process)
    except ConfigError as exc:
        raise ComponentError(f"the health replica cannot start: {exc}") from exc


@asynccontextmanager
async def fake_server() -> AsyncIterator[str]:
    """A fake RDP server (echo mode) on a free loopback port; yields its address."""
    async with FakeRdpServer("127.0.0.1", 0, mode="echo") as server:
        yield server.address
