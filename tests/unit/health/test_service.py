"""The replica as a service: rdbroker.v1.Health.ProbeServer, grpc.health.v1, shutdown, the command line."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2 as std_health_pb2
from grpc_health.v1 import health_pb2_grpc as std_health_pb2_grpc

from rdbroker_common import tls
from rdbroker_common.bearer import Tokens
from rdbroker_health import app
from rdbroker_health.__main__ import main
from rdbroker_health.errors import ConfigError
from rdbroker_health.probes.rdp import probe_rdp
from rdbroker_health.rpc.servicer import HealthServicer
from rdbroker_proto.v1 import broker_pb2_grpc, health_pb2, health_pb2_grpc
from rdbroker_rdp.fakeserver import FakeRdpServer
from tests.support.postgres import free_port
from tests.unit.health.fake_broker import FakeBroker, serving
from tests.unit.health.support import fast_settings, wait_until

ROOT = Path(__file__).resolve().parents[3]


async def probe_server_stub(http: httpx.AsyncClient):
    server = grpc.aio.server()
    servicer = HealthServicer(fast_settings("127.0.0.1:1", max_on_demand_timeout_s=5), http, probe_rdp)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, channel, health_pb2_grpc.HealthStub(channel)


async def test_probe_server_answers_rdp_and_agent() -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda request: httpx.Response(200, text="30")))
    server, channel, stub = await probe_server_stub(http)
    try:
        async with FakeRdpServer(mode="neg_failure") as rdp:
            answer = await stub.ProbeServer(
                health_pb2.ProbeServerRequest(address=rdp.address, agent_url="http://agent.test/load"),
                timeout=5,
            )
        assert answer.rdp_ok
        assert (answer.rdp_detail, answer.failure_code) == ("neg_failure", 2)
        assert (answer.load, answer.agent_detail) == (30, "load=30 state=up")
        async with FakeRdpServer(mode="silent") as rdp:
            answer = await stub.ProbeServer(
                health_pb2.ProbeServerRequest(address=rdp.address, timeout_ms=200)
            )
        assert not answer.rdp_ok
        assert answer.rdp_detail == "timeout waiting for answer after 0.2s"
        assert answer.load == -1
    finally:
        await channel.close()
        await server.stop(0)
        await http.aclose()


async def test_probe_server_sends_the_token_only_to_a_held_servers_agent() -> None:
    sent: dict[str, str | None] = {}

    def agent(request: httpx.Request) -> httpx.Response:
        sent[str(request.url)] = request.headers.get("authorization")
        ok = request.headers.get("authorization") == "Bearer replica-token-0123"
        return httpx.Response(200, text="30") if ok else httpx.Response(401)

    http = httpx.AsyncClient(transport=httpx.MockTransport(agent))
    held = "http://agent.held/load"
    servicer = HealthServicer(
        fast_settings("127.0.0.1:1", max_on_demand_timeout_s=5),
        http,
        probe_rdp,
        agent_tokens=Tokens(fixed="replica-token-0123"),
        trusted_agent_urls=lambda: {held},
    )
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel, FakeRdpServer() as rdp:
            stub = health_pb2_grpc.HealthStub(channel)
            answer = await stub.ProbeServer(
                health_pb2.ProbeServerRequest(address=rdp.address, agent_url=held), timeout=5
            )
            assert (answer.load, answer.agent_detail) == (30, "load=30 state=up")
            # A URL the caller names: whoever answers there must not get the token.
            answer = await stub.ProbeServer(
                health_pb2.ProbeServerRequest(address=rdp.address, agent_url="http://elsewhere/load"),
                timeout=5,
            )
            assert answer.load == -1
            assert answer.agent_detail == (
                "agent requires a token (401): on-demand probes send the agent token only to the "
                "agent_url of a server this replica probes"
            )
    finally:
        await server.stop(0)
        await http.aclose()
    assert sent == {held: "Bearer replica-token-0123", "http://elsewhere/load": None}


def test_the_agent_token_is_no_flag_and_a_bad_token_file_stops_the_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as flag:
        main(["--agent-token", "x"])  # a command line shows in `ps`; nor an abbreviation of -file
    assert flag.value.code == 2
    assert "unrecognized arguments: --agent-token" in capsys.readouterr().err
    settings = fast_settings("127.0.0.1:1", agent_token_file=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"token file .* cannot read"):
        asyncio.run(app.run(settings, asyncio.Event()))
    both = fast_settings("127.0.0.1:1", agent_token="t" * 20, agent_token_file=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="set RDBROKER_AGENT_TOKEN or --agent-token-file, not both"):
        asyncio.run(app.run(both, asyncio.Event()))
    assert "t" * 20 not in repr(both)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"address": ""}, "address"),
        ({"address": "ts1"}, "missing port"),
        ({"address": "ts1:99999"}, "bad port"),
        ({"address": "ts1:3389", "agent_url": "ftp://x/load"}, "http(s) URL"),
        ({"address": "ts1:3389", "agent_url": "http://"}, "agent_url"),
        ({"address": "ts1:3389", "timeout_ms": 60000}, "limit"),
    ],
)
async def test_probe_server_refuses_bad_input(request_fields: dict[str, object], message: str) -> None:
    http = httpx.AsyncClient()
    server, channel, stub = await probe_server_stub(http)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ProbeServer(health_pb2.ProbeServerRequest(**request_fields), timeout=5)  # type: ignore[arg-type]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (info.value.details() or "")
    finally:
        await channel.close()
        await server.stop(0)
        await http.aclose()


async def test_app_serves_probes_and_goes_not_serving_on_stop() -> None:
    broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    async with FakeRdpServer(mode="sink") as rdp, serving(broker) as broker_address:
        broker.add(rdp.address)
        settings = fast_settings(broker_address, shutdown_grace_s=1)
        stop = asyncio.Event()
        ports: list[int] = []
        async with asyncio.TaskGroup() as tg:
            tg.create_task(app.run(settings, stop, on_listening=ports.append))
            await wait_until(lambda: bool(ports))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as channel:
                health = std_health_pb2_grpc.HealthStub(channel)
                for name in ("", "rdbroker.v1.Health"):
                    answer = await health.Check(std_health_pb2.HealthCheckRequest(service=name), timeout=5)
                    assert answer.status == std_health_pb2.HealthCheckResponse.SERVING
                probe = await health_pb2_grpc.HealthStub(channel).ProbeServer(
                    health_pb2.ProbeServerRequest(address=rdp.address), timeout=5
                )
                assert probe.rdp_ok
                await wait_until(lambda: bool(broker.reports))  # the scheduler runs too
                watch = health.Watch(std_health_pb2.HealthCheckRequest(service=""))
                first = await watch.read()
                assert first.status == std_health_pb2.HealthCheckResponse.SERVING
                stop.set()
                second = await watch.read()
                assert second.status == std_health_pb2.HealthCheckResponse.NOT_SERVING
    assert broker.reports[0].result.rdp_ok


def test_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--broker", "no-port"]) == 2
    assert "missing port" in capsys.readouterr().err
    assert main(["--rise", "0"]) == 2


def test_the_command_runs_and_exits_on_sigterm() -> None:
    async def scenario() -> tuple[int, str]:
        broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
        async with FakeRdpServer(mode="sink") as rdp, serving(broker) as broker_address:
            broker.add(rdp.address)
            port = free_port()
            env = {**os.environ, "RDBROKER_PROBE_INTERVAL_S": "0.2", "RDBROKER_LEASE_MS": "300"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "rdbroker_health",
                "--broker",
                broker_address,
                "--grpc-listen",
                f"127.0.0.1:{port}",
                "--log-format",
                "text",
                cwd=ROOT,
                env=env,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await wait_until(lambda: bool(broker.reports), timeout_s=30)
                proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(30):
                    _, err = await proc.communicate()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            return proc.returncode or 0, err.decode()

    code, err = asyncio.run(scenario())
    assert code == 0, err
    assert "serving gRPC on port" in err
    assert "NOT_SERVING" in err


def test_rdbroker_health_help_lists_the_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "rdbroker_cli", "health", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for flag in ("--broker", "--grpc-listen", "--lease-ms", "--probe-interval-s", "--tls-ca"):
        assert flag in out


async def test_mutual_tls_to_the_broker_and_on_the_replicas_own_port(tmp_path: Path) -> None:
    from tests.unit.common.test_tls import Authority

    ca = Authority(tmp_path, "farm")
    broker_cert = ca.issue("broker", server=True)
    # The replica presents this to the broker (clientAuth); a real one also serves with it (serverAuth).
    replica_cert = ca.issue("health", server=False)
    broker = FakeBroker()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
    broker_server = grpc.aio.server()
    broker_pb2_grpc.add_BrokerServicer_to_server(broker, broker_server)
    credentials = tls.server_credentials(ca.ca_path, broker_cert.cert, broker_cert.key)
    assert credentials is not None
    broker_port = broker_server.add_secure_port("127.0.0.1:0", credentials)
    await broker_server.start()
    try:
        async with FakeRdpServer(mode="sink") as rdp:
            broker.add(rdp.address)
            settings = fast_settings(
                f"127.0.0.1:{broker_port}",
                tls_ca=str(ca.ca_path),
                tls_cert=str(replica_cert.cert),
                tls_key=str(replica_cert.key),
            )
            stop = asyncio.Event()
            ports: list[int] = []
            async with asyncio.TaskGroup() as tg:
                tg.create_task(app.run(settings, stop, on_listening=ports.append))
                await wait_until(lambda: bool(broker.reports))  # claimed and reported over mTLS
                await wait_until(lambda: bool(ports))
                plain = grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}")
                with pytest.raises(grpc.aio.AioRpcError):
                    await std_health_pb2_grpc.HealthStub(plain).Check(
                        std_health_pb2.HealthCheckRequest(), timeout=2
                    )
                await plain.close()
                stop.set()
    finally:
        await broker_server.stop(0)


async def test_partial_tls_settings_refuse_to_start() -> None:
    settings = fast_settings("127.0.0.1:1", tls_ca="/nonexistent/ca.crt")
    with pytest.raises(ConfigError, match="missing: --tls-cert, --tls-key"):
        await app.run(settings, asyncio.Event())
