"""The proxy's broker channels follow renewed certificate files: after a rotation to a new CA, the next
Route goes over a channel with the new credentials, which is the only way a new-CA broker answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdbroker_common import tls
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proxy.errors import BrokerUnavailable
from rdbroker_proxy.routing import BrokerClient
from tests.support.postgres import free_port
from tests.unit.common.test_tls import Authority
from tests.unit.common.tls_files import SecretVolume, tls_broker
from tests.unit.proxy.fake_broker import Directory, FakeBroker

SERVER = "127.0.0.1:40001"


@pytest.fixture
def volume(tmp_path: Path) -> SecretVolume:
    root = tmp_path / "secret"
    root.mkdir()
    return SecretVolume(root)


@pytest.mark.parametrize("follow", [True, False])
async def test_the_next_route_uses_the_renewed_credentials(
    tmp_path: Path, volume: SecretVolume, follow: bool
) -> None:
    old_ca, new_ca = Authority(tmp_path, "old"), Authority(tmp_path, "new")
    volume.install(old_ca, old_ca.issue("proxy-old", server=False))
    interval = 0.0 if follow else 3600.0
    client_tls = tls.ClientTls(tls.TlsFiles(*volume.paths), interval_s=interval)
    port = free_port()
    directory = Directory({"": [SERVER]})
    client = BrokerClient(
        [f"127.0.0.1:{port}"],
        proxy_id="p",
        route_timeout_s=2.0,
        route_attempt_timeout_s=1.0,
        client_tls=client_tls,
    )
    try:
        async with tls_broker(FakeBroker(directory), old_ca, port):  # type: ignore[abstract]
            first = await client.route(pb.RouteRequest(connection_id="c1", proxy_id="p", cookie="alice"))
            assert first.server_address == SERVER
        volume.install(new_ca, new_ca.issue("proxy-new", server=False))
        broker = FakeBroker(directory)  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
        async with tls_broker(broker, new_ca, port):
            request = pb.RouteRequest(connection_id="c2", proxy_id="p", cookie="bob")
            if follow:
                second = await client.route(request)
                assert second.server_address == SERVER
                assert broker.route_calls == 1
            else:  # the control: the channel of the old credentials cannot reach the new broker
                with pytest.raises(BrokerUnavailable):
                    await client.route(request)
                assert broker.route_calls == 0
        # the old channel, closing after its grace
        assert len(client.channels._retiring) == (1 if follow else 0)
    finally:
        await client.close()
    assert not client.channels._retiring
