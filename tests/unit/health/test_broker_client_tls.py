"""The health replica's broker channels follow renewed certificate files (a rotation to a new CA)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdbroker_common import tls
from rdbroker_health.errors import BrokerUnavailable
from rdbroker_health.rpc.broker_client import BrokerClient
from tests.support.postgres import free_port
from tests.unit.common.test_tls import Authority
from tests.unit.common.tls_files import SecretVolume, tls_broker
from tests.unit.health.fake_broker import FakeBroker


@pytest.mark.parametrize("follow", [True, False])
async def test_calls_after_a_ca_rotation_use_the_new_credentials(tmp_path: Path, follow: bool) -> None:
    (tmp_path / "secret").mkdir()
    volume = SecretVolume(tmp_path / "secret")
    old_ca, new_ca = Authority(tmp_path, "old"), Authority(tmp_path, "new")
    volume.install(old_ca, old_ca.issue("health-old", server=False))
    client_tls = tls.ClientTls(tls.TlsFiles(*volume.paths), interval_s=0.0 if follow else 3600.0)
    broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    broker.add("10.0.0.1:3389")
    port = free_port()
    client = BrokerClient([f"127.0.0.1:{port}"], timeout_s=2.0, client_tls=client_tls)
    try:
        async with tls_broker(broker, old_ca, port):
            assert len(await client.claim("r1", 1000)) == 1
        volume.install(new_ca, new_ca.issue("health-new", server=False))
        async with tls_broker(broker, new_ca, port):
            if follow:
                assert len(await client.claim("r1", 1000)) == 1
                assert broker.claims == 2
            else:  # the control: the old credentials cannot reach the new broker
                with pytest.raises(BrokerUnavailable):
                    await client.claim("r1", 1000)
                assert broker.claims == 1
    finally:
        await client.close()
