"""The gRPC channels a proxy or health replica keeps to the broker replicas.

Brokers are stateless replicas over one database, so any of them answers any call: a client keeps one
channel per target and tries them in an order that puts the channels in TRANSIENT_FAILURE last, so a
dead broker costs one failed call and not one per call. Besides, the channels:

- follow renewed client certificate files (`client_tls`): when the files change (looked at at most every
  few seconds), new channels take the next calls and the replaced ones close after a grace period, so
  calls in flight finish on them (`rdbroker_common.tls`);
- replace a `dns:///` channel that has been failing for a few seconds: the new one resolves the name at
  once (brokers back after an outage), where the old one waits out its resolver's backoff (`Renewal`);
- carry the bearer token (`token`) in each call's metadata.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import grpc

from rdbroker_common import tls
from rdbroker_common.broker_token import BrokerToken
from rdbroker_common.settings import Renewal, channel_options

log = logging.getLogger(__name__)

S = TypeVar("S")

ChannelOption = tuple[str, str | int]
_FAILING = grpc.ChannelConnectivity.TRANSIENT_FAILURE


class BrokerChannels(Generic[S]):
    """One channel and one stub per broker target. Build it inside the event loop; `close()` it at the end.

    A client asks for the order of a call, sends to the stub of each index in turn, and says which one
    answered::

        channels = BrokerChannels(targets, BrokerStub, options=MY_OPTIONS, client_tls=..., token=...)
        for index in channels.order("route"):
            try:
                answer = await channels.stub(index).Route(request, metadata=channels.metadata())
            except grpc.aio.AioRpcError as exc:
                ...  # log with channels.targets[index]; next index, or give up
            else:
                channels.answered(index, "route")
                return answer
        ...
        await channels.close()

    `order(kind)` is every index once. Each `kind` (any string: "route", "report", ...) has its own
    rotation, so one kind of call does not skew another's. With `sticky=False` each `order(kind)` starts
    one further along (balance); with `sticky=True` it starts at the index last passed to
    `answered(index, kind)` (calls stay on the broker that answers). Either way the channels in
    TRANSIENT_FAILURE come last. `order()` is also where certificate renewals and failing `dns:///`
    channels are noticed, so fetch the stub with `stub(index)` after it, never keep one across calls.

    `metadata(base)` adds the token to `base` (for example the trace context of a call), or to an
    empty `grpc.aio.Metadata`.
    """

    def __init__(
        self,
        targets: Sequence[str],
        stub: Callable[[grpc.aio.Channel], S],
        *,
        options: Sequence[ChannelOption] = (),
        credentials: grpc.ChannelCredentials | None = None,
        client_tls: tls.ClientTls | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        token: BrokerToken | None = None,
        sticky: bool = False,
        renewal: Renewal | None = None,
        retire_grace_s: float = tls.RETIRE_GRACE_S,
    ) -> None:
        """`options` are the caller's channel options (a `dns:///` target gets round-robin on top);
        `client_tls`, when given, replaces `credentials` and is followed."""
        if not targets:
            raise ValueError("at least one broker address is needed")
        self.targets = list(targets)
        self.options = list(options)
        self.sticky = sticky
        self.renewal = renewal or Renewal()
        self.retire_grace_s = retire_grace_s
        self._make_stub = stub
        self._tls = client_tls
        self._credentials = client_tls.credentials if client_tls is not None else credentials
        self._interceptors = list(interceptors)
        self._token = token or BrokerToken()
        self._channels = [self._channel(t) for t in self.targets]
        self._stubs = [stub(c) for c in self._channels]
        self._start: dict[str, int] = {}
        # Replaced channels by the task that closes them after the grace.
        self._retiring: dict[asyncio.Task[None], list[grpc.aio.Channel]] = {}

    def order(self, kind: str = "") -> list[int]:
        """Every index once, for one call of `kind`: rotated, the ones known to be failing last."""
        self._follow_tls()
        self._renew_failing()
        n = len(self._channels)
        start = self._start.get(kind, 0) % n
        if not self.sticky:
            self._start[kind] = (start + 1) % n
        rotated = [(start + step) % n for step in range(n)]
        if n == 1:
            return rotated
        healthy = [i for i in rotated if self._channels[i].get_state() != _FAILING]
        return healthy + [i for i in rotated if i not in healthy]

    def answered(self, index: int, kind: str = "") -> None:
        """After a call of `kind` that `index` answered: with `sticky`, the next calls start there."""
        if self.sticky and self._start.get(kind, 0) != index:
            log.info("broker calls now go to %s", self.targets[index])
            self._start[kind] = index

    def stub(self, index: int) -> S:
        return self._stubs[index]

    def channel(self, index: int) -> grpc.aio.Channel:
        return self._channels[index]

    def metadata(self, base: grpc.aio.Metadata | None = None) -> grpc.aio.Metadata:
        """`base` (or new metadata) with the bearer token, if one is configured."""
        metadata = base if base is not None else grpc.aio.Metadata()
        for key, value in self._token.metadata():
            metadata.add(key, value)
        return metadata

    async def close(self) -> None:
        """Close every channel now, the ones waiting out their grace included."""
        retiring = [c for channels in self._retiring.values() for c in channels]
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        # A task cancelled before it ever ran closes nothing: close its channels here.
        for channel in [*retiring, *self._channels]:
            await channel.close()

    def _channel(self, target: str) -> grpc.aio.Channel:
        # A `dns:///` target is one channel balanced round-robin over every address the name resolves to.
        options = [*self.options, *channel_options(target)]
        if self._credentials is not None:
            return grpc.aio.secure_channel(
                target, self._credentials, options=options, interceptors=self._interceptors
            )
        return grpc.aio.insecure_channel(target, options=options, interceptors=self._interceptors)

    def _follow_tls(self) -> None:
        """New channels when the certificate files changed; calls in flight finish on the old ones."""
        if self._tls is None or not self._tls.changed():
            return
        old = self._channels
        self._credentials = self._tls.credentials
        self._channels = [self._channel(t) for t in self.targets]
        self._stubs = [self._make_stub(c) for c in self._channels]
        log.info("TLS files changed: new broker channels")
        self._retire(old)

    def _renew_failing(self) -> None:
        for index, channel in enumerate(self._channels):
            target = self.targets[index]
            if self.renewal.due(index, target, channel.get_state() == _FAILING):
                log.info("broker channel to %s failing: a new one resolves the name again", target)
                self._channels[index] = self._channel(target)
                self._stubs[index] = self._make_stub(self._channels[index])
                self._retire([channel])

    def _retire(self, channels: list[grpc.aio.Channel]) -> None:
        task = tls.retire_channels(channels, self.retire_grace_s)
        self._retiring[task] = channels
        task.add_done_callback(lambda done: self._retiring.pop(done, None))
