"""An in-process Broker with only the three health RPCs and an in-memory lease table.

It follows the contract: a claim renews the replica's leases and takes unleased or expired servers up to
a fair share, ceil(servers / live replicas), giving back any excess so a new replica gets its share; it
answers every server the replica holds. Results from a replica without the lease are rejected.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc

from rdbroker_proto.v1 import broker_pb2, broker_pb2_grpc


@dataclass
class Report:
    replica_id: str
    result: broker_pb2.ProbeResult
    at: float


@dataclass
class FakeBroker(broker_pb2_grpc.BrokerServicer):
    targets: dict[str, broker_pb2.ProbeTarget] = field(default_factory=dict)
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)  # address -> (replica, expiry)
    replicas: dict[str, float] = field(default_factory=dict)  # replica -> alive until
    reports: list[Report] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    session_reports: list[broker_pb2.ReportServerSessionsRequest] = field(default_factory=list)
    claims: int = 0  # ClaimProbeTargets calls, answered or refused
    refuse_results_from: set[str] = field(default_factory=set)  # replicas whose results are all rejected

    def add(self, address: str, **fields: object) -> None:
        self.targets[address] = broker_pb2.ProbeTarget(address=address, pool="default", **fields)  # type: ignore[arg-type]

    def health(self, address: str) -> int:
        return self.targets[address].health

    def holder(self, address: str) -> str | None:
        holder = self.leases.get(address)
        return holder[0] if holder and holder[1] > time.monotonic() else None

    def held_by(self, replica_id: str) -> set[str]:
        return {a for a in self.targets if self.holder(a) == replica_id}

    async def ClaimProbeTargets(self, request, context):
        self.claims += 1
        if not request.replica_id or not request.lease_ms:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "replica_id and lease_ms are required")
        now = time.monotonic()
        expiry = now + request.lease_ms / 1000
        self.replicas[request.replica_id] = expiry
        live = [r for r, until in self.replicas.items() if until > now]
        share = math.ceil(len(self.targets) / len(live))
        mine = sorted(self.held_by(request.replica_id))
        for address in mine[share:]:
            del self.leases[address]
        mine = mine[:share]
        for address in sorted(self.targets):
            if len(mine) >= share:
                break
            if self.holder(address) is None:
                mine.append(address)
        for address in mine:
            self.leases[address] = (request.replica_id, expiry)
        return broker_pb2.ClaimProbeTargetsResponse(targets=[self.targets[a] for a in sorted(mine)])

    async def ReportProbeResults(self, request, context):
        rejected = []
        for result in request.results:
            refused = request.replica_id in self.refuse_results_from
            if refused or self.holder(result.address) != request.replica_id:
                rejected.append(result.address)
                self.rejected.append((request.replica_id, result.address))
                continue
            self.reports.append(Report(request.replica_id, result, time.monotonic()))
            target = self.targets[result.address]
            if target.health == broker_pb2.HEALTH_STATE_DOWN and not result.rdp_ok:
                continue  # as the broker: a failed probe never brings a server recorded down up
            target.health = result.health
        return broker_pb2.ReportProbeResultsResponse(rejected_addresses=rejected)

    async def ReportServerSessions(self, request, context):
        self.session_reports.append(request)
        return broker_pb2.ReportServerSessionsResponse(ended=0, recorded=len(request.sessions), linked=0)


@asynccontextmanager
async def serving(broker: FakeBroker, port: int = 0) -> AsyncIterator[str]:
    """Serve `broker` on 127.0.0.1 (port 0 = any); yields its address."""
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(broker, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield f"127.0.0.1:{bound}"
    finally:
        await server.stop(0)
