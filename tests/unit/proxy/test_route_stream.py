"""Route calls on RouteStream (rdbroker_proxy.route_stream): batched, answered as the unary call would be,
failed over when a broker goes away, unary with a broker that lacks the RPC, and streams replaced when old."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy import route_stream
from rdbroker_proxy.errors import RouteRefused
from rdbroker_proxy.routing import BrokerClient
from tests.unit.proxy.fake_broker import Directory, fake_broker
from tests.unit.proxy.support import wait_until

SERVERS = ["10.0.0.1:3389", "10.0.0.2:3389"]


def request(user: str, pool: str = "") -> pb.RouteRequest:
    return pb.RouteRequest(connection_id=uuid.uuid4().hex, proxy_id="p1", cookie=user, pool=pool)


def streams_of(client: BrokerClient, index: int = 0) -> list[route_stream.RouteStream]:
    return [held[0] for held in client._streams[index] if held is not None]


async def test_calls_in_flight_share_messages_and_get_their_own_answers() -> None:
    directory = Directory({"": SERVERS})
    async with fake_broker(directory) as broker:
        client = BrokerClient([broker.address], proxy_id="p1")
        try:
            requests = [request(f"user{n}") for n in range(64)]
            answers = await asyncio.gather(*(client.route(r) for r in requests))
            stream = streams_of(client)[0]
            assert stream.calls_written == 64
            assert stream.messages_written < 64 // 4  # the calls rode together
            # Each answer is its own call's: the fake broker keys its answers by connection_id.
            for sent, answer in zip(requests, answers, strict=True):
                assert answer.user == sent.cookie
                assert answer == directory.answers[(sent.connection_id, 0)]
            assert broker.servicer.route_calls == 64
            assert broker.servicer.streams_opened == 1
        finally:
            await client.close()


async def test_calls_asked_while_others_are_unanswered_wait_to_share_a_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With calls in flight a new call waits up to HOLD_S for company."""
    monkeypatch.setattr(route_stream, "HOLD_S", 0.2)  # wide, so the loop's timing cannot split them
    directory = Directory({"": SERVERS})
    async with fake_broker(directory) as broker:
        client = BrokerClient([broker.address], proxy_id="p1")
        try:
            await client.route(request("alone"))
            stream = streams_of(client)[0]
            broker.servicer.route_delay_s = 0.5  # the broker is busy: calls stay in flight
            first = asyncio.ensure_future(client.route(request("first")))
            await wait_until(lambda: stream.calls_written == 2)
            written = stream.messages_written
            later = [asyncio.ensure_future(client.route(request(f"later{n}"))) for n in range(3)]
            await asyncio.sleep(0.05)  # the others come one by one, within the hold
            later += [asyncio.ensure_future(client.route(request(f"later{n}"))) for n in range(3, 6)]
            answers = await asyncio.gather(first, *later)
            assert [a.user for a in answers] == ["first", *(f"later{n}" for n in range(6))]
            assert stream.calls_written == 8
            assert stream.messages_written == written + 1  # the six rode in one message
        finally:
            await client.close()


async def test_a_call_with_nothing_in_flight_is_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route_stream, "HOLD_S", 3600)  # a hold would outlast the waits below
    directory = Directory({"": SERVERS})
    async with fake_broker(directory) as broker:
        client = BrokerClient([broker.address], proxy_id="p1")
        try:
            for n in range(3):  # one after another: each alone on the stream
                answer = await asyncio.wait_for(client.route(request(f"user{n}")), 20)
                assert answer.user == f"user{n}"
        finally:
            await client.close()


async def test_a_refusal_on_the_stream_is_the_unary_calls_refusal() -> None:
    directory = Directory({"": SERVERS})
    async with fake_broker(directory) as broker:
        streamed = BrokerClient([broker.address], proxy_id="p1")
        unary = BrokerClient([broker.address], proxy_id="p1", route_stream=False)
        try:
            refusals = []
            for client in (streamed, unary):
                with pytest.raises(RouteRefused) as caught:
                    await client.route(request("alice", pool="nope"))
                refusals.append((caught.value.code, str(caught.value)))
            assert refusals[0] == refusals[1]
            assert refusals[0][0] is grpc.StatusCode.NOT_FOUND
            assert broker.servicer.streams_opened == 1  # the unary client never opened one
        finally:
            await streamed.close()
            await unary.close()


async def test_a_broker_without_route_stream_gets_unary_route() -> None:
    directory = Directory({"": SERVERS}, stream_routes=False)
    async with fake_broker(directory) as broker:
        client = BrokerClient([broker.address], proxy_id="p1")
        try:
            for n in range(5):
                answer = await client.route(request(f"user{n}"))
                assert answer.server_address in SERVERS
            assert broker.servicer.route_calls == 5
            assert broker.servicer.streams_opened == 1  # asked once, then remembered
            assert 0 in client._no_stream
        finally:
            await client.close()


async def test_calls_on_the_stream_of_a_broker_that_dies_are_answered_by_another() -> None:
    directory = Directory({"": SERVERS})
    async with fake_broker(directory) as a, fake_broker(directory) as b:
        a.servicer.route_delay_s = 0.5  # the calls are in flight on a's stream when it dies
        client = BrokerClient([a.address, b.address], proxy_id="p1", route_timeout_s=10.0)
        try:
            requests = [request(f"user{n}") for n in range(8)]
            calls = [asyncio.ensure_future(client.route(r)) for r in requests]  # half go to a
            await wait_until(lambda: a.servicer.route_calls + b.servicer.route_calls == len(requests))
            assert b.servicer.route_calls == len(requests) // 2
            await a.stop()
            answers = await asyncio.wait_for(asyncio.gather(*calls), 10)
            assert [x.user for x in answers] == [r.cookie for r in requests]
            assert b.servicer.route_calls == len(requests)  # a's half asked again there
            # Idempotent on connection_id: a's committed answer is the one b gives.
            for sent, answer in zip(requests, answers, strict=True):
                assert directory.sessions_created[sent.connection_id] == 1
                assert answer == directory.answers[(sent.connection_id, 0)]
        finally:
            await client.close()


async def test_old_streams_are_replaced_without_failing_their_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route_stream, "MAX_AGE_S", 0.0)  # every call finds its stream too old
    directory = Directory({"": SERVERS})
    async with fake_broker(directory) as broker:
        broker.servicer.route_delay_s = 0.05  # calls still in flight when their stream is retired
        client = BrokerClient([broker.address], proxy_id="p1")
        try:
            answers = await asyncio.gather(*(client.route(request(f"user{n}")) for n in range(10)))
            assert all(a.server_address in SERVERS for a in answers)
            assert broker.servicer.route_calls == 10  # none failed and was asked again
            assert broker.servicer.streams_opened == 10
        finally:
            await client.close()


async def test_a_call_past_its_deadline_on_the_stream_is_deadline_exceeded() -> None:
    directory = Directory({"": SERVERS})
    async with fake_broker(directory) as broker:
        broker.servicer.hang_routes = True
        client = BrokerClient([broker.address], proxy_id="p1")
        try:
            stream = client._stream(0)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stream.ask(request("alice"), 0.2, {})
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert stream.pending == 0
            assert stream.usable  # one slow call does not end the stream
        finally:
            await client.close()
