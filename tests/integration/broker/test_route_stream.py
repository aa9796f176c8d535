"""RouteStream on the real broker (PostgreSQL): the proxy's stream and the unary Route give one answer per
connection, tokens are checked on the stream as on Route, and a proxy that may not route is told why."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest

from rdbroker_common.broker_token import BrokerToken
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import RouteRefused
from rdbroker_proxy.routing import BrokerClient
from tests.integration.broker.conftest import running_broker, seed, server
from tests.integration.broker.test_grpc_clients import TOKENS, with_tokens

SERVERS = ("10.7.0.1:3389", "10.7.0.2:3389")


def request(user: str, **kw: Any) -> pb.RouteRequest:
    return pb.RouteRequest(connection_id=uuid.uuid4().hex, proxy_id="p1", cookie=user, **kw)


async def test_the_stream_and_unary_route_give_one_answer_per_connection(
    pg_database_url: str, engine: Any
) -> None:
    await seed(engine, *(server(a) for a in SERVERS))
    async with running_broker(with_tokens(pg_database_url)) as broker:
        target = [f"127.0.0.1:{broker.grpc_port}"]
        token = BrokerToken(TOKENS["proxy"])
        streamed = BrokerClient(target, proxy_id="p1", token=token)
        unary = BrokerClient(target, proxy_id="p1", token=token, route_stream=False)
        try:
            requests = [request(f"user{n}") for n in range(40)]
            answers = await asyncio.gather(*(streamed.route(r) for r in requests))
            stream = next(held[0] for held in streamed._streams[0] if held is not None)
            assert stream.calls_written == 40
            assert stream.messages_written < 40
            assert not streamed._no_stream
            for sent, answer in zip(requests, answers, strict=True):
                assert answer.user == sent.cookie
                assert answer.server_address in SERVERS
                assert answer.reason == pb.ROUTE_REASON_NEW
                # The same call asked again on the other transport: the same session, not a second one.
                assert await unary.route(sent) == answer
            # Placement spread the 40 new users over both servers.
            assert {a.server_address for a in answers} == set(SERVERS)
            with pytest.raises(RouteRefused) as caught:
                await streamed.route(request("alice", pool="no-such-pool"))
            with pytest.raises(RouteRefused) as caught_unary:
                await unary.route(request("alice", pool="no-such-pool"))
            assert (caught.value.code, str(caught.value)) == (
                caught_unary.value.code,
                str(caught_unary.value),
            )
        finally:
            await streamed.close()
            await unary.close()


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("", grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", grpc.StatusCode.UNAUTHENTICATED),
        (TOKENS["health"], grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_the_stream_needs_the_proxy_token(
    pg_database_url: str, engine: Any, token: str, code: grpc.StatusCode
) -> None:
    await seed(engine, *(server(a) for a in SERVERS))
    async with running_broker(with_tokens(pg_database_url)) as broker:
        client = BrokerClient([f"127.0.0.1:{broker.grpc_port}"], proxy_id="p1", token=BrokerToken(token))
        try:
            with pytest.raises(RouteRefused) as caught:
                await client.route(request("alice"))
            assert caught.value.code is code
        finally:
            await client.close()
