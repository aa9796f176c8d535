"""The proxy replica: the RDP listener, the health endpoint, the broker client, and shutdown.

Shutdown order (STYLE §10): readiness goes NOT_SERVING, the listener closes, live connections get
`shutdown_grace_s` to finish, the rest are closed with end reason "shutdown", reports are flushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health

from rdbroker_common import loghash, tls
from rdbroker_common.broker_token import BrokerToken
from rdbroker_common.rpc_server import add_standard_services, mark_serving
from rdbroker_common.settings import split_host_port
from rdbroker_proxy import metrics
from rdbroker_proxy.config import ProxySettings
from rdbroker_proxy.connection import ClientConnection, ProxyContext, identity_logger
from rdbroker_proxy.routing import Broker, BrokerClient

log = logging.getLogger(__name__)

SERVICE_NAME = "rdbroker.v1.Proxy"  # a name for the health service only: the proxy serves no RPCs


def client_tls(settings: ProxySettings) -> tls.ClientTls | None:
    """Mutual TLS to the brokers when all three TLS settings are given, plaintext when none is; the
    credentials follow renewals of the files.

    Raises ValueError on a partial set (or an unusable file): a start-up error, never a fallback.
    """
    files = tls.TlsFiles.from_settings(settings.tls_ca, settings.tls_cert, settings.tls_key)
    return None if files is None else tls.ClientTls(files)


def broker_token(settings: ProxySettings) -> BrokerToken:
    """The bearer token for the brokers; raises ValueError on a bad setting or an unreadable file."""
    return BrokerToken(settings.broker_token.get_secret_value(), settings.broker_token_file)


def grpc_broker(settings: ProxySettings) -> BrokerClient:
    return BrokerClient(
        settings.broker_addresses,
        proxy_id=settings.proxy_id,
        route_timeout_s=settings.route_timeout_s,
        route_attempt_timeout_s=settings.route_attempt_timeout_s,
        route_stream=settings.route_stream,
        report_timeout_s=settings.report_timeout_s,
        report_buffer=settings.report_buffer,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        client_tls=client_tls(settings),
        token=broker_token(settings),
    )


def _not_serving(
    coro: Coroutine[Any, Any, None], *, context: contextvars.Context | None = None
) -> asyncio.Task[None]:
    coro.close()
    raise RuntimeError("the proxy is not serving")


class ProxyServer:
    """Run with `await ProxyServer(settings).serve(stop)`; `ready` is set once both ports are bound."""

    def __init__(self, settings: ProxySettings, broker: Callable[[], Broker] | None = None) -> None:
        """`broker` makes the client of the broker inside the event loop (default: gRPC to the
        settings' `broker` addresses; `rdbroker up` passes its in-process one)."""
        self.settings = settings
        self._make_broker = broker
        self.ready = asyncio.Event()
        self.port = 0
        self.grpc_port = 0
        self.broker: Broker | None = None
        self._context: ProxyContext | None = None
        self._health: health.aio.HealthServicer | None = None

    @property
    def context(self) -> ProxyContext:
        """The live connections and counters (once `ready` is set)."""
        if self._context is None:
            raise RuntimeError("the proxy is not serving yet")
        return self._context

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down. Raises OSError when a port cannot be bound or the
        log hash key file cannot be read, ValueError on a bad TLS setting or log hash key."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        hasher = settings.log_hasher()
        log_identity = identity_logger(settings.log_identity, hasher)
        if settings.log_identity == "hash" and hasher.ephemeral:
            log.warning(loghash.NO_KEY_WARNING)
        broker = self.broker = self._make_broker() if self._make_broker else grpc_broker(settings)
        grpc_server = grpc.aio.server()
        listener: asyncio.Server | None = None
        try:
            self._health = add_standard_services(grpc_server, [SERVICE_NAME])
            self.grpc_port = self._bind_health(grpc_server)
            context = self._context = ProxyContext(
                settings=settings, broker=broker, spawn=_not_serving, log_identity=log_identity
            )
            if settings.max_routing:
                context.route_turns = asyncio.Semaphore(settings.max_routing)
            metrics.publish(context)
            host, port = split_host_port(settings.listen)
            # Bound before the TaskGroup, so a port in use is a plain OSError for the caller.
            listener = await loop.create_server(
                lambda: ClientConnection(context),
                host,
                port,
                backlog=settings.backlog,
                reuse_address=True,
                start_serving=False,
            )
            self.port = listener.sockets[0].getsockname()[1]
            await grpc_server.start()
            async with asyncio.TaskGroup() as tg:
                context.spawn = tg.create_task
                await listener.start_serving()
                await mark_serving(self._health, [SERVICE_NAME])
                reports = tg.create_task(broker.run_reports(), name="proxy-reports")
                heartbeats = tg.create_task(
                    broker.run_heartbeats(context.connection_ids), name="proxy-heartbeats"
                )
                log.info(
                    "proxy listening",
                    extra={
                        "listen": settings.listen,
                        "port": self.port,
                        "grpc_port": self.grpc_port,
                        "brokers": settings.broker_addresses,
                        "proxy_id": settings.proxy_id,
                    },
                )
                self.ready.set()
                await stop.wait()

                log.info("shutting down", extra={"connections": len(context.connections)})
                await self._health.enter_graceful_shutdown()
                listener.close()
                await self._drain(context, settings.shutdown_grace_s)
                heartbeats.cancel()
                if not await broker.flush(settings.report_flush_timeout_s):
                    log.warning("reports not sent at exit", extra={"pending_reports": broker.pending_reports})
                reports.cancel()
        finally:
            if self._context is not None:
                metrics.withdraw(self._context)
            if listener is not None:
                listener.close()
            await grpc_server.stop(None)
            await broker.close()
            log.info(
                "proxy stopped",
                extra={
                    "sent_reports": broker.sent_reports,
                    "dropped_reports": broker.dropped_reports,
                    "rejected_reports": broker.rejected_reports,
                },
            )

    def _bind_health(self, grpc_server: grpc.aio.Server) -> int:
        # Always plaintext: the kubelet's gRPC probes present no client certificate, and the port
        # serves nothing but grpc.health.v1. The TLS settings are for the calls to the brokers.
        settings = self.settings
        try:
            return grpc_server.add_insecure_port(settings.grpc_listen)
        except RuntimeError as exc:  # grpc's way of saying the port is taken
            raise OSError(f"cannot bind the health port {settings.grpc_listen}: {exc}") from exc

    async def _drain(self, context: ProxyContext, grace_s: float) -> None:
        """Let live connections end on their own for `grace_s`, then close the rest."""
        context.drained = asyncio.Event()
        if not context.connections:
            context.drained.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await context.drained.wait()
        left = list(context.connections)
        if left:
            log.info("closing connections at the end of the grace period", extra={"connections": len(left)})
        for connection in left:
            connection.finish("shutdown", abort=True)
        await asyncio.sleep(0)  # let the aborted transports deliver connection_lost
