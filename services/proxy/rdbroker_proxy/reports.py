"""The proxy's report queue and heartbeat loop, whatever carries the calls (gRPC or in-process).

Opened/Closed reports go into a bounded queue drained by one background task: the data path only
appends. A broker that is briefly away delays reports; it does not lose them unless the queue
overflows, and what overflows is counted and logged. Each drain sends up to REPORT_BATCH reports in
one call. A batch that could not be sent goes back to the front and the drain pauses, RETRY_PAUSE_S
doubling up to MAX_BACKOFF_S: a schedule of the queue, not a retry of one call (the next batch takes
in the reports queued meanwhile), so it is not tenacity's retry of a call. Each pause, and each pause
between failed heartbeats, is drawn between half its length and its length (`jittered`): the proxies
of a farm that lost their broker together do not all come back in the same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy import metrics
from rdbroker_proxy.errors import BrokerUnavailable

log = logging.getLogger(__name__)

# A report the broker answered with any other code than a retryable one (NOT_FOUND, ABORTED,
# INVALID_ARGUMENT, ...) would be refused again: it is dropped and counted, so one bad report cannot
# stall the queue behind it.
REPORT_BATCH = 64  # reports per ReportConnections call (the broker takes up to 1000)
# A short batch waits this long to fill up: without it a busy proxy sent a call per 3-5 reports.
REPORT_LINGER_S = 0.02
RETRY_PAUSE_S = 0.05
MAX_BACKOFF_S = 5.0
HEARTBEAT_RETRY_S = 0.5  # the first pause after a failed heartbeat (then doubling up to the interval)

ReportKind = Literal["opened", "closed"]
Report = tuple[ReportKind, pb.ConnectionOpenedRequest | pb.ConnectionClosedRequest]


def jittered(pause_s: float) -> float:
    """A pause drawn between half `pause_s` and `pause_s` (equal jitter: never a tight loop)."""
    return random.uniform(pause_s / 2, pause_s)


class QueuedReports(ABC):
    """The report queue and the heartbeat loop, whatever carries the calls: a subclass sends a batch
    (`_send_batch`) and a heartbeat (`_heartbeat`)."""

    def __init__(
        self,
        proxy_id: str,
        *,
        report_buffer: int = 10000,
        report_linger_s: float = REPORT_LINGER_S,
        heartbeat_interval_s: float = 5.0,
    ) -> None:
        self.proxy_id = proxy_id
        self.report_buffer = report_buffer
        self.report_linger_s = report_linger_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._reports: deque[Report] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.dropped_reports = 0  # past the buffer bound
        self.rejected_reports = 0  # refused by a broker
        self.sent_reports = 0
        self._last_drop_log = 0.0

    @abstractmethod
    async def _send_batch(self, batch: list[Report]) -> list[Report]:
        """Send a batch; answers what could not be sent, in order."""

    @abstractmethod
    async def _heartbeat(self, request: pb.ProxyHeartbeatRequest) -> pb.ProxyHeartbeatResponse:
        """One heartbeat; raises BrokerUnavailable."""

    # -- reports -------------------------------------------------------------------------------

    def report_opened(self, request: pb.ConnectionOpenedRequest) -> None:
        self._enqueue(("opened", request))

    def report_closed(self, request: pb.ConnectionClosedRequest) -> None:
        self._enqueue(("closed", request))

    @property
    def pending_reports(self) -> int:
        return len(self._reports)

    def _enqueue(self, report: Report) -> None:
        if len(self._reports) >= self.report_buffer:
            self._reports.popleft()  # the oldest goes first: newer reports describe the present
            self.dropped_reports += 1
            metrics.report_drops.add(1, metrics.DROP_BUFFER_FULL)
            now = time.monotonic()
            if now - self._last_drop_log >= 10.0:
                self._last_drop_log = now
                log.warning(
                    "report buffer full: dropping the oldest reports",
                    extra={"dropped_reports": self.dropped_reports, "report_buffer": self.report_buffer},
                )
        self._reports.append(report)
        self._idle.clear()
        self._wakeup.set()

    async def run_reports(self) -> None:
        """Drain the report queue forever (cancel to stop; `flush()` first to send what is left)."""
        backoff = RETRY_PAUSE_S
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._reports:
                if len(self._reports) < REPORT_BATCH and self.report_linger_s > 0:
                    await asyncio.sleep(self.report_linger_s)
                batch = [self._reports.popleft() for _ in range(min(REPORT_BATCH, len(self._reports)))]
                unsent = await self._send_batch(batch)
                if unsent:
                    self._reports.extendleft(reversed(unsent))
                    await asyncio.sleep(jittered(backoff))
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                else:
                    backoff = RETRY_PAUSE_S
            self._idle.set()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued report is sent (True) or the timeout passes (False)."""
        if not self._reports and self._idle.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
                return True
        return False

    def _rejected(
        self, kind: ReportKind, report: pb.ConnectionOpenedRequest | pb.ConnectionClosedRequest, reason: str
    ) -> None:
        self.rejected_reports += 1
        metrics.report_drops.add(1, metrics.DROP_REJECTED)
        log.warning(
            "broker rejected a %s report: %s", kind, reason, extra={"connection_id": report.connection_id}
        )

    def _answered(self, batch: list[Report], answer: pb.ReportConnectionsResponse) -> None:
        """Count a batch the broker took, logging each event it refused."""
        reasons = list(answer.rejected_reasons)
        refused: set[int] = set()
        for n, position in enumerate(answer.rejected):
            if position < len(batch) and position not in refused:  # a broker's answer is input too
                refused.add(position)
                self._rejected(*batch[position], reasons[n] if n < len(reasons) else "refused")
        self.sent_reports += len(batch) - len(refused)

    # -- heartbeats ----------------------------------------------------------------------------

    async def run_heartbeats(self, connection_ids: Callable[[], Sequence[str]]) -> None:
        """Heartbeat now and then every interval the broker asks for (cancel to stop).

        A missed heartbeat is not queued: the next one carries the current state. After a failure
        the next try comes sooner (HEARTBEAT_RETRY_S, doubling up to the interval), so a broker or
        database that comes back hears this proxy within a second or so, long before it could judge
        it silent.
        """
        interval = self.heartbeat_interval_s
        retry = HEARTBEAT_RETRY_S
        failing = False
        while True:
            ids = list(connection_ids())
            request = pb.ProxyHeartbeatRequest(
                proxy_id=self.proxy_id, active_connections=len(ids), connection_ids=ids
            )
            try:
                answer = await self._heartbeat(request)
                if answer.heartbeat_interval_ms:
                    interval = min(max(answer.heartbeat_interval_ms / 1000, 0.1), 300.0)
            except BrokerUnavailable as exc:
                metrics.broker_unreachable.add(1, metrics.UNREACHABLE_HEARTBEAT)
                log.log(logging.DEBUG if failing else logging.WARNING, "heartbeat failed: %s", exc)
                failing = True
                await asyncio.sleep(jittered(min(retry, interval)))
                retry = min(retry * 2, interval)
                continue
            if failing:
                log.info("heartbeats work again")
                failing, retry = False, HEARTBEAT_RETRY_S
            await asyncio.sleep(interval)
