"""The report queue's pauses after a failed batch, and the heartbeat's after a failed heartbeat, are
jittered: two proxies that lost their broker together do not come back in the same instant."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy import reports
from rdbroker_proxy.errors import BrokerUnavailable
from rdbroker_proxy.reports import RETRY_PAUSE_S, QueuedReports, Report

FAILURES = 3


class Failing(QueuedReports):
    """A queue whose first FAILURES batches and heartbeats cannot be sent."""

    def __init__(self) -> None:
        super().__init__("p1", report_linger_s=0.0, heartbeat_interval_s=0.4)
        self.sent_at: list[float] = []
        self.heartbeat_at: list[float] = []
        self.answered = asyncio.Event()

    async def _send_batch(self, batch: list[Report]) -> list[Report]:
        self.sent_at.append(asyncio.get_running_loop().time())
        return batch if len(self.sent_at) <= FAILURES else []

    async def _heartbeat(self, request: pb.ProxyHeartbeatRequest) -> pb.ProxyHeartbeatResponse:
        self.heartbeat_at.append(asyncio.get_running_loop().time())
        if len(self.heartbeat_at) <= FAILURES:
            raise BrokerUnavailable("away")
        self.answered.set()
        return pb.ProxyHeartbeatResponse()


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[object, list[tuple[float, float]]]:
    """Every pause asked for and the pause drawn for it, by the task that asked."""
    random.seed(2026)
    real = reports.jittered
    seen: dict[object, list[tuple[float, float]]] = {}

    def spy(pause_s: float) -> float:
        pause = real(pause_s)
        seen.setdefault(asyncio.current_task(), []).append((pause_s, pause))
        return pause

    monkeypatch.setattr(reports, "jittered", spy)
    return seen


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_two_queues_failing_together_retry_at_different_moments(drawn) -> None:
    queues = [Failing(), Failing()]
    async with asyncio.TaskGroup() as tg:
        drainers = [tg.create_task(q.run_reports()) for q in queues]
        for q in queues:
            q.report_opened(pb.ConnectionOpenedRequest(connection_id="c1", session_id="s1"))
        for q in queues:
            assert await q.flush(10.0)
        for drainer in drainers:
            drainer.cancel()
    # Each queue paused three times, doubling, each pause drawn in [half, whole] of its step, and
    # waited at least that long before it sent again.
    own = [drawn[drainer] for drainer in drainers]
    for q, pauses in zip(queues, own, strict=True):
        assert [asked for asked, _ in pauses] == [RETRY_PAUSE_S * 2**n for n in range(FAILURES)]
        assert all(asked / 2 <= pause <= asked for asked, pause in pauses)
        assert len(q.sent_at) == FAILURES + 1
        assert all(gap >= pause for gap, (_, pause) in zip(gaps(q.sent_at), pauses, strict=True))
    assert [p for _, p in own[0]] != [p for _, p in own[1]]  # not in lockstep


async def test_failed_heartbeats_pause_a_jittered_while(drawn) -> None:
    queue = Failing()
    async with asyncio.TaskGroup() as tg:
        beating = tg.create_task(queue.run_heartbeats(list))
        await asyncio.wait_for(queue.answered.wait(), 20)
        beating.cancel()
    # The first pause (0.5 s) is cut to the interval (0.4 s), then the interval it stays.
    [pauses] = drawn.values()
    assert [asked for asked, _ in pauses] == [0.4] * FAILURES
    assert all(0.2 <= pause <= 0.4 for _, pause in pauses)
    assert len({pause for _, pause in pauses}) == FAILURES
    assert all(gap >= pause for gap, (_, pause) in zip(gaps(queue.heartbeat_at), pauses, strict=True))
