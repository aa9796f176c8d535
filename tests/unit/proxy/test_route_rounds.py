"""route_in_rounds (tenacity): Route rounds over the brokers until one answers, a refusal at once, the
deadline honoured, and a hold (a server being started) moving the deadline."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import BrokerUnavailable, RouteRefused
from rdbroker_proxy.routing import RETRY_PAUSE_S, Unanswered, route_in_rounds

ANSWER = pb.RouteResponse(server_address="10.0.0.1:3389", session_id="s1")


async def test_rounds_go_on_until_one_answers() -> None:
    deadlines: list[float] = []

    async def round_(deadline: float) -> pb.RouteResponse:
        deadlines.append(deadline)
        if len(deadlines) < 3:
            raise Unanswered("UNAVAILABLE: restarting")
        return ANSWER

    assert await route_in_rounds(round_, 5.0) == ANSWER
    assert len(deadlines) == 3
    assert len(set(deadlines)) == 1  # no hold: the same deadline each round


async def test_the_round_after_a_first_failure_waits_its_pause() -> None:
    """The first round runs before tenacity takes over; its failure still earns the pause."""
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def round_(deadline: float) -> pb.RouteResponse:
        starts.append(loop.time())
        if len(starts) == 1:
            raise Unanswered("UNAVAILABLE: restarting")
        return ANSWER

    assert await route_in_rounds(round_, 5.0) == ANSWER
    assert len(starts) == 2
    assert starts[1] - starts[0] >= RETRY_PAUSE_S / 5  # the least pause full jitter draws


async def test_a_refusal_ends_the_rounds_at_once() -> None:
    rounds = 0

    async def round_(deadline: float) -> pb.RouteResponse:
        nonlocal rounds
        rounds += 1
        raise RouteRefused(grpc.StatusCode.NOT_FOUND, "no pool")

    with pytest.raises(RouteRefused):
        await route_in_rounds(round_, 5.0)
    assert rounds == 1


async def test_no_round_begins_past_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def round_(deadline: float) -> pb.RouteResponse:
        starts.append(loop.time())
        raise Unanswered("DEADLINE_EXCEEDED: slow")

    began = loop.time()
    with pytest.raises(BrokerUnavailable, match="no broker answered Route: DEADLINE_EXCEEDED: slow"):
        await route_in_rounds(round_, 0.3)
    assert len(starts) >= 2  # paused and tried again
    assert all(start < began + 0.3 for start in starts)


async def test_a_hold_moves_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    deadlines: list[float] = []

    async def round_(deadline: float) -> pb.RouteResponse:
        deadlines.append(deadline)
        if loop.time() - began < 0.4:  # the server starts after the first deadline (0.2 s)
            raise Unanswered("UNAVAILABLE: starting", start_wait_s=1.0)
        return ANSWER

    assert await route_in_rounds(round_, 0.2) == ANSWER
    assert deadlines[0] == pytest.approx(began + 0.2, abs=0.05)
    assert deadlines[-1] == pytest.approx(began + 1.0, abs=0.05)


async def test_a_storm_refused_at_once_comes_back_spread_out() -> None:
    """Clients refused together (a busy broker) do not all try again at the same moment: their
    pauses are drawn at random within the window (full jitter), so the broker sees them spread."""
    random.seed(13)  # tenacity draws from `random`: the same pauses every run
    loop = asyncio.get_running_loop()
    second: list[float] = []

    async def client() -> pb.RouteResponse:
        tries = 0

        async def round_(deadline: float) -> pb.RouteResponse:
            nonlocal tries
            tries += 1
            if tries == 1:
                raise Unanswered("UNAVAILABLE: overloaded")
            second.append(loop.time())
            return ANSWER

        return await route_in_rounds(round_, 5.0)

    began = loop.time()
    answers = await asyncio.gather(*(client() for _ in range(20)))
    assert answers == [ANSWER] * 20
    assert min(second) - began < 0.05  # the window starts short
    assert max(second) - min(second) > 0.03  # and they come back spread over it
