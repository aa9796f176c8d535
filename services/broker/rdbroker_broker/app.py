"""The broker process: gRPC (grpc.aio) and REST (uvicorn) in one event loop, one shutdown order.

SIGTERM (or `stop`) -> grpc.health NOT_SERVING and `/readyz` 503 -> listeners stop, in-flight calls get
`shutdown_grace_s` -> the sweeper, the drainer and the power loop stop (hook calls in flight are
cancelled) -> the engine is disposed.

Readiness is the process's: both listeners up, the schema at head when it was checked at start. The
database's state (`database_state.py`) is reported, not made a reason to leave the Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator

import grpc
import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import metrics, refusals
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.database_state import DatabaseState
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import is_sqlite, make_engine
from rdbroker_broker.db.tracing import trace_statements
from rdbroker_broker.drains import Drainer
from rdbroker_broker.errors import BrokerError, DatabaseUnavailable
from rdbroker_broker.power import PowerConfigError, PowerService, hooks_for
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.rest.app import create_app, set_stopping
from rdbroker_broker.rpc import authz
from rdbroker_broker.rpc.servicer import BrokerServicer
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_common import telemetry, tls
from rdbroker_common.redact import redact
from rdbroker_common.rpc_server import add_standard_services, mark_serving
from rdbroker_common.settings import split_host_port
from rdbroker_proto.v1 import broker_pb2, broker_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = broker_pb2.DESCRIPTOR.services_by_name["Broker"].full_name


class StartupError(Exception):
    """The broker cannot start (bad listen address, schema not migrated, ...); the message says why."""


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the broker's stop event drives shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def prepare_database(settings: BrokerSettings, engine: AsyncEngine) -> str | None:
    """Upgrade the schema (SQLite, `--migrate`) or check it is at head; answers its revision."""
    url = settings.database_url_text
    if is_sqlite(url) or settings.migrate:
        await migrate.upgrade(engine)
        return migrate.head_revision()
    current, head = await migrate.current_revision(engine), migrate.head_revision()
    if current != head:
        raise StartupError(
            f"database schema is at revision {current or 'none'}, the broker needs {head}: run "
            f"`rdbroker migrate --database-url {redact(url)}` (or start with --migrate)"
        )
    return current


def _grpc_server(settings: BrokerSettings, servicer: BrokerServicer) -> tuple[grpc.aio.Server, int]:
    # Mutual TLS (renewed files take over at the next handshake) or plaintext; a partial TLS setting
    # is a start-up error, never a fallback.
    try:
        creds = tls.server_credentials(settings.tls_ca, settings.tls_cert, settings.tls_key)
        refusal = authz.exposure_refusal(settings)
        authorization = authz.interceptor(settings)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    if refusal is not None:
        raise StartupError(refusal)
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_age_ms", settings.grpc_max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", settings.grpc_max_connection_age_grace_ms),
    ]
    # Tracing outside, so a refused call still continues its caller's trace.
    server = grpc.aio.server(options=options, interceptors=[*telemetry.server_interceptors(), authorization])
    broker_pb2_grpc.add_BrokerServicer_to_server(servicer, server)
    try:
        if creds is not None:
            port = server.add_secure_port(settings.grpc_listen, creds)
        else:
            port = server.add_insecure_port(settings.grpc_listen)
    except (OSError, RuntimeError) as exc:
        raise StartupError(f"cannot listen for gRPC on {settings.grpc_listen}: {exc}") from exc
    if not port:
        raise StartupError(f"cannot listen for gRPC on {settings.grpc_listen}")
    return server, port


def _http_socket(listen: str) -> socket.socket:
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen for HTTP on {listen}: {exc}") from exc
    # Listening now means clients that connect before uvicorn starts wait in the backlog.
    sock.listen(1024)
    return sock


async def _sweep_forever(service: BrokerService, stop: asyncio.Event) -> None:
    interval = service.settings.sweep_interval_s
    while not stop.is_set():
        try:
            await service.sweep()
            await refusals.flush(service)
        except DatabaseUnavailable:
            pass  # the database state logs each change, not each failed sweep
        except BrokerError as exc:
            log.warning("sweep failed: %s", exc)
        except Exception:
            log.exception("sweep failed")
        # Jitter keeps replicas from sweeping in lockstep.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval * random.uniform(0.8, 1.2))


async def _watch_database(store: Store, interval_s: float, stop: asyncio.Event) -> None:
    """Ping the database when no call reached it for `interval_s`: an idle broker learns that it went
    away or came back. A busy broker's calls tell it already (`Store`)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
        if stop.is_set() or time.monotonic() - store.database.heard_at < interval_s:
            continue
        try:
            async with asyncio.timeout(interval_s):
                await store.ping()
        except TimeoutError:
            store.database.failed(f"the database did not answer a ping within {interval_s:g} s")
        except BrokerError:
            pass  # the store told the state
        except Exception as exc:  # the driver's own errors (a database that refuses us)
            store.database.failed(exc)


