"""`rdbroker.v1.Health`: on-demand probes for operators (not recorded, no hysteresis).

The caller names the agent URL, so the agent token goes only to a URL the broker gave this replica for
a server it probes: any other would hand the token to whoever the caller points at.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from dataclasses import replace

import grpc
import httpx

from rdbroker_common.bearer import Tokens
from rdbroker_common.settings import split_host_port
from rdbroker_health.config import HealthSettings
from rdbroker_health.probes import http as http_probe
from rdbroker_health.probes.http import AgentResult
from rdbroker_health.probes.rdp import RdpProbe
from rdbroker_health.rpc import convert
from rdbroker_proto.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "rdbroker.v1.Health"
WITHHELD = "on-demand probes send the agent token only to the agent_url of a server this replica probes"


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(
        self,
        settings: HealthSettings,
        http: httpx.AsyncClient,
        probe_rdp: RdpProbe,
        *,
        agent_tokens: Tokens | None = None,
        trusted_agent_urls: Callable[[], Collection[str]] = frozenset,
    ) -> None:
        self.settings = settings
        self.http = http
        self.probe_rdp = probe_rdp
        self.agent_tokens = agent_tokens
        self.trusted_agent_urls = trusted_agent_urls

    async def ProbeServer(
        self, request: health_pb2.ProbeServerRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> health_pb2.ProbeServerResponse:
        try:
            split_host_port(request.address)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"address: {exc}")
        if request.agent_url:
            try:
                url = httpx.URL(request.agent_url)
            except httpx.InvalidURL as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"agent_url: {exc}")
            if url.scheme not in ("http", "https") or not url.host:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent_url must be an http(s) URL")
        timeout_s = request.timeout_ms / 1000 if request.timeout_ms else self.settings.probe_timeout_s
        if timeout_s > self.settings.max_on_demand_timeout_s:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_ms above the limit of {self.settings.max_on_demand_timeout_s * 1000:g}",
            )
        agent: AgentResult | None = None
        authorization = None
        if self.agent_tokens is not None and request.agent_url in self.trusted_agent_urls():
            authorization = self.agent_tokens.header()
        async with asyncio.TaskGroup() as tg:
            rdp_task = tg.create_task(self.probe_rdp(request.address, timeout_s))
            agent_task = (
                tg.create_task(http_probe.probe_agent(self.http, request.agent_url, timeout_s, authorization))
                if request.agent_url
                else None
            )
        if agent_task is not None:
            agent = agent_task.result()
            if agent.refused and authorization is None and self.agent_tokens is not None:
                agent = replace(agent, detail=f"{agent.detail.partition(':')[0]}: {WITHHELD}")
        rdp_result = rdp_task.result()
        log.info("on-demand probe of %s: %s", request.address, rdp_result.detail)
        return convert.probe_server_response(rdp_result, agent)
