"""The health replica's own gRPC server: ProbeServer is an admin call (the admin token or an admin
certificate), grpc.health.v1 stays open, an open port off loopback refuses to start, reflection is opt-in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2 as std_health_pb2
from grpc_health.v1 import health_pb2_grpc as std_health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from rdbroker_health import app
from rdbroker_health.__main__ import main
from rdbroker_health.config import HealthSettings
from rdbroker_health.errors import ConfigError
from rdbroker_proto.v1 import health_pb2, health_pb2_grpc
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.unit.common.test_tls import Authority, Issued, spiffe
from tests.unit.health.fake_broker import FakeBroker, serving
from tests.unit.health.support import fast_settings, wait_until

ADMIN_TOKEN = "health-admin-token"
TIMEOUT_S = 5.0


@contextlib.asynccontextmanager
async def replica(**overrides: Any) -> AsyncIterator[int]:
    """A health replica (against a fake broker) serving its gRPC port on 127.0.0.1; yields the port."""
    broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    async with serving(broker) as broker_address:
        stop = asyncio.Event()
        ports: list[int] = []
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                app.run(fast_settings(broker_address, **overrides), stop, on_listening=ports.append)
            )
            try:
                await wait_until(lambda: bool(ports))
                yield ports[0]
            finally:
                stop.set()


async def probe(channel: grpc.aio.Channel, address: str, metadata: tuple[tuple[str, str], ...] = ()) -> str:
    try:
        answer = await health_pb2_grpc.HealthStub(channel).ProbeServer(
            health_pb2.ProbeServerRequest(address=address), metadata=metadata, timeout=TIMEOUT_S
        )
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "ok" if answer.rdp_ok else "probe failed"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_probe_server_needs_the_admin_token() -> None:
    async with (
        FakeRdpServer(mode="neg_failure") as rdp,
        replica(grpc_admin_token=SecretStr(ADMIN_TOKEN)) as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        assert await probe(channel, rdp.address, bearer(ADMIN_TOKEN)) == "ok"
        assert (await probe(channel, rdp.address)).startswith(
            "UNAUTHENTICATED: the health replica needs credentials"
        )
        assert (await probe(channel, rdp.address, bearer("wrong"))).startswith("UNAUTHENTICATED")
        answer = await std_health_pb2_grpc.HealthStub(channel).Check(
            std_health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
        )
        assert answer.status == std_health_pb2.HealthCheckResponse.SERVING  # kubelet probes: open
    assert len(rdp.first_packets) == 1  # the refused calls probed nothing


def secure_channel(port: int, ca: Authority, client: Issued) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        ca.ca_path.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def test_probe_server_under_mutual_tls_needs_an_admin_certificate(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "farm")
    # The replica serves with its own certificate (server auth) and presents it to the broker.
    own = ca.issue("health", server=True, uris=[spiffe("health")])
    tls = {"tls_ca": str(ca.ca_path), "tls_cert": str(own.cert), "tls_key": str(own.key)}
    admin = ca.issue("operator", server=False, uris=[spiffe("admin")])
    other = ca.issue("health-2", server=False, uris=[spiffe("health")])
    async with FakeRdpServer(mode="neg_failure") as rdp, replica(**tls) as port:
        async with secure_channel(port, ca, admin) as channel:
            assert await probe(channel, rdp.address) == "ok"
        async with secure_channel(port, ca, other) as channel:
            got = await probe(channel, rdp.address)
    assert got.startswith(f"PERMISSION_DENIED: {spiffe('health')} (role health) may not call ProbeServer")


async def test_probe_server_on_loopback_without_credentials_is_open() -> None:
    async with (
        FakeRdpServer(mode="neg_failure") as rdp,
        replica() as port,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        assert await probe(channel, rdp.address) == "ok"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"grpc_listen": "0.0.0.0:0"}, "the health replica would serve gRPC on 0.0.0.0:0 to anyone"),
        # 192.0.2.1 (TEST-NET-1) is no address of this host: past the check, binding fails.
        ({"grpc_listen": "192.0.2.1:0", "insecure_grpc": True}, "cannot listen on 192.0.2.1:0"),
        (
            {"grpc_listen": "192.0.2.1:0", "grpc_admin_token": SecretStr(ADMIN_TOKEN)},
            "cannot listen on 192.0.2.1:0",
        ),
    ],
)
async def test_an_open_port_off_loopback_refuses_to_start(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        await app.run(fast_settings("127.0.0.1:1", **overrides), asyncio.Event())
    assert str(caught.value).startswith(message)


class _NoTelemetry:
    def shutdown(self) -> None:
        pass


def test_the_command_refuses_in_one_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The process's logging and telemetry stay pytest's (a flush would disturb the shared Prometheus reader).
    monkeypatch.setattr("rdbroker_common.logs.configure", lambda *a, **k: None)
    monkeypatch.setattr("rdbroker_common.telemetry.setup", lambda *a, **k: _NoTelemetry())
    with caplog.at_level(logging.ERROR, logger="rdbroker_health"):
        assert main(["--broker", "127.0.0.1:1", "--grpc-listen", "0.0.0.0:0"]) == 2
    [record] = [r for r in caplog.records if r.name == "rdbroker_health"]
    assert record.getMessage().startswith(
        "cannot start: the health replica would serve gRPC on 0.0.0.0:0 to anyone: "
        "set RDBROKER_GRPC_ADMIN_TOKEN"
    )
    assert "\n" not in record.getMessage()


def test_tokens_are_not_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--broker-token-file", "--insecure-grpc", "--grpc-reflection", "--grpc-trust-domain"):
        assert flag in out
    assert "--broker-token " not in out
    assert "--grpc-admin-token" not in out


def test_a_bad_trust_domain_is_a_settings_error() -> None:
    with pytest.raises(ValueError, match="not a SPIFFE trust domain"):
        HealthSettings(grpc_trust_domain="spiffe://x")


async def list_services(port: int) -> set[str] | str:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT_S
        )
        try:
            return {s.name async for r in replies for s in r.list_services_response.service}
        except grpc.aio.AioRpcError as exc:
            return exc.code().name


async def test_reflection_is_off_unless_asked() -> None:
    async with replica() as port:
        assert await list_services(port) == "UNIMPLEMENTED"
    async with replica(grpc_reflection=True) as port:
        names = await list_services(port)
    assert isinstance(names, set)
    assert "rdbroker.v1.Health" in names
