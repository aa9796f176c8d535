"""The replica loop against an in-process fake Broker: claims, probes, reports, hand-over on death."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

import grpc
import httpx
import pytest

from rdbroker_common.bearer import Tokens
from rdbroker_health.probes.rdp import probe_rdp
from rdbroker_proto.v1 import broker_pb2, broker_pb2_grpc
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.support.postgres import free_port
from tests.unit.health.fake_broker import FakeBroker, serving
from tests.unit.health.support import ProbeLog, fast_settings, replica, wait_until

UP, DOWN, UNKNOWN = broker_pb2.HEALTH_STATE_UP, broker_pb2.HEALTH_STATE_DOWN, broker_pb2.HEALTH_STATE_UNKNOWN


def broker_with(count: int, **fields: object) -> FakeBroker:
    broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    for i in range(count):
        broker.add(f"10.0.0.{i + 1}:3389", **fields)
    return broker


async def test_one_replica_probes_every_server_and_reports() -> None:
    broker = broker_with(3, health=UNKNOWN)
    probes = ProbeLog()
    async with (
        serving(broker) as address,
        replica(fast_settings(address), "r1", probes.probe_for("r1")) as (scheduler, _, _),
    ):
        await wait_until(lambda: all(broker.health(a) == UP for a in broker.targets))
        assert scheduler.held == set(broker.targets)
    reported = {r.result.address for r in broker.reports}
    assert reported == set(broker.targets)
    first = broker.reports[0].result
    assert first.rdp_ok
    assert first.rdp_detail == "neg_rsp protocol=1"
    assert first.load == -1  # no agent
    assert first.probed_at.seconds > 0


async def test_fall_then_rise_with_the_targets_own_thresholds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rdbroker_health")
    broker = broker_with(1, health=UP, rise=2, fall=2, interval_ms=100)
    server = next(iter(broker.targets))
    probes = ProbeLog(down={server})
    async with (
        serving(broker) as address,
        replica(fast_settings(address, rise=20, fall=20), "r1", probes.probe_for("r1")),
    ):
        await wait_until(lambda: broker.health(server) == DOWN)
        assert len(probes.calls) < 20  # the pool's fall=2 counts, not the replica's default
        probes.down.clear()
        failed = len(probes.calls)
        await wait_until(lambda: broker.health(server) == UP)
        assert len(probes.calls) - failed < 20
    messages = [r.getMessage() for r in caplog.records if r.name == "rdbroker_health.scheduler"]
    assert f"server {server} is DOWN (was up): connection refused" in messages
    assert f"server {server} is UP (was down): neg_rsp protocol=1" in messages
    assert next(r for r in caplog.records if "is DOWN" in r.getMessage()).levelno == logging.WARNING


async def test_a_replica_taking_over_keeps_the_brokers_state() -> None:
    broker = broker_with(1, health=DOWN, rise=3)
    server = next(iter(broker.targets))
    probes = ProbeLog()
    async with serving(broker) as address, replica(fast_settings(address), "r1", probes.probe_for("r1")):
        await wait_until(lambda: bool(broker.reports))
        assert broker.reports[0].result.health == DOWN  # one good probe does not bring DOWN up
        await wait_until(lambda: broker.health(server) == UP)
        assert len(probes.calls) >= 3


async def test_a_replica_resumes_from_down_when_the_broker_recorded_it_after_a_failed_probe() -> None:
    # The broker probed the server itself (a proxy could not reach it) and recorded it down while this
    # replica, one of whose probes failed too, still counted towards a high `fall`.
    broker = broker_with(1, health=UP, rise=2, fall=50, interval_ms=100)
    server = next(iter(broker.targets))
    probes = ProbeLog(down={server})
    async with serving(broker) as address, replica(fast_settings(address), "r1", probes.probe_for("r1")):
        await wait_until(lambda: any(not r.result.rdp_ok for r in broker.reports))
        assert broker.health(server) == UP
        broker.targets[server].health = DOWN
        await wait_until(lambda: broker.reports[-1].result.health == DOWN)
        assert len(probes.calls) < 50  # resumed from the broker's DOWN, not from its own count
        probes.down.clear()
        await wait_until(lambda: broker.reports[-1].result.rdp_ok)
        assert broker.reports[-1].result.health == DOWN  # `rise` good probes bring it back, not one
        await wait_until(lambda: broker.health(server) == UP)


async def test_agent_load_is_reported() -> None:
    broker = broker_with(2, agent_url="http://agent.test/load")
    http = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, text="75%,drain"))
    )
    async with (
        serving(broker) as address,
        replica(fast_settings(address), "r1", ProbeLog().probe_for("r1"), http),
    ):
        await wait_until(lambda: len({r.result.address for r in broker.reports}) == 2)
    result = broker.reports[0].result
    assert (result.load, result.agent_state, result.agent_detail) == (
        25,
        broker_pb2.AGENT_STATE_DRAIN,
        "load=25 state=drain",
    )


async def test_failed_agent_reports_no_load_and_its_reason() -> None:
    broker = broker_with(1, agent_url="http://agent.test/load")
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(500)))
    async with (
        serving(broker) as address,
        replica(fast_settings(address), "r1", ProbeLog().probe_for("r1"), http),
    ):
        await wait_until(lambda: bool(broker.reports))
    result = broker.reports[0].result
    assert (result.load, result.agent_state, result.agent_detail) == (
        -1,
        broker_pb2.AGENT_STATE_UNSPECIFIED,
        "http 500",
    )
    assert result.rdp_ok


async def test_an_agent_refusing_our_token_is_an_agent_failure_not_a_down_server() -> None:
    broker = broker_with(1, agent_url="http://agent.test/load", sessions_url="http://agent.test/sessions")
    sent: list[str | None] = []

    def agent(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(401, text="wrong bearer token\n")

    http = httpx.AsyncClient(transport=httpx.MockTransport(agent))
    async with (
        serving(broker) as address,
        replica(
            fast_settings(address),
            "r1",
            ProbeLog().probe_for("r1"),
            http,
            agent_tokens=Tokens(fixed="our-token-0123456789"),
        ),
    ):
        await wait_until(lambda: any(r.result.health == UP for r in broker.reports))
    result = broker.reports[-1].result
    assert (result.health, result.rdp_ok) == (UP, True)
    assert (result.load, result.agent_state) == (-1, broker_pb2.AGENT_STATE_UNSPECIFIED)
    assert result.agent_detail == (
        "agent refused our token (401): set RDBROKER_AGENT_TOKEN (or --agent-token-file) "
        "on the health replicas to the agent's token"
    )
    assert set(sent) == {"Bearer our-token-0123456789"}  # load probes and session lists alike
    assert not broker.session_reports  # a refused list reports nothing


async def test_session_lists_are_reported() -> None:
    broker = broker_with(1, sessions_url="http://agent.test/sessions")
    body = b'[{"user": "CORP\\\\alice", "state": "active"}, {"user": "bob", "state": "disconnected"}]'
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, content=body)))
    probes = ProbeLog()
    async with serving(broker) as address:
        settings = fast_settings(address, sessions_interval_s=0.5)
        async with replica(settings, "r1", probes.probe_for("r1"), http):
            await wait_until(lambda: len(broker.session_reports) >= 2)
            probes_so_far = len(probes.calls)
    report = broker.session_reports[0]
    assert (report.replica_id, report.address) == ("r1", next(iter(broker.targets)))
    assert [(s.user, s.state) for s in report.sessions] == [
        ("CORP\\alice", broker_pb2.SESSION_STATE_ACTIVE),
        ("bob", broker_pb2.SESSION_STATE_DISCONNECTED),
    ]
    # the list is fetched every sessions_interval_s, not on every probe
    assert probes_so_far > len(broker.session_reports)


async def test_session_lists_follow_the_targets_interval_and_carry_listed_at() -> None:
    # Probes every 2 s, session lists every 100 ms (the broker's value wins over the replica's 60 s).
    broker = broker_with(
        1, sessions_url="http://agent.test/sessions", interval_ms=2000, sessions_interval_ms=100
    )
    asked: list[datetime] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(datetime.now(UTC))
        return httpx.Response(200, content=b'[{"user": "alice", "state": "active"}]')

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    probes = ProbeLog()
    async with serving(broker) as address:
        settings = fast_settings(address, sessions_interval_s=60)
        async with replica(settings, "r1", probes.probe_for("r1"), http):
            await wait_until(lambda: len(broker.session_reports) >= 5)
            probed = len(probes.calls)
    assert probed <= 2  # the lists do not wait for probes
    first = broker.session_reports[0]
    assert first.HasField("listed_at")
    # Taken just before the agent was asked: never after.
    assert first.listed_at.ToDatetime(tzinfo=UTC) <= asked[0]
    assert asked[0] - first.listed_at.ToDatetime(tzinfo=UTC) < timedelta(seconds=5)


async def test_rejected_results_stop_the_servers_loop() -> None:
    broker = broker_with(2)
    broker.refuse_results_from.add("r1")
    probes = ProbeLog()
    async with serving(broker) as address:
        settings = fast_settings(address, lease_ms=3000)  # renewals far apart: only the rejection stops it
        async with replica(settings, "r1", probes.probe_for("r1")) as (scheduler, _, _):
            await wait_until(lambda: len(broker.rejected) >= 2)
            await wait_until(lambda: not scheduler.held)


async def test_probing_stops_when_the_lease_cannot_be_renewed() -> None:
    broker = broker_with(2)
    probes = ProbeLog()
    server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(broker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        settings = fast_settings(f"127.0.0.1:{port}", lease_ms=300)
        async with replica(settings, "r1", probes.probe_for("r1")) as (scheduler, _, _):
            await wait_until(lambda: len(scheduler.held) == 2)
            await server.stop(0)
            await wait_until(lambda: not scheduler.held)
            calls = len(probes.calls)
            await asyncio.sleep(0.5)  # more than two intervals: nothing is probed without a lease
            assert len(probes.calls) == calls
    finally:
        await server.stop(0)


async def test_failover_to_the_second_broker_address() -> None:
    broker = broker_with(1)
    probes = ProbeLog()
    dead = f"127.0.0.1:{free_port()}"
    async with (
        serving(broker) as address,
        replica(fast_settings(f"{dead},{address}"), "r1", probes.probe_for("r1")),
    ):
        await wait_until(lambda: bool(broker.reports))


async def test_two_replicas_split_the_servers_and_one_takes_over_when_the_other_dies() -> None:
    broker = broker_with(6)
    everything = set(broker.targets)
    probes = ProbeLog()
    interval = 0.3
    async with serving(broker) as address:
        # lease 1.5 intervals, renewed every 0.5: a dead replica's servers are re-probed within 3 intervals
        settings = fast_settings(address, probe_interval_s=interval, probe_timeout_s=0.2, lease_ms=450)
        async with (
            replica(settings, "a", probes.probe_for("a")) as (a, _, a_task),
            replica(settings, "b", probes.probe_for("b")) as (b, _, _),
        ):
            await wait_until(lambda: len(a.held) == 3 and len(b.held) == 3 and a.held | b.held == everything)
            steady = time.monotonic()
            await asyncio.sleep(4 * interval)
            for server in everything:
                assert len(probes.by(server, since=steady)) == 1, f"{server} probed by both replicas"
            a_servers = set(a.held)
            a_task.cancel()  # dies without a word to the broker
            killed = time.monotonic()
            await wait_until(lambda: b.held == everything)
            await wait_until(lambda: all(probes.first_after(s, killed, "b") for s in a_servers))
            delays = [probes.first_after(s, killed, "b") - killed for s in a_servers]  # type: ignore[operator]
            assert max(delays) <= 3 * interval, delays
            assert probes.by(next(iter(a_servers)), since=killed + 0.05) == {"b"}


async def test_probes_counted_at_fake_rdp_servers_one_prober_each_and_take_over() -> None:
    interval, jitter = 0.3, 0.1
    async with contextlib.AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(FakeRdpServer(mode="sink")) for _ in range(4)]
        broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
        for server in servers:
            broker.add(server.address)
        address = await stack.enter_async_context(serving(broker))
        settings = fast_settings(
            address, probe_interval_s=interval, probe_jitter=jitter, probe_timeout_s=0.2, lease_ms=450
        )
        a, _, a_task = await stack.enter_async_context(replica(settings, "a", probe_rdp))
        b, _, _ = await stack.enter_async_context(replica(settings, "b", probe_rdp))
        await wait_until(lambda: len(a.held) == 2 and len(b.held) == 2 and len(a.held | b.held) == 4)

        # Steady state: over 6 intervals one prober makes at most 6/(1-jitter)+1 probes; two would make ~12.
        before = [s.accepted for s in servers]
        await asyncio.sleep(6 * interval)
        counts = [s.accepted - n for s, n in zip(servers, before, strict=True)]
        assert all(1 <= c <= 8 for c in counts), counts

        a_servers = [s for s in servers if s.address in a.held]
        a_task.cancel()
        await asyncio.wait([a_task])
        killed = time.monotonic()
        seen = {s.address: s.accepted for s in a_servers}
        reprobed: dict[str, float] = {}
        while len(reprobed) < len(a_servers) and time.monotonic() - killed < 10:
            for s in a_servers:
                if s.address not in reprobed and s.accepted > seen[s.address]:
                    reprobed[s.address] = time.monotonic() - killed
            await asyncio.sleep(0.01)
        assert len(reprobed) == len(a_servers)
        assert max(reprobed.values()) <= 3 * interval, reprobed
        assert b.held == {s.address for s in servers}
