"""The broker's RouteStream serving (rpc/route_stream.serve): every call answered once by call_id,
answers ready together sent together, bad input answered per call, and the stream ends when the proxy
stops writing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from rdbroker_broker.rpc import route_stream
from rdbroker_proto.v1 import broker_pb2 as pb


def calls(*ids: int) -> pb.RouteCalls:
    return pb.RouteCalls(
        calls=[pb.RouteCall(call_id=i, request=pb.RouteRequest(cookie=f"u{i}")) for i in ids]
    )


async def feed(*messages: pb.RouteCalls, hold: asyncio.Event | None = None) -> AsyncIterator[pb.RouteCalls]:
    for message in messages:
        yield message
    if hold is not None:
        await hold.wait()  # the proxy keeps the stream open


async def collect(stream: AsyncIterator[pb.RouteAnswers]) -> list[pb.RouteAnswers]:
    return [message async for message in stream]


async def echo(call: pb.RouteCall) -> pb.RouteAnswer:
    return pb.RouteAnswer(call_id=call.call_id, response=pb.RouteResponse(user=call.request.cookie))


async def test_every_call_is_answered_once_and_the_stream_ends_after_the_last() -> None:
    messages = await collect(route_stream.serve(feed(calls(1, 2, 3), calls(4)), echo))
    answers = [a for m in messages for a in m.answers]
    assert sorted(a.call_id for a in answers) == [1, 2, 3, 4]
    assert all(a.response.user == f"u{a.call_id}" for a in answers)
    assert len(messages) < 4  # answers ready together leave together


async def test_an_answer_waits_for_the_calls_still_at_work_within_the_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Answers ready a little apart share a message while calls are in flight; the last call in
    flight is answered at once, and a slow call does not hold the others past HOLD_S."""
    monkeypatch.setattr(route_stream, "HOLD_S", 0.5)
    slow = asyncio.Event()

    async def staggered(call: pb.RouteCall) -> pb.RouteAnswer:
        if call.call_id == 9:
            await slow.wait()
        else:
            await asyncio.sleep(0.02 * call.call_id)
        return await echo(call)

    stop = asyncio.Event()
    stream = route_stream.serve(feed(calls(1, 2, 3), hold=stop), staggered)
    first = await asyncio.wait_for(anext(stream), 20)
    assert sorted(a.call_id for a in first.answers) == [1, 2, 3]  # 20-60 ms apart, one message
    stream2 = route_stream.serve(feed(calls(1, 9), hold=stop), staggered)
    lone = await asyncio.wait_for(anext(stream2), 20)  # call 9 never ends: 1 waits HOLD_S, no more
    assert [a.call_id for a in lone.answers] == [1]
    slow.set()
    last = await asyncio.wait_for(anext(stream2), 20)
    assert [a.call_id for a in last.answers] == [9]
    stop.set()
    for done in (stream, stream2):
        assert [m async for m in done] == []


async def test_the_last_call_in_flight_is_answered_without_a_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route_stream, "HOLD_S", 3600)  # a hold would outlast the wait below
    stop = asyncio.Event()
    stream = route_stream.serve(feed(calls(1), calls(2), hold=stop), echo)
    answered: list[int] = []
    while len(answered) < 2:
        answered += [a.call_id for a in (await asyncio.wait_for(anext(stream), 20)).answers]
    assert sorted(answered) == [1, 2]
    stop.set()
    assert [m async for m in stream] == []


async def test_calls_beyond_the_message_bound_are_invalid_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route_stream, "MAX_CALLS_PER_MESSAGE", 3)
    messages = await collect(route_stream.serve(feed(calls(1, 2, 3, 4, 5)), echo))
    answers = {a.call_id: a for m in messages for a in m.answers}
    assert sorted(answers) == [1, 2, 3, 4, 5]
    assert [answers[i].code for i in (1, 2, 3)] == [0, 0, 0]
    for i in (4, 5):
        assert answers[i].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert not answers[i].HasField("response")


async def test_calls_beyond_the_in_flight_bound_are_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(route_stream, "MAX_IN_FLIGHT", 2)
    release = asyncio.Event()

    async def slow(call: pb.RouteCall) -> pb.RouteAnswer:
        await release.wait()
        return await echo(call)

    stream = route_stream.serve(feed(calls(1, 2, 3)), slow)
    first = await anext(stream)  # the refusal does not wait for the slow calls
    assert [(a.call_id, a.code) for a in first.answers] == [(3, grpc.StatusCode.UNAVAILABLE.value[0])]
    release.set()
    rest = [a for m in await collect(stream) for a in m.answers]
    assert sorted((a.call_id, a.code) for a in rest) == [(1, 0), (2, 0)]


async def test_a_failing_call_is_internal_and_the_others_go_on() -> None:
    async def flaky(call: pb.RouteCall) -> pb.RouteAnswer:
        if call.call_id == 2:
            raise RuntimeError("bug")
        return await echo(call)

    answers = {
        a.call_id: a
        for m in await collect(route_stream.serve(feed(calls(1, 2, 3)), flaky))
        for a in m.answers
    }
    assert answers[2].code == grpc.StatusCode.INTERNAL.value[0]
    assert "internal error" in answers[2].details
    assert answers[1].code == answers[3].code == 0


async def test_an_answer_leaves_while_the_proxy_keeps_the_stream_open() -> None:
    hold = asyncio.Event()
    stream = route_stream.serve(feed(calls(7), hold=hold), echo)
    message = await asyncio.wait_for(anext(stream), 5)
    assert [a.call_id for a in message.answers] == [7]
    hold.set()
    assert await collect(stream) == []


async def test_a_stopping_broker_answers_what_it_read_and_ends_the_stream() -> None:
    hold, stopping, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    started: list[int] = []
    both_started = asyncio.Event()

    async def slow(call: pb.RouteCall) -> pb.RouteAnswer:
        started.append(call.call_id)
        if len(started) == 2:
            both_started.set()
        await release.wait()
        return await echo(call)

    # The proxy keeps writing (`hold`): without `stopping` this stream would stay open.
    stream = route_stream.serve(feed(calls(1, 2), hold=hold), slow, stopping)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.wait_for(both_started.wait(), 5)  # the calls are read and in flight
    stopping.set()
    release.set()
    message = await asyncio.wait_for(first, 5)
    rest = await asyncio.wait_for(collect(stream), 5)  # ends although the proxy never stopped writing
    assert sorted(a.call_id for m in [message, *rest] for a in m.answers) == [1, 2]
    assert not hold.is_set()
