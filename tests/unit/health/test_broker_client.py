"""The broker client: failover across addresses, and the errors it raises."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from rdbroker_health.errors import BrokerRefused, BrokerUnavailable
from rdbroker_health.rpc.broker_client import BrokerClient
from tests.support.postgres import free_port
from tests.unit.health.fake_broker import FakeBroker, serving


async def test_calls_fail_over_and_stick_to_the_broker_that_answered() -> None:
    broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    broker.add("10.0.0.1:3389")
    dead = f"127.0.0.1:{free_port()}"
    async with serving(broker) as address:
        client = BrokerClient([dead, address], timeout_s=2.0)
        try:
            targets = await client.claim("r1", 1000)
            assert [t.address for t in targets] == ["10.0.0.1:3389"]
            assert client.addresses[client.channels.order()[0]] == address
            await client.claim("r1", 1000)
            assert broker.claims == 2
        finally:
            await client.close()


async def test_no_broker_answering_is_unavailable() -> None:
    client = BrokerClient([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], timeout_s=1.0)
    try:
        with pytest.raises(BrokerUnavailable, match="no broker answered"):
            await client.claim("r1", 1000)
    finally:
        await client.close()


async def test_an_error_answer_is_refused_without_failover() -> None:
    one, two = FakeBroker(), FakeBroker()  # type: ignore[abstract]
    async with serving(one) as first, serving(two) as second:
        client = BrokerClient([first, second], timeout_s=2.0)
        try:
            with pytest.raises(BrokerRefused, match="INVALID_ARGUMENT"):
                await client.claim("", 1000)
        finally:
            await client.close()
    assert (one.claims, two.claims) == (1, 0)


async def test_a_failing_dns_channel_is_replaced_by_one_that_resolves_again() -> None:
    """gRPC's resolver backoff grows to 120 s while a name has no broker; a new channel resolves at once."""
    from rdbroker_common.settings import Renewal

    now = [100.0]
    port = free_port()
    client = BrokerClient([f"dns:///127.0.0.1:{port}"], timeout_s=0.5)
    client.channels.renewal = Renewal(5.0, lambda: now[0])
    try:
        first = client.channels.channel(0)
        for _ in range(2):  # the first finds the channel idle, the second failing
            with pytest.raises(BrokerUnavailable):
                await client.claim("r1", 1000)
        assert client.channels.channel(0) is first
        now[0] += 5.0
        with pytest.raises(BrokerUnavailable):
            await client.claim("r1", 1000)
        assert client.channels.channel(0) is not first
        broker = FakeBroker()  # type: ignore[abstract]
        broker.add("10.0.0.1:3389")
        async with serving(broker, port=port):
            # The scheduler calls again each round; the channel is out of its reconnect backoff
            # (at most 2 s) well within these rounds.
            for _ in range(100):
                with contextlib.suppress(BrokerUnavailable):
                    assert [t.address for t in await client.claim("r1", 1000)] == ["10.0.0.1:3389"]
                    break
                await asyncio.sleep(0.1)
            assert broker.claims == 1
    finally:
        await client.close()


class Answering(FakeBroker):
    """Answers every claim with `code`, counting them."""

    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__()
        self.code = code

    async def ClaimProbeTargets(self, request, context):
        self.claims += 1
        await context.abort(self.code, "as told")


@pytest.mark.parametrize(
    ("code", "retried"),
    [
        (grpc.StatusCode.UNAVAILABLE, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False),
        (grpc.StatusCode.PERMISSION_DENIED, False),
        (grpc.StatusCode.INTERNAL, False),
    ],
)
async def test_only_unavailability_is_retried_and_each_broker_once_per_call(
    code: grpc.StatusCode, retried: bool
) -> None:
    brokers = [Answering(code) for _ in range(3)]  # type: ignore[abstract]
    async with contextlib.AsyncExitStack() as stack:
        addresses = [await stack.enter_async_context(serving(b)) for b in brokers]
        client = BrokerClient(addresses, timeout_s=2.0)
        try:
            for calls in (1, 2):
                with pytest.raises(
                    BrokerUnavailable if retried else BrokerRefused,
                    match=code.name if not retried else "no broker answered",
                ):
                    await client.claim("r1", 1000)
                claims = [b.claims for b in brokers]
                assert claims == ([calls] * 3 if retried else [calls, 0, 0])
        finally:
            await client.close()
