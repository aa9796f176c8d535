"""How quickly the proxies find brokers again: a `dns:///` target is re-resolved within a second of a
connection closing, a broker restarted on its address is used again, and a `dns:///` channel that stays
failing is replaced by one that resolves the name at once (gRPC's resolver backoff grows to 120 s)."""

from __future__ import annotations

import logging

import grpc
import pytest

from rdbroker_common.settings import DNS_MIN_RESOLUTION_INTERVAL, ROUND_ROBIN, Renewal, channel_options
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import BrokerUnavailable
from rdbroker_proxy.routing import BrokerClient
from tests.support.postgres import free_port
from tests.unit.proxy.fake_broker import Directory, fake_broker

SERVER = "127.0.0.1:40001"


def request(connection_id: str) -> pb.RouteRequest:
    return pb.RouteRequest(connection_id=connection_id, proxy_id="p", cookie="alice")


def test_dns_targets_are_balanced_and_re_resolved_within_a_second() -> None:
    assert channel_options("dns:///brokers.rdbroker.svc:50051") == [
        ROUND_ROBIN,
        ("grpc.dns_min_time_between_resolutions_ms", 1000),
    ]
    assert DNS_MIN_RESOLUTION_INTERVAL[1] < 30_000  # gRPC's default
    assert channel_options("10.0.0.5:50051") == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_dns_channel_is_renewed_after_failing_for_the_interval_and_then_again() -> None:
    clock = Clock()
    renewal = Renewal(5.0, clock)
    target = "dns:///brokers:50051"
    assert not renewal.due(0, target, failing=True)
    clock.now += 4.9
    assert not renewal.due(0, target, failing=True)
    clock.now += 0.1
    assert renewal.due(0, target, failing=True)
    assert not renewal.due(0, target, failing=True)  # the new channel gets its own interval
    clock.now += 5.0
    assert renewal.due(0, target, failing=True)
    assert not renewal.due(0, target, failing=False)  # working again: the count starts over
    clock.now += 10.0
    assert not renewal.due(0, target, failing=True)


def test_addresses_other_than_dns_are_never_renewed() -> None:
    clock = Clock()
    renewal = Renewal(5.0, clock)
    assert not renewal.due(0, "127.0.0.1:50051", failing=True)
    clock.now += 60
    assert not renewal.due(0, "127.0.0.1:50051", failing=True)


@pytest.mark.parametrize("scheme", ["", "dns:///"])
async def test_a_broker_restarted_on_its_address_is_used_again(scheme: str) -> None:
    directory = Directory({"": [SERVER]})
    port = free_port()
    client = BrokerClient([f"{scheme}127.0.0.1:{port}"], proxy_id="p", route_timeout_s=30.0)
    try:
        async with fake_broker(directory, port=port):
            assert (await client.route(request("c1"))).server_address == SERVER
        # The broker is gone (its connection closed): the next one on the address takes the calls.
        async with fake_broker(directory, port=port):
            assert (await client.route(request("c2"))).server_address == SERVER
    finally:
        await client.close()
    assert [r.connection_id for r in directory.routes] == ["c1", "c2"]


async def test_a_failing_dns_channel_is_replaced_by_one_that_resolves_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rdbroker_common.broker_channels")
    port = free_port()
    target = f"dns:///127.0.0.1:{port}"
    clock = Clock()
    client = BrokerClient([target], proxy_id="p", route_timeout_s=1.0, route_attempt_timeout_s=0.5)
    client.channels.renewal = Renewal(5.0, clock)
    try:
        first = client.channels.channel(0)
        with pytest.raises(BrokerUnavailable):  # nobody listens: the channel fails
            await client.route(request("c1"))
        assert first.get_state() is grpc.ChannelConnectivity.TRANSIENT_FAILURE
        assert client.channels.channel(0) is first  # not failing for the interval yet
        clock.now += 5.0
        with pytest.raises(BrokerUnavailable):
            await client.route(request("c2"))
        assert client.channels.channel(0) is not first
        assert f"broker channel to {target} failing: a new one resolves the name again" in caplog.text
        directory = Directory({"": [SERVER]})
        async with fake_broker(directory, port=port):
            client.route_timeout_s = 30.0
            assert (await client.route(request("c3"))).server_address == SERVER
    finally:
        await client.close()
