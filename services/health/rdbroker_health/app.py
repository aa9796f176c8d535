"""One health replica: the gRPC server (Health + grpc.health.v1) and the probe scheduler.

ProbeServer is an admin call (docs/security.md): an admin certificate under mutual TLS, or the admin
bearer token. Neither configured, the server may only listen on loopback unless `insecure_grpc`.

Shutdown (SIGTERM sets `stop`): readiness goes NOT_SERVING, the probe loops stop and the last results
are sent, the gRPC server and the probe port get `shutdown_grace_s` for calls in flight, then clients
are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc
from grpc_health.v1 import health
from grpc_health.v1 import health_pb2_grpc as std_health_pb2_grpc

from rdbroker_common import agent_http, rpc_authz, telemetry, tls
from rdbroker_common.agent_http import agent_client
from rdbroker_common.bearer import TokenError, Tokens
from rdbroker_common.broker_token import BrokerToken
from rdbroker_common.https import TlsContext
from rdbroker_common.rpc_server import add_standard_services, mark_serving
from rdbroker_health.config import HealthSettings
from rdbroker_health.errors import ConfigError
from rdbroker_health.probes import rdp
from rdbroker_health.rpc.broker_client import Broker, BrokerClient
from rdbroker_health.rpc.servicer import SERVICE_NAME, HealthServicer
from rdbroker_health.scheduler import Scheduler
from rdbroker_proto.v1 import health_pb2_grpc

log = logging.getLogger(__name__)


async def run(
    settings: HealthSettings,
    stop: asyncio.Event,
    *,
    probe_rdp: rdp.RdpProbe = rdp.probe_rdp,
    on_listening: Callable[[int], None] | None = None,
    broker: Callable[[], Broker] | None = None,
) -> None:
    """Serve and probe until `stop` is set. `on_listening` gets the bound gRPC port (tests use port 0);
    `broker` makes the client of the broker (default: gRPC to the settings' `broker` addresses; `rdbroker
    up` passes its in-process one)."""
    try:
        server_credentials, client_tls = await asyncio.to_thread(_credentials, settings)
        agent_files = await asyncio.to_thread(agent_tls, settings)
        token = await asyncio.to_thread(
            BrokerToken, settings.broker_token.get_secret_value(), settings.broker_token_file
        )
        policy = authz_policy(settings, mtls=server_credentials is not None)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    refusal = rpc_authz.exposure_refusal(
        settings.grpc_listen, policy, insecure=settings.insecure_grpc, token_names="RDBROKER_GRPC_ADMIN_TOKEN"
    )
    if refusal is not None:
        raise ConfigError(refusal)
    tokens = await asyncio.to_thread(agent_tokens, settings)
    replica_id = settings.effective_replica_id()
    client: Broker = (
        broker()
        if broker is not None
        else BrokerClient(
            settings.broker_addresses,
            timeout_s=settings.rpc_timeout_s,
            interceptors=telemetry.client_interceptors(),
            client_tls=client_tls,
            token=token,
        )
    )
    http = agent_client(agent_files.context if agent_files is not None else None)
    scheduler = Scheduler(settings, client, replica_id, http, probe_rdp=probe_rdp, agent_tokens=tokens)
    servicer = HealthServicer(
        settings, http, probe_rdp, agent_tokens=tokens, trusted_agent_urls=scheduler.agent_urls
    )
    server = grpc.aio.server(
        interceptors=[*telemetry.server_interceptors(), rpc_authz.AuthzInterceptor(policy)]
    )
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    standard_health = add_standard_services(server, [SERVICE_NAME], reflection=settings.grpc_reflection)
    try:
        if server_credentials is not None:
            port = server.add_secure_port(settings.grpc_listen, server_credentials)
        else:
            port = server.add_insecure_port(settings.grpc_listen)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {settings.grpc_listen}: {exc}") from exc
    probe_server = _probe_server(settings.probe_listen, standard_health) if settings.probe_listen else None
    try:
        await server.start()
        if probe_server is not None:
            await probe_server.start()
        await mark_serving(standard_health, [SERVICE_NAME])
        log.info(
            "health replica %s serving gRPC on port %d, brokers %s",
            replica_id,
            port,
            ",".join(settings.broker_addresses),
            extra={"grpc_port": port, "replica_id": replica_id},
        )
        if on_listening is not None:
            on_listening(port)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(scheduler.run(stop), name="scheduler")  # ends after the last results are sent
            tg.create_task(_follow_renewals(agent_files, stop), name="agent-tls")
            await stop.wait()
            log.info("stopping: NOT_SERVING, stopping probe loops")
            await standard_health.enter_graceful_shutdown()
    finally:
        await standard_health.enter_graceful_shutdown()
        # The probe port gets the same grace, at the same time: a Watch open on it gets NOT_SERVING
        # before its stream ends (stopping it at once could cancel the stream first).
        stopping = [server.stop(settings.shutdown_grace_s)]
        if probe_server is not None:
            stopping.append(probe_server.stop(settings.shutdown_grace_s))
        await asyncio.gather(*stopping)
        await client.close()
        await http.aclose()
        log.info("health replica %s stopped", replica_id)


def _probe_server(listen: str, status: health.aio.HealthServicer) -> grpc.aio.Server:
    """A plaintext server with only grpc.health.v1, answering the main server's statuses, for kubelet
    probes: they present no client certificate, so they cannot use the mutual-TLS port."""
    server = grpc.aio.server()
    std_health_pb2_grpc.add_HealthServicer_to_server(status, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen for probes on {listen}: {exc}") from exc
    log.info("grpc.health.v1 for probes (plaintext) on port %d", port, extra={"probe_port": port})
    return server


def agent_tokens(settings: HealthSettings) -> Tokens | None:
    """The token sent to agents, from RDBROKER_AGENT_TOKEN or --agent-token-file; ConfigError if unusable."""
    try:
        return agent_http.agent_tokens(
            settings.agent_token.get_secret_value(), settings.agent_token_file, "--agent-token-file"
        )
    except TokenError as exc:
        raise ConfigError(str(exc)) from exc


def agent_tls(settings: HealthSettings) -> TlsContext | None:
    """HTTPS to agents (agent_http.agent_tls) from --agent-tls-ca/--agent-tls-cert/--agent-tls-key."""
    return agent_http.agent_tls(
        settings.agent_tls_ca,
        settings.agent_tls_cert,
        settings.agent_tls_key,
        "--agent-tls-ca/--agent-tls-cert/--agent-tls-key",
    )


async def _follow_renewals(files: TlsContext | None, stop: asyncio.Event) -> None:
    """Renewed agent TLS files take over at the agents' next connection (looked at every few seconds)."""
    while files is not None and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), tls.CLIENT_CHECK_INTERVAL_S)
        files.refresh()  # on the loop's thread: the context must not change under a handshake


# Least privilege, as on the broker: ProbeServer (and reflection, when on) is the admin's.
METHOD_ROLES = {f"/{SERVICE_NAME}/ProbeServer": rpc_authz.ADMIN}


def authz_policy(settings: HealthSettings, *, mtls: bool) -> rpc_authz.Policy:
    return rpc_authz.Policy(
        methods=METHOD_ROLES,
        tokens={rpc_authz.ADMIN: settings.grpc_admin_token.get_secret_value()},
        mtls=mtls,
        trust_domain=settings.grpc_trust_domain,
        server="the health replica",
    )


Credentials = tuple[grpc.ServerCredentials | None, tls.ClientTls | None]


def _credentials(settings: HealthSettings) -> Credentials:
    """Read the TLS files (blocking, so off the loop); both None in plaintext. Both follow renewals:
    the server per handshake, the broker channels on a call at most every few seconds."""
    files = tls.TlsFiles.from_settings(settings.tls_ca, settings.tls_cert, settings.tls_key)
    if files is None:
        return None, None
    return files.server_credentials(), tls.ClientTls(files)