async def serve(
    settings: BrokerSettings,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    bound: dict[str, int] | None = None,
    local: Callable[[BrokerServicer], None] | None = None,
) -> None:
    """Run the broker until `stop` is set. `bound` receives the ports actually listened on; `local` the
    servicer, for in-process callers (`rdbroker up`), before `ready` is set."""
    stop = stop or asyncio.Event()
    engine = make_engine(
        settings.database_url_text,
        pool_size=settings.db_pool_size,
        statement_timeout_ms=settings.db_statement_timeout_ms,
        lock_timeout_ms=settings.db_lock_timeout_ms,
    )
    trace_statements(engine)
    session_counts = metrics.SessionCounts(engine, settings.sessions_metric_interval_s)
    database = DatabaseState()
    try:
        revision = await prepare_database(settings, engine)
        store = Store(
            engine, max_waiting=settings.db_max_waiting, on_refused=metrics.record_refused, database=database
        )
        service = BrokerService(store, settings)
        power = PowerService(service, hooks_for(settings))
        try:
            await power.check()
        except PowerConfigError as exc:
            raise StartupError(str(exc)) from exc
        servicer = BrokerServicer(service, ProbeService(service))
        if local is not None:
            local(servicer)
        grpc_server, grpc_port = _grpc_server(settings, servicer)
        health = add_standard_services(grpc_server, [SERVICE_NAME], reflection=settings.grpc_reflection)
        sock = _http_socket(settings.http_listen)
        http_port = int(sock.getsockname()[1])
        try:
            rest = create_app(service, schema_revision=revision)
        except ValueError as exc:  # the agents' token or TLS files (session actions)
            sock.close()
            raise StartupError(str(exc)) from exc
        config = uvicorn.Config(
            rest,  # FastAPI traces each request itself once a tracer provider is set
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            # The audit trail names the peer that connected: a `X-Forwarded-For` from any local
            # process must not rename it.
            proxy_headers=False,
        )
        http_server = _Uvicorn(config)
        await grpc_server.start()
        await mark_serving(health, [SERVICE_NAME])
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(http_server.serve(sockets=[sock]))
            tasks.create_task(_sweep_forever(service, stop))
            tasks.create_task(power.run(settings.power_interval_s, stop))
            # Drains until empty (drains.py): every replica looks; one at a time advances each drain.
            tasks.create_task(Drainer(service, rest.state.agents).run_forever(stop))
            tasks.create_task(session_counts.refresh_forever(stop))
            tasks.create_task(_watch_database(store, settings.db_check_interval_s, stop))
            metrics.publish_sessions(session_counts)
            metrics.publish_database(database)
            if bound is not None:
                bound.update(grpc=grpc_port, http=http_port)
            log.info(
                "broker listening: gRPC on port %d, HTTP on port %d",
                grpc_port,
                http_port,
                extra={
                    "grpc_port": grpc_port,
                    "http_port": http_port,
                    "database": redact(settings.database_url_text),
                },
            )
            if ready is not None:
                ready.set()
            await stop.wait()
            log.info("shutting down")
            set_stopping(rest)
            await health.enter_graceful_shutdown()
            http_server.should_exit = True
            servicer.stopping.set()  # RouteStreams end once their calls are answered
            await grpc_server.stop(settings.shutdown_grace_s)
        sock.close()
    finally:
        metrics.withdraw_sessions(session_counts)
        metrics.withdraw_database(database)
        await engine.dispose()
