"""ReportConnections: a batch of Opened/Closed reports applies as the single calls do, in order,
refuses bad events by index, is harmless to retry, and fails whole on a database outage."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker.db import report_sql
from rdbroker_broker.db.tables import connections, sessions
from rdbroker_broker.errors import Unavailable
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.rpc import convert
from rdbroker_broker.rpc.servicer import MAX_REPORT_EVENTS, BrokerServicer
from rdbroker_broker.service import BrokerService
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import seed, server

A, B = "10.0.0.1:3389", "10.0.0.2:3389"
SESSION_FIELDS = ("state", "opened_at", "disconnected_at", "expires_at", "ended_at", "end_reason", "proxy_id")
CONNECTION_FIELDS = (
    "opened_at",
    "closed_at",
    "bytes_from_client",
    "bytes_from_server",
    "duration_ms",
    "end_reason",
)


async def routed(service: BrokerService, connection_id: str, user: str) -> str:
    decision = await service.route(
        convert.route_request(pb.RouteRequest(connection_id=connection_id, proxy_id="p1", cookie=user))
    )
    return decision.session_id


async def state_of(engine: AsyncEngine, connection_id: str) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """The directory rows a connection's reports touch, without ids (which differ between runs)."""
    async with engine.connect() as conn:
        link = (
            await conn.execute(
                select(connections.c.session_id, *(connections.c[f] for f in CONNECTION_FIELDS)).where(
                    connections.c.connection_id == connection_id
                )
            )
        ).one()
        session = (
            await conn.execute(
                select(*(sessions.c[f] for f in SESSION_FIELDS)).where(sessions.c.id == link[0])
            )
        ).one()
    return tuple(session), tuple(link[1:])


def opened(session_id: str, connection_id: str, proxy_id: str = "p1") -> pb.ConnectionEvent:
    return pb.ConnectionEvent(
        opened=pb.ConnectionOpenedRequest(
            session_id=session_id, connection_id=connection_id, proxy_id=proxy_id, server_address=A
        )
    )


def closed(session_id: str, connection_id: str, reason: str = "client_closed") -> pb.ConnectionEvent:
    return pb.ConnectionEvent(
        closed=pb.ConnectionClosedRequest(
            session_id=session_id,
            connection_id=connection_id,
            bytes_from_client=100,
            bytes_from_server=6308,
            duration_ms=30,
            end_reason=reason,
        )
    )


# Each connection's reports: opened then closed (-> disconnected), opened only (-> active),
# closed before it ever opened (-> ended).
SCRIPT = (("opened", "closed"), ("opened",), ("closed",))


async def test_a_batch_leaves_the_directory_as_the_single_calls_do(engine, service, probes):
    await seed(engine, server(A), server(B))
    servicer = BrokerServicer(service, probes)
    single = [await routed(service, f"s{i}", f"single{i}") for i in range(len(SCRIPT))]
    batched = [await routed(service, f"b{i}", f"batch{i}") for i in range(len(SCRIPT))]

    for i, kinds in enumerate(SCRIPT):
        for kind in kinds:
            event = opened(single[i], f"s{i}") if kind == "opened" else closed(single[i], f"s{i}")
            if kind == "opened":
                await servicer.ConnectionOpened(event.opened, Context())  # type: ignore[arg-type]
            else:
                await servicer.ConnectionClosed(event.closed, Context())  # type: ignore[arg-type]
    # Interleaved across connections, as a proxy's queue holds them; in order per connection.
    events = [
        opened(batched[0], "b0"),
        opened(batched[1], "b1"),
        closed(batched[2], "b2"),
        closed(batched[0], "b0"),
    ]
    answer = await servicer.ReportConnections(
        pb.ReportConnectionsRequest(proxy_id="p1", events=events),
        Context(),  # type: ignore[arg-type]
    )
    assert list(answer.rejected) == []

    for i in range(len(SCRIPT)):
        assert await state_of(engine, f"b{i}") == await state_of(engine, f"s{i}")
    states = [(await state_of(engine, f"b{i}"))[0][0] for i in range(len(SCRIPT))]
    assert states == ["disconnected", "active", "ended"]


