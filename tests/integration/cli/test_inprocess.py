"""`rdbroker up`'s in-process clients against a real broker, on PostgreSQL and on SQLite: every answer
and every refusal is the one the gRPC clients get from the same broker over its gRPC port.

Each case runs one scenario through one path (gRPC or in-process) on a fresh database and compares it
with one expectation, so the two paths are held to the same answers on both stores."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import psycopg
import pytest

from rdbroker_broker import callers
from rdbroker_cli import components
from rdbroker_cli.inprocess import HealthBroker, LocalBroker, ProxyBroker
from rdbroker_health.errors import BrokerRefused
from rdbroker_health.rpc.broker_client import BrokerClient as HealthClient
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.reports import QueuedReports
from rdbroker_proxy.routing import BrokerClient
from rdbroker_rdp import encode_routing_token
from tests.integration.broker.conftest import seed, server, settings_for, until_a_statement_waits_on_a_lock

A, B = "10.0.0.1:3389", "10.0.0.2:3389"
PATHS = ("grpc", "in-process")


@contextlib.asynccontextmanager
async def broker_at(url: str, **settings: Any) -> AsyncIterator[tuple[str, LocalBroker]]:
    """The whole broker served in this loop as `up` runs it: its gRPC address and the in-process handle."""
    stop, ports, local = asyncio.Event(), components.BrokerPorts(), LocalBroker()
    task = asyncio.get_running_loop().create_task(
        components.run_broker(settings_for(url, **settings), stop, ports, local)
    )
    waiter = asyncio.get_running_loop().create_task(ports.ready.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert ports.ready.is_set()
    assert local.servicer is not None
    try:
        yield f"127.0.0.1:{ports.grpc_port}", local
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    return str(request.getfixturevalue("pg_database_url"))


@contextlib.asynccontextmanager
async def proxy_client(
    path: str, address: str, local: LocalBroker, **kw: Any
) -> AsyncIterator[QueuedReports]:
    if path == "grpc":
        client: QueuedReports = BrokerClient([address], proxy_id="p1", report_linger_s=0, **kw)
    else:
        client = ProxyBroker(local, "p1", report_linger_s=0, **kw)
    reports = asyncio.get_running_loop().create_task(client.run_reports())
    try:
        yield client
    finally:
        reports.cancel()
        await client.close()  # type: ignore[attr-defined]


async def outcome(call: Any) -> tuple[str, str]:
    try:
        answer = await call
    except RouteRefused as exc:
        return exc.code.name, exc.details
    except BrokerUnavailable as exc:
        return "unavailable", str(exc)
    return "ok", pb.ROUTE_REASON_NEW and pb.RouteReason.Name(answer.reason)


def route(connection_id: str, **fields: Any) -> pb.RouteRequest:
    return pb.RouteRequest(connection_id=connection_id, proxy_id="p1", **fields)


async def sessions(address: str, user: str) -> list[tuple[str, int]]:
    async with grpc.aio.insecure_channel(address) as channel:
        from rdbroker_proto.v1.broker_pb2_grpc import BrokerStub

        found = await BrokerStub(channel).LookupUserSessions(
            pb.LookupUserSessionsRequest(user=user, include_ended=True), timeout=10
        )
    return [(s.session_id, s.state) for s in found.sessions]


@pytest.mark.parametrize("path", PATHS)
async def test_route_reports_and_heartbeats_answer_as_over_grpc(database_url: str, path: str) -> None:
    async with broker_at(database_url) as (address, local):
        from rdbroker_broker.db.engine import make_engine

        engine = make_engine(database_url)
        try:
            await seed(engine, server(A), server(B))
        finally:
            await engine.dispose()
        async with proxy_client(path, address, local, route_timeout_s=2.0) as client:
            first = await client.route(route("c1", cookie="CORP\\kim"))  # type: ignore[attr-defined]
            assert first.reason == pb.ROUTE_REASON_NEW
            assert (first.user, first.pool) == ("CORP\\kim", "default")
            assert first.server_address in (A, B)
            # The same connection_id again (a retry) gets the same answer: Route is idempotent on it.
            assert await client.route(route("c1", cookie="CORP\\kim")) == first  # type: ignore[attr-defined]

            client.report_opened(
                pb.ConnectionOpenedRequest(
                    session_id=first.session_id, connection_id="c1", proxy_id="p1", server_address=A
                )
            )
            assert await client.flush(10)
            assert await sessions(address, "corp\\kim") == [(first.session_id, pb.SESSION_STATE_ACTIVE)]
            # The client left: its session waits (disconnected), and the next connection is a reconnect.
            client.report_closed(
                pb.ConnectionClosedRequest(
                    session_id=first.session_id,
                    connection_id="c1",
                    proxy_id="p1",
                    bytes_from_server=6308,  # a logon: a session to keep
                    end_reason="client_closed",
                )
            )
            assert await client.flush(10)
            again = await client.route(route("c2", cookie="CORP\\kim"))  # type: ignore[attr-defined]
            assert (again.reason, again.session_id, again.server_address) == (
                pb.ROUTE_REASON_RECONNECT,
                first.session_id,
                first.server_address,
            )
            client.report_opened(
                pb.ConnectionOpenedRequest(session_id=first.session_id, connection_id="c2", proxy_id="p1")
            )
            # A refused report is counted, not retried, and does not hold up the others.
            client.report_opened(
                pb.ConnectionOpenedRequest(session_id="nope", connection_id="c3", proxy_id="p1")
            )
            assert await client.flush(10)
            assert await sessions(address, "corp\\kim") == [(first.session_id, pb.SESSION_STATE_ACTIVE)]
            assert (client.sent_reports, client.rejected_reports, client.pending_reports) == (3, 1, 0)

            host, port = A.split(":")
            token = await client.route(  # type: ignore[attr-defined]
                route("c4", routing_token=encode_routing_token(host, int(port)), cookie="CORP\\lee")
            )
            assert (token.reason, token.server_address) == (pb.ROUTE_REASON_TOKEN, A)

            refusals = [
                await outcome(client.route(route("c5", cookie="x", pool="Nope"))),  # type: ignore[attr-defined]
                await outcome(
                    client.route(route("c6", routing_token="3640205228.15629.0000"))  # type: ignore[attr-defined]
                ),
                await outcome(client.route(route("c7", cookie="bob\x07"))),  # type: ignore[attr-defined]
            ]
            assert [code for code, _ in refusals] == ["NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"]
            assert "unknown pool" in refusals[0][1]
            assert "not a registered server" in refusals[1][1]

            beat = await client._heartbeat(pb.ProxyHeartbeatRequest(proxy_id="p1", connection_ids=["c2"]))
            assert beat.heartbeat_interval_ms == 5000


@pytest.mark.parametrize("path", PATHS)
async def test_an_overloaded_broker_is_retried_then_unavailable_as_over_grpc(
    pg_database_url: str, path: str
) -> None:
    async with broker_at(pg_database_url, db_pool_size=1, db_max_waiting=1) as (address, local):
        from rdbroker_broker.db.engine import make_engine

        engine = make_engine(pg_database_url)
        try:
            await seed(engine, server(A))
        finally:
            await engine.dispose()
        async with (
            proxy_client(path, address, local, route_timeout_s=10, route_attempt_timeout_s=10) as patient,
            proxy_client(path, address, local, route_timeout_s=0.6, route_attempt_timeout_s=0.3) as client,
        ):
            await client.route(route("warm", cookie="warm"))  # type: ignore[attr-defined]
            async with await psycopg.AsyncConnection.connect(pg_database_url) as locker:
                await locker.execute("LOCK TABLE pools IN ACCESS EXCLUSIVE MODE")
                # alice's call takes the only database connection; its statement waits on the lock.
                held = asyncio.ensure_future(patient.route(route("c-alice", cookie="alice")))  # type: ignore[attr-defined]
                await until_a_statement_waits_on_a_lock(pg_database_url)
                # bob's attempts are refused (overloaded), retried, and end unavailable at his deadline.
                code, detail = await outcome(client.route(route("c-bob", cookie="bob")))  # type: ignore[attr-defined]
                assert code == "unavailable"
                assert "UNAVAILABLE: the broker is overloaded" in detail
                await locker.rollback()
            # alice's first attempt ran to its end under the lock; her retries got its answer.
            assert (await asyncio.wait_for(held, 10)).reason == pb.ROUTE_REASON_NEW


async def test_in_process_calls_run_as_up_proxy_and_up_health(pg_database_url: str) -> None:
    seen: list[callers.Caller] = []
    async with broker_at(pg_database_url) as (_, local):
        from rdbroker_broker.db.engine import make_engine

        engine = make_engine(pg_database_url)
        try:
            await seed(engine, server(A))
        finally:
            await engine.dispose()
        assert local.servicer is not None
        service = local.servicer.service
        original: Callable[..., Any] = service.route

        async def spy(request: Any) -> Any:
            seen.append(callers.current.get())
            return await original(request)

        service.route = spy  # type: ignore[method-assign]
        await ProxyBroker(local, "p1").route(route("c1", cookie="kim"))
        assert [c.actor for c in seen] == ["up:proxy"]
        assert callers.current.get() is callers.UNKNOWN  # bound for the call only
    # Once the broker has stopped, a call fails as an unreachable broker does.
    with pytest.raises(BrokerUnavailable):
        await ProxyBroker(local, "p1", route_timeout_s=0.2).route(route("c2", cookie="kim"))


@pytest.mark.parametrize("path", PATHS)
async def test_health_claims_and_reports_answer_as_over_grpc(database_url: str, path: str) -> None:
    async with broker_at(database_url) as (address, local):
        from rdbroker_broker.db.engine import make_engine

        engine = make_engine(database_url)
        try:
            await seed(engine, server(A), server(B))
        finally:
            await engine.dispose()
        client = HealthClient([address], timeout_s=5) if path == "grpc" else HealthBroker(local, 5)
        try:
            targets = await client.claim("r1", 30_000)
            assert sorted(t.address for t in targets) == [A, B]
            result = pb.ProbeResult(address=A, health=pb.HEALTH_STATE_UP, rdp_ok=True, load=-1)
            stranger = pb.ProbeResult(address="10.9.9.9:3389", health=pb.HEALTH_STATE_UP, rdp_ok=True)
            assert await client.report_results("r1", [result, stranger]) == ["10.9.9.9:3389"]
            counts = await client.report_sessions(
                "r1", A, [pb.ReportedSession(user="kim", state=pb.SESSION_STATE_ACTIVE)]
            )
            assert (counts.recorded, counts.ended) == (1, 0)
            with pytest.raises(BrokerRefused, match="INVALID_ARGUMENT"):
                await client.report_sessions(
                    "r1", A, [pb.ReportedSession(user="kim", state=pb.SESSION_STATE_ENDED)]
                )
        finally:
            await client.close()
