"""The broker client against in-process fake brokers: failover, refusals, buffered reports, heartbeats."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.reports import REPORT_BATCH
from rdbroker_proxy.routing import BrokerClient
from tests.support.postgres import free_port
from tests.unit.proxy.fake_broker import Directory, fake_broker
from tests.unit.proxy.support import STEP_TIMEOUT_S, wait_until

SERVER = "127.0.0.1:40001"


def request(connection_id: str, cookie: str = "alice") -> pb.RouteRequest:
    return pb.RouteRequest(connection_id=connection_id, proxy_id="p", cookie=cookie)


def client(addresses: list[str], **kw: float) -> BrokerClient:
    options = {"route_timeout_s": 3.0, "route_attempt_timeout_s": 1.0, "report_timeout_s": 0.5}
    options.update(kw)
    return BrokerClient(addresses, proxy_id="p", **options)  # type: ignore[arg-type]


async def test_route_answers_and_a_retry_reuses_the_answer() -> None:
    directory = Directory({"": [SERVER]})
    async with fake_broker(directory) as broker:
        c = client([broker.address])
        try:
            first = await c.route(request("c1"))
            again = await c.route(request("c1"))
        finally:
            await c.close()
    assert first.server_address == SERVER
    assert first.reason == pb.ROUTE_REASON_NEW
    assert again == first
    assert directory.sessions_created["c1"] == 1


async def test_routes_are_balanced_over_healthy_brokers() -> None:
    directory = Directory({"": [SERVER]})
    async with fake_broker(directory) as a, fake_broker(directory) as b:
        c = client([a.address, b.address])
        try:
            for i in range(10):
                await c.route(request(f"c{i}", cookie=f"u{i}"))
                c.report_closed(pb.ConnectionClosedRequest(connection_id=f"c{i}"))  # not sent: no drainer
        finally:
            await c.close()
    assert (a.servicer.route_calls, b.servicer.route_calls) == (5, 5)


async def test_route_fails_over_to_another_broker() -> None:
    directory = Directory({"": [SERVER]})
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with fake_broker(directory) as broker:
        c = client([dead, broker.address])
        try:
            answers = [await c.route(request(f"c{i}", cookie=f"u{i}")) for i in range(6)]
        finally:
            await c.close()
    assert all(a.server_address == SERVER for a in answers)
    assert broker.servicer.route_calls == 6


async def test_a_broker_that_commits_but_never_answers_is_retried_with_the_same_connection_id() -> None:
    directory = Directory({"": [SERVER]})
    async with fake_broker(directory) as hung, fake_broker(directory) as good:
        hung.servicer.hang_routes = True
        c = client([hung.address, good.address], route_attempt_timeout_s=0.3)
        try:
            answers = [await c.route(request(f"c{i}", cookie=f"u{i}")) for i in range(4)]
        finally:
            await c.close()
    assert hung.servicer.route_calls >= 1  # rotation sent at least one call into the hang
    assert all(a.server_address == SERVER for a in answers)
    assert set(directory.sessions_created.values()) == {1}  # no connection created two sessions
    assert len(directory.sessions_created) == 4


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    ],
)
async def test_refusals_are_not_retried(code: grpc.StatusCode) -> None:
    directory = Directory({"": [SERVER]}, error=(code, "no"))
    async with fake_broker(directory) as a, fake_broker(directory) as b:
        c = client([a.address, b.address])
        try:
            with pytest.raises(RouteRefused) as caught:
                await c.route(request("c1"))
        finally:
            await c.close()
    assert caught.value.code == code
    assert a.servicer.route_calls + b.servicer.route_calls == 1


async def test_no_broker_reachable_is_unavailable_within_the_deadline() -> None:
    c = client([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], route_timeout_s=1.0)
    try:
        # Bounded: a route that retried past its deadline would run into this.
        with pytest.raises(BrokerUnavailable):
            async with asyncio.timeout(STEP_TIMEOUT_S):
                await c.route(request("c1"))
    finally:
        await c.close()


async def test_reports_wait_for_a_broker_that_comes_back() -> None:
    directory = Directory({"": [SERVER]})
    port = free_port()
    c = client([f"127.0.0.1:{port}"])
    try:
        async with asyncio.TaskGroup() as tg:
            drainer = tg.create_task(c.run_reports())
            for i in range(5):
                c.report_opened(pb.ConnectionOpenedRequest(connection_id=f"c{i}", session_id=f"s{i}"))
                c.report_closed(pb.ConnectionClosedRequest(connection_id=f"c{i}", session_id=f"s{i}"))
            assert not await c.flush(0.3)  # nobody listens yet
            async with fake_broker(directory, port=port):
                assert await c.flush(10.0)
            drainer.cancel()
    finally:
        await c.close()
    assert [r.connection_id for r in directory.opened] == [f"c{i}" for i in range(5)]
    assert [r.connection_id for r in directory.closed] == [f"c{i}" for i in range(5)]
    assert c.dropped_reports == 0


async def test_a_report_the_broker_refuses_is_dropped_and_does_not_stall_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rdbroker_proxy")
    directory = Directory({"": [SERVER]}, opened_error=(grpc.StatusCode.ABORTED, "newer session"))
    async with fake_broker(directory) as broker:
        c = client([broker.address])
        try:
            async with asyncio.TaskGroup() as tg:
                drainer = tg.create_task(c.run_reports())
                c.report_opened(pb.ConnectionOpenedRequest(connection_id="c1", session_id="s1"))
                c.report_closed(pb.ConnectionClosedRequest(connection_id="c1", session_id="s1"))
                c.report_closed(pb.ConnectionClosedRequest(connection_id="c2", session_id="s2"))
                assert await c.flush(10.0)
                drainer.cancel()
        finally:
            await c.close()
    assert c.rejected_reports == 1
    assert sorted(r.connection_id for r in directory.closed) == ["c1", "c2"]  # c1 still closed
    [line] = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert "opened" in line.getMessage()
    assert line.connection_id == "c1"  # type: ignore[attr-defined]


async def send_reports(directory: Directory, connections: int) -> BrokerClient:
    """Queue opened+closed for each connection before the drainer runs, then flush them all."""
    async with fake_broker(directory) as broker:
        c = client([broker.address])
        try:
            async with asyncio.TaskGroup() as tg:
                drainer = tg.create_task(c.run_reports())
                for i in range(connections):
                    c.report_opened(pb.ConnectionOpenedRequest(connection_id=f"c{i}", session_id=f"s{i}"))
                    c.report_closed(pb.ConnectionClosedRequest(connection_id=f"c{i}", session_id=f"s{i}"))
                assert await c.flush(10.0)
                drainer.cancel()
        finally:
            await c.close()
    return c


async def test_reports_go_in_batches_of_one_call_each_in_order() -> None:
    directory = Directory({"": [SERVER]})
    connections = REPORT_BATCH  # 2 reports each: two full batches
    c = await send_reports(directory, connections)
    assert directory.report_calls == {"ReportConnections": 2}
    assert [r.connection_id for r in directory.opened] == [f"c{i}" for i in range(connections)]
    assert [r.connection_id for r in directory.closed] == [f"c{i}" for i in range(connections)]
    assert (c.sent_reports, c.rejected_reports) == (2 * connections, 0)


async def test_reports_arriving_one_by_one_wait_to_share_a_call() -> None:
    directory = Directory({"": [SERVER]})
    async with fake_broker(directory) as broker:
        c = client([broker.address], report_linger_s=3.0)
        try:
            async with asyncio.TaskGroup() as tg:
                drainer = tg.create_task(c.run_reports())
                c.report_opened(pb.ConnectionOpenedRequest(connection_id="c1", session_id="s1"))
                await wait_until(lambda: not c._wakeup.is_set())  # the drainer woke and lingers
                assert directory.report_calls == {}
                c.report_closed(pb.ConnectionClosedRequest(connection_id="c1", session_id="s1"))
                assert await c.flush(10.0)
                drainer.cancel()
        finally:
            await c.close()
    assert directory.report_calls == {"ReportConnections": 1}
    assert [r.connection_id for r in directory.opened + directory.closed] == ["c1", "c1"]


async def test_an_older_broker_without_the_batch_call_gets_single_reports() -> None:
    directory = Directory({"": [SERVER]}, batch_reports=False)
    c = await send_reports(directory, 3)
    assert directory.report_calls == {"ConnectionOpened": 3, "ConnectionClosed": 3}
    assert sorted(r.connection_id for r in directory.closed) == ["c0", "c1", "c2"]
    assert (c.sent_reports, c.rejected_reports) == (6, 0)


async def test_an_older_broker_refusing_a_report_drops_only_that_one() -> None:
    directory = Directory(
        {"": [SERVER]}, batch_reports=False, opened_error=(grpc.StatusCode.NOT_FOUND, "unknown session")
    )
    c = await send_reports(directory, 2)
    assert (c.sent_reports, c.rejected_reports) == (2, 2)
    assert sorted(r.connection_id for r in directory.closed) == ["c0", "c1"]


async def test_reports_past_the_bound_are_dropped_counted_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rdbroker_proxy")
    c = client([f"127.0.0.1:{free_port()}"])
    c.report_buffer = 3
    try:
        for i in range(5):
            c.report_closed(pb.ConnectionClosedRequest(connection_id=f"c{i}"))
    finally:
        await c.close()
    assert c.dropped_reports == 2
    assert c.pending_reports == 3
    # One line for both drops: the log is rate-limited so a long outage cannot flood it.
    [line] = [r for r in caplog.records if "report buffer full" in r.getMessage()]
    assert line.levelno == logging.WARNING
    assert line.dropped_reports == 1  # type: ignore[attr-defined]
    assert line.report_buffer == 3  # type: ignore[attr-defined]


async def test_heartbeats_follow_the_interval_the_broker_names() -> None:
    directory = Directory({"": [SERVER]}, heartbeat_interval_ms=100)
    async with fake_broker(directory) as broker:
        c = client([broker.address])
        c.heartbeat_interval_s = 60.0
        try:
            async with asyncio.TaskGroup() as tg:
                beats = tg.create_task(c.run_heartbeats(lambda: ["c1", "c2"]))
                await wait_until(lambda: len(directory.heartbeats) >= 3)
                beats.cancel()
        finally:
            await c.close()
    beat = directory.heartbeats[0]
    assert beat.proxy_id == "p"
    assert beat.active_connections == 2
    assert list(beat.connection_ids) == ["c1", "c2"]


async def test_a_failed_heartbeat_is_retried_long_before_the_interval(caplog) -> None:
    # The broker is away at first; the interval is a minute. When the broker comes back the proxy is
    # heard within seconds, long before anyone could judge it silent.
    port = free_port()
    directory = Directory({"": [SERVER]}, heartbeat_interval_ms=60_000)
    c = client([f"127.0.0.1:{port}"], heartbeat_interval_s=60.0)
    try:
        async with asyncio.TaskGroup() as tg:
            beats = tg.create_task(c.run_heartbeats(lambda: ["c1"]))
            await wait_until(lambda: any("heartbeat failed" in r.getMessage() for r in caplog.records))
            async with fake_broker(directory, port):
                await wait_until(lambda: len(directory.heartbeats) == 1, timeout_s=8.0)
            beats.cancel()
    finally:
        await c.close()
    assert list(directory.heartbeats[0].connection_ids) == ["c1"]