async def test_a_retried_batch_changes_nothing(engine, service, probes):
    await seed(engine, server(A), server(B))
    servicer = BrokerServicer(service, probes)
    ids = [await routed(service, f"c{i}", f"user{i}") for i in range(len(SCRIPT))]
    events = [opened(ids[0], "c0"), opened(ids[1], "c1"), closed(ids[0], "c0"), closed(ids[2], "c2")]
    request = pb.ReportConnectionsRequest(proxy_id="p1", events=events)

    await servicer.ReportConnections(request, Context())  # type: ignore[arg-type]
    first = [await state_of(engine, f"c{i}") for i in range(len(SCRIPT))]
    answer = await servicer.ReportConnections(request, Context())  # type: ignore[arg-type]
    assert list(answer.rejected) == []
    assert [await state_of(engine, f"c{i}") for i in range(len(SCRIPT))] == first


async def test_refused_events_are_answered_by_index_and_the_rest_apply(broker, engine):
    await seed(engine, server(A))
    session = (
        await broker.stub.Route(pb.RouteRequest(connection_id="c1", proxy_id="p0", cookie="kim"))
    ).session_id
    events = [
        opened("no-such-session", "c9"),
        opened(session, "c1", proxy_id=""),
        pb.ConnectionEvent(),  # neither opened nor closed
        closed(session, "c1", reason="x" * 65),  # end_reason too long
    ]
    answer = await broker.stub.ReportConnections(pb.ReportConnectionsRequest(proxy_id="p1", events=events))
    assert list(answer.rejected) == [0, 2, 3]
    assert len(answer.rejected_reasons) == 3
    assert answer.rejected_reasons[0].startswith("NOT_FOUND:")
    assert answer.rejected_reasons[1] == "INVALID_ARGUMENT: event is neither opened nor closed"
    assert "end_reason" in answer.rejected_reasons[2]
    found = await broker.stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="kim"))
    assert [s.state for s in found.sessions] == [pb.SESSION_STATE_ACTIVE]
    # The proxy_id of the batch stands in for an event's empty one.
    assert (await state_of(engine, "c1"))[0][SESSION_FIELDS.index("proxy_id")] == "p1"


async def test_an_oversize_batch_is_refused_whole(broker, engine):
    await seed(engine, server(A))
    session = (await broker.stub.Route(pb.RouteRequest(connection_id="c1", cookie="kim"))).session_id
    events = [opened(session, "c1")] * (MAX_REPORT_EVENTS + 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await broker.stub.ReportConnections(pb.ReportConnectionsRequest(proxy_id="p1", events=events))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too many events" in (info.value.details() or "")
    found = await broker.stub.LookupUserSessions(pb.LookupUserSessionsRequest(user="kim"))
    assert [s.state for s in found.sessions] == [pb.SESSION_STATE_PENDING]


class Context:
    """Enough of a grpc.aio.ServicerContext for `guarded`: abort records the status and raises."""

    code: grpc.StatusCode | None = None

    def time_remaining(self) -> float | None:
        return None  # no deadline

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise RuntimeError(details)


async def test_a_database_outage_fails_the_whole_batch(engine, service, probes, monkeypatch):
    await seed(engine, server(A))
    ids = [await routed(service, f"c{i}", f"user{i}") for i in range(2)]
    real_run_all = report_sql.run_all

    async def outage_before_commit(conn: Any, statements: Any) -> list[tuple[report_sql.Outcome, ...]]:
        # The statements ran in the batch's transaction; the database then goes away (what the
        # store raises when it does), and the transaction with it.
        await real_run_all(conn, statements)
        raise Unavailable("the database is unreachable")

    monkeypatch.setattr(report_sql, "run_all", outage_before_commit)
    servicer = BrokerServicer(service, ProbeService(service))
    context = Context()
    request = pb.ReportConnectionsRequest(proxy_id="p1", events=[opened(ids[0], "c0"), opened(ids[1], "c1")])
    with pytest.raises(RuntimeError):
        await servicer.ReportConnections(request, context)  # type: ignore[arg-type]
    assert context.code == grpc.StatusCode.UNAVAILABLE
    assert [(await state_of(engine, f"c{i}"))[0][0] for i in range(2)] == ["pending", "pending"]

    # The proxy resends the whole batch, which applies.
    monkeypatch.setattr(report_sql, "run_all", real_run_all)
    answer = await servicer.ReportConnections(request, context)  # type: ignore[arg-type]
    assert list(answer.rejected) == []
    assert [(await state_of(engine, f"c{i}"))[0][0] for i in range(2)] == ["active", "active"]
