"""`rdbroker up` and `rdbroker demo`: broker, proxy and health in one process, for a small farm or a try.

`up` runs the three services on one event loop (the embedded SQLite file by default, or any database URL),
with the servers of `--server` (repeatable) or of a farm file (`-f`). `demo` does the same with a few fake
RDP servers on loopback and a throwaway database, so routing can be watched without a farm.

Start-up order: the farm is applied to the database (schema upgraded first), the broker starts, and once it
listens the proxy and the health replica start. They call the broker's use cases in-process
(`inprocess.py`: no gRPC, no serialization); its gRPC port stays for operators' tools. SIGTERM or Ctrl-C
stops them all gracefully (each with its own shutdown order), the broker last so their final reports
reach it; one that fails stops the others the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from rdbroker_cli import components
from rdbroker_cli import farm as farms
from rdbroker_cli.admin import Parser
from rdbroker_cli.components import UpConfig
from rdbroker_common import lifecycle, logs, telemetry
from rdbroker_common.redact import redact
from rdbroker_common.settings import join_host_port, split_host_port

log = logging.getLogger("rdbroker_cli.up")

DEMO_SERVERS = 3


class UpError(Exception):
    """`up` cannot start or a service failed; the message is one line for the operator."""


@dataclass
class Listening:
    """Where everything ended up listening (ports resolved when 0 was asked)."""

    rdp: str = ""
    http: str = ""
    grpc: str = ""
    database: str = ""
    farm: str = ""
    fake_servers: list[str] = field(default_factory=list)


def build_parser(demo: bool) -> argparse.ArgumentParser:
    if demo:
        parser = Parser(
            prog="rdbroker demo",
            description="`rdbroker up` with fake RDP servers on loopback and a throwaway database.",
        )
    else:
        parser = Parser(
            prog="rdbroker up",
            description="Run proxy, broker and health in one process (embedded SQLite by default).",
        )
    listen_default = "127.0.0.1:3389" if demo else "0.0.0.0:3389"
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help=f"RDP clients (env RDBROKER_LISTEN; {listen_default})"
    )
    parser.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        help="REST API, dashboard (env RDBROKER_HTTP_LISTEN; 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--grpc-listen", metavar="HOST:PORT", help="broker gRPC (env RDBROKER_GRPC_LISTEN; 127.0.0.1:50051)"
    )
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="postgresql://... or sqlite:///FILE (env RDBROKER_DATABASE_URL; sqlite:///rdbroker.db"
        + ("; demo: a temporary file)" if demo else ")"),
    )
    parser.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    if demo:
        parser.add_argument(
            "--fake-servers", type=int, default=DEMO_SERVERS, help="how many (1..20, default %(default)s)"
        )
    else:
        farm = parser.add_mutually_exclusive_group(required=True)
        farm.add_argument(
            "--server",
            action="append",
            metavar="HOST:PORT",
            help="a terminal server, repeatable (one default pool)",
        )
        farm.add_argument("-f", "--farm", type=Path, metavar="FARM.YAML", help="a farm file (pools, servers)")
        parser.add_argument(
            "--replace-farm",
            action="store_true",
            help="the database may hold other servers: remove them and end their sessions",
        )
    return parser


def config_from(args: argparse.Namespace) -> UpConfig:
    for name in ("listen", "http_listen", "grpc_listen"):
        value = getattr(args, name)
        if value is not None:
            try:
                split_host_port(value)
            except ValueError as exc:
                raise UpError(f"bad --{name.replace('_', '-')}: {exc}") from exc
    return UpConfig(
        listen=args.listen,
        http_listen=args.http_listen,
        grpc_listen=args.grpc_listen,
        database_url=args.database_url,
        servers=tuple(getattr(args, "server", None) or ()),
        farm_file=getattr(args, "farm", None),
        log_level=args.log_level,
        log_format=args.log_format,
        replace_farm=bool(getattr(args, "replace_farm", False)),
    )


def _local(address: str) -> str:
    """An address a local client can dial: a wildcard listen address becomes loopback."""
    host, port = split_host_port(address)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return join_host_port(host, port)


async def _guard(name: str, work: Awaitable[None], stop: asyncio.Event, failures: list[str]) -> None:
    """Run one service; if it fails or ends on its own, stop the others gracefully (not by cancelling)."""
    try:
        await work
    except Exception as exc:
        log.error("%s failed: %s", name, exc, exc_info=not isinstance(exc, components.ComponentError))
        failures.append(f"{name}: {exc}")
    else:
        if not stop.is_set():
            failures.append(f"{name} stopped on its own")
    finally:
        stop.set()


async def _first(event: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait until `event` or `stop` is set; True when `event` was."""
    async with asyncio.TaskGroup() as tg:
        waiters = [tg.create_task(event.wait()), tg.create_task(stop.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
    return event.is_set()


def _bound(listen: str, port: int) -> str:
    return join_host_port(split_host_port(listen)[0], port)


async def serve(
    config: UpConfig,
    farm: dict[str, Any],
    stop: asyncio.Event,
    on_ready: Callable[[Listening], None],
    source: str = "--server",
) -> None:
    """Apply `farm`, then run broker, proxy and health until `stop` is set. Raises UpError."""
    try:  # every setting is checked before anything starts
        broker_settings = components.broker_settings(config)
        proxy_settings = components.proxy_settings(config, broker_settings)
        health_settings = components.health_settings(config, broker_settings)
    except ValidationError as exc:
        raise UpError(f"invalid settings: {_first_error(exc)}") from exc
    where = Listening(database=components.redact(broker_settings.database_url_text), farm=farms.summary(farm))
    try:
        refusals = await components.apply_farm(broker_settings, farm, source, replace=config.replace_farm)
    except components.ComponentError as exc:
        raise UpError(str(exc)) from exc
    for line in refusals:
        log.warning("farm: kept %s", line)
    proxy_settings = components.log_hash_key_beside(proxy_settings, broker_settings)

    failures: list[str] = []
    broker, proxy = components.BrokerPorts(), components.ProxyPorts()
    local = None
    if config.in_process:
        from rdbroker_cli.inprocess import LocalBroker

        local = LocalBroker()
    # The broker stops after the proxy and the health replica: their last reports still reach it.
    broker_stop = asyncio.Event()
    clients: list[asyncio.Task[None]] = []
    async with asyncio.TaskGroup() as tg:

        def start(name: str, work: Awaitable[None]) -> asyncio.Task[None]:
            return tg.create_task(_guard(name, work, stop, failures), name=f"up-{name}")

        async def stop_broker_last() -> None:
            await stop.wait()
            await asyncio.gather(*clients)  # _guard never raises
            broker_stop.set()

        tg.create_task(stop_broker_last(), name="up-broker-stop")
        start("broker", components.run_broker(broker_settings, broker_stop, broker, local))
        if await _first(broker.ready, stop):
            # The proxy and the health replica dial the port the broker actually bound (unless in-process).
            where.grpc = _local(_bound(broker_settings.grpc_listen, broker.grpc_port))
            where.http = _local(_bound(broker_settings.http_listen, broker.http_port))
            clients.append(
                start(
                    "proxy",
                    components.run_proxy(
                        proxy_settings.model_copy(update={"broker": where.grpc}), stop, proxy, local
                    ),
                )
            )
            clients.append(
                start(
                    "health",
                    components.run_health(
                        health_settings.model_copy(update={"broker": where.grpc}), stop, local
                    ),
                )
            )
            if await _first(proxy.ready, stop):
                where.rdp = _bound(proxy_settings.listen, proxy.port)
                on_ready(where)
    if failures:
        raise UpError("; ".join(failures))


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error.get("loc", ()))
    return f"{where}: {message}" if where else message


def banner(where: Listening, out: TextIO, *, demo: bool = False) -> None:
    lines = [
        "rdbroker is up" + (" (demo)" if demo else ""),
        f"  RDP clients connect to  {where.rdp}",
        f"  REST API                http://{where.http}/v1   (OpenAPI: http://{where.http}/docs)",
        f"  dashboard               http://{where.http}/",
        f"  broker gRPC             {where.grpc}",
        f"  database                {where.database}",
        f"  farm                    {where.farm}",
    ]
    if where.fake_servers:
        lines.append(f"  fake RDP servers        {', '.join(where.fake_servers)}")
    if demo:
        proxy = _local(where.rdp)
        lines += [
            "Watch routing: connect twice as the same user, then look the user up:",
            f"  rdbroker demo-connect alice --to {proxy} --url http://{where.http}",
            f"  rdbroker demo-connect alice --to {proxy} --url http://{where.http}",
            f"  rdbroker sessions lookup alice --url http://{where.http}",
        ]
    lines.append("Stop with Ctrl-C.")
    out.write("\n".join(lines) + "\n")
    out.flush()


def _start_logging(config: UpConfig) -> telemetry.Telemetry:
    logs.configure(config.log_level or os.environ.get("RDBROKER_LOG_LEVEL", "INFO"), config.log_format)
    return telemetry.setup("rdbroker-up")


def _run(main: Callable[[], Awaitable[None]]) -> int:
    """Run on the event loop; one line on stderr and exit 1 if it fails."""
    try:
        lifecycle.run(main)  # type: ignore[arg-type]  # any awaitable-returning callable will do
    except UpError as exc:
        sys.stderr.write(f"rdbroker: {redact(str(exc))}\n")
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130
    return 0


def up_main(argv: Sequence[str]) -> int:
    try:
        args = build_parser(demo=False).parse_args(list(argv))
        config = config_from(args)
        farm = farms.load(config.farm_file) if config.farm_file else farms.from_servers(list(config.servers))
    except SystemExit as exc:
        return int(exc.code or 0)
    except (UpError, farms.FarmError) as exc:
        sys.stderr.write(f"rdbroker up: {exc}\n")
        return 2
    handle = _start_logging(config)

    async def main() -> None:
        stop = lifecycle.stop_event_on_signals()
        source = str(config.farm_file) if config.farm_file else "--server"
        await serve(config, farm, stop, lambda where: banner(where, sys.stdout), source)

    try:
        return _run(main)
    finally:
        handle.shutdown()


def demo_main(argv: Sequence[str]) -> int:
    try:
        args = build_parser(demo=True).parse_args(list(argv))
        config = config_from(args)
        if not 1 <= args.fake_servers <= 20:
            raise UpError("--fake-servers must be 1..20")
    except SystemExit as exc:
        return int(exc.code or 0)
    except UpError as exc:
        sys.stderr.write(f"rdbroker demo: {exc}\n")
        return 2
    if config.listen is None:
        config = replace(config, listen=os.environ.get("RDBROKER_LISTEN", "127.0.0.1:3389"))
    handle = _start_logging(config)
    with tempfile.TemporaryDirectory(prefix="rdbroker-demo-") as scratch:
        if config.database_url is None:
            config = replace(config, database_url=f"sqlite:///{Path(scratch) / 'demo.db'}")

        async def main() -> None:
            stop = lifecycle.stop_event_on_signals()
            await run_demo(
                config, args.fake_servers, stop, lambda where: banner(where, sys.stdout, demo=True)
            )

        try:
            return _run(main)
        finally:
            handle.shutdown()


async def run_demo(
    config: UpConfig, count: int, stop: asyncio.Event, on_ready: Callable[[Listening], None]
) -> None:
    """`serve` with `count` fake RDP servers (echo mode) on 127.0.0.1, stopped after everything else."""
    async with contextlib.AsyncExitStack() as stack:
        addresses = [await stack.enter_async_context(components.fake_server()) for _ in range(count)]

        def ready(where: Listening) -> None:
            where.fake_servers = addresses
            on_ready(where)

        # The demo's farm is its own fake servers (new ports each run): it always replaces the farm.
        await serve(replace(config, replace_farm=True), farms.from_servers(addresses), stop, ready, "demo")
