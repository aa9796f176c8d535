"""BrokerChannels on real grpc.aio channels to 127.0.0.1: the order of a call, certificate renewals,
renewal of failing `dns:///` channels, and closing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from rdbroker_common import tls
from rdbroker_common.broker_channels import BrokerChannels
from rdbroker_common.broker_token import BrokerToken
from rdbroker_common.settings import Renewal
from rdbroker_proto.v1.broker_pb2_grpc import BrokerStub
from tests.support.postgres import free_port
from tests.unit.common.test_tls import Authority
from tests.unit.common.tls_files import SecretVolume

SHUTDOWN = grpc.ChannelConnectivity.SHUTDOWN
FAILING = grpc.ChannelConnectivity.TRANSIENT_FAILURE


@pytest.fixture
async def live() -> AsyncIterator[str]:
    """A gRPC server (no services) that channels connect to."""
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def until_state(channel: grpc.aio.Channel, wanted: grpc.ChannelConnectivity) -> None:
    """Wait for `channel` to reach `wanted` (connecting it while it is idle), at most 10 s."""
    async with asyncio.timeout(10.0):
        state = channel.get_state(try_to_connect=wanted is FAILING)
        while state is not wanted:
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=wanted is FAILING)


async def test_each_kind_rotates_on_its_own_and_failing_channels_come_last(live: str) -> None:
    channels = BrokerChannels([live, live, f"127.0.0.1:{free_port()}"], BrokerStub)
    try:
        assert channels.order("route") == [0, 1, 2]
        assert channels.order("route") == [1, 2, 0]
        assert channels.order("report") == [0, 1, 2]  # reports do not skew Route's rotation
        await until_state(channels.channel(2), FAILING)
        assert channels.order("route") == [0, 1, 2]  # its turn began at 2, which is failing
        assert channels.order("report") == [1, 0, 2]
    finally:
        await channels.close()


async def test_sticky_channels_start_at_the_one_that_last_answered(live: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    channels = BrokerChannels([live, live, dead], BrokerStub, sticky=True)
    try:
        assert channels.order() == channels.order() == [0, 1, 2]
        channels.answered(1)
        assert channels.order() == channels.order() == [1, 2, 0]
        channels.answered(2)
        await until_state(channels.channel(2), FAILING)
        assert channels.order() == [0, 1, 2]  # it answered last, but it is failing now
        assert channels.order("other") == [0, 1, 2]  # each kind has its own
    finally:
        await channels.close()


async def test_renewed_certificate_files_give_new_channels_and_retire_the_old_after_the_grace(
    tmp_path: Path,
) -> None:
    (tmp_path / "secret").mkdir()
    volume = SecretVolume(tmp_path / "secret")
    old_ca, new_ca = Authority(tmp_path, "old"), Authority(tmp_path, "new")
    volume.install(old_ca, old_ca.issue("client-old", server=False))
    client_tls = tls.ClientTls(tls.TlsFiles(*volume.paths), interval_s=0.0)
    targets = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    channels = BrokerChannels(targets, BrokerStub, client_tls=client_tls, retire_grace_s=0.2)
    try:
        old = [channels.channel(i) for i in range(2)]
        old_stub = channels.stub(0)
        channels.order()
        assert [channels.channel(i) for i in range(2)] == old  # the files did not change
        volume.install(new_ca, new_ca.issue("client-new", server=False))
        channels.order()
        new = [channels.channel(i) for i in range(2)]
        assert all(n is not o for n, o in zip(new, old, strict=True))
        assert channels.stub(0) is not old_stub
        # Calls in flight on the old channels may finish: they close only after the grace.
        assert all(o.get_state() is not SHUTDOWN for o in old)
        for channel in old:
            await until_state(channel, SHUTDOWN)
        assert all(n.get_state() is not SHUTDOWN for n in new)
    finally:
        await channels.close()


@pytest.mark.parametrize("grace_begun", [False, True])
async def test_close_closes_every_channel_the_retiring_ones_included(
    tmp_path: Path, grace_begun: bool
) -> None:
    (tmp_path / "secret").mkdir()
    volume = SecretVolume(tmp_path / "secret")
    ca = Authority(tmp_path, "ca")
    volume.install(ca, ca.issue("client-1", server=False))
    client_tls = tls.ClientTls(tls.TlsFiles(*volume.paths), interval_s=0.0)
    channels = BrokerChannels([f"127.0.0.1:{free_port()}"], BrokerStub, client_tls=client_tls)
    old = channels.channel(0)
    volume.install(ca, ca.issue("client-2", server=False))
    channels.order()
    new = channels.channel(0)
    assert new is not old
    if grace_begun:
        await asyncio.sleep(0)  # the retiring task starts waiting out its grace
    await channels.close()  # well before the default grace of 30 s
    assert (old.get_state(), new.get_state()) == (SHUTDOWN, SHUTDOWN)


@pytest.mark.parametrize(("scheme", "renewed"), [("dns:///", True), ("", False)])
async def test_a_dns_channel_failing_for_a_while_is_replaced(scheme: str, renewed: bool) -> None:
    now = [100.0]
    channels = BrokerChannels(
        [f"{scheme}127.0.0.1:{free_port()}"],
        BrokerStub,
        renewal=Renewal(5.0, lambda: now[0]),
        retire_grace_s=0.0,
    )
    try:
        first = channels.channel(0)
        await until_state(first, FAILING)
        channels.order()
        assert channels.channel(0) is first  # not failing for long enough yet
        now[0] += 5.0
        channels.order()
        assert (channels.channel(0) is not first) == renewed
        if renewed:
            await until_state(first, SHUTDOWN)
    finally:
        await channels.close()


async def test_metadata_carries_the_token_beside_what_the_call_has() -> None:
    channels = BrokerChannels(["127.0.0.1:1"], BrokerStub, token=BrokerToken("s3cret"))
    bare = BrokerChannels(["127.0.0.1:1"], BrokerStub)
    try:
        base = grpc.aio.Metadata(("traceparent", "00-abc-def-01"))
        assert list(channels.metadata(base)) == [
            ("traceparent", "00-abc-def-01"),
            ("authorization", "Bearer s3cret"),
        ]
        assert list(channels.metadata()) == [("authorization", "Bearer s3cret")]
        assert list(bare.metadata()) == []
    finally:
        await channels.close()
        await bare.close()


async def test_no_targets_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one broker address"):
        BrokerChannels([], BrokerStub)
