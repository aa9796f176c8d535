"""The broker client: failover across addresses, and the errors it raises."""

from __future__ import annotations

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
            assert client.addresses[client._current] == address
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
