"""gRPC authorization by role on a broker served in-process on PostgreSQL: each role (and no or wrong
credentials) against each Broker RPC, with bearer tokens and with client certificates made here; who the
use cases see as the caller; the start-up refusal of an open port off loopback; reflection."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr

from rdbroker_broker import callers
from rdbroker_broker.app import StartupError, serve
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.rpc.authz import METHOD_ROLES, SERVICE
from rdbroker_broker.service import BrokerService
from rdbroker_common import rpc_authz
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from tests.integration.broker.conftest import RunningBroker, running_broker, seed, server, settings_for
from tests.integration.broker.processes import broker_process
from tests.support import prom
from tests.support.audit import audit_rows
from tests.support.postgres import free_port
from tests.unit.common.test_tls import Authority, Issued, spiffe

A = "10.0.0.1:3389"
TOKENS = {"proxy": "proxy-token-1", "health": "health-token-2", "admin": "admin-token-3"}
TIMEOUT_S = 10.0
REASONS = (rpc_authz.NO_CREDENTIALS, rpc_authz.BAD_TOKEN, rpc_authz.WRONG_ROLE)


async def _all_answers(call: Any) -> None:
    async for _ in call:  # a stream refused by authorization raises its status here
        pass


ONE_CALL = pb.RouteCalls(
    calls=[pb.RouteCall(call_id=1, request=pb.RouteRequest(connection_id="c2", proxy_id="p1", cookie="bob"))]
)

# One harmless request per RPC: whether it succeeds does not matter, only whether authorization let
# it through to the servicer.
REQUESTS: dict[str, Callable[[broker_pb2_grpc.BrokerStub], Any]] = {
    "Route": lambda s: s.Route(pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="alice")),
    "RouteStream": lambda s: _all_answers(s.RouteStream(iter([ONE_CALL]))),
    "ConnectionOpened": lambda s: s.ConnectionOpened(
        pb.ConnectionOpenedRequest(session_id="s1", connection_id="c1", proxy_id="p1")
    ),
    "ConnectionClosed": lambda s: s.ConnectionClosed(
        pb.ConnectionClosedRequest(session_id="s1", connection_id="c1", proxy_id="p1")
    ),
    "ReportConnections": lambda s: s.ReportConnections(pb.ReportConnectionsRequest(proxy_id="p1")),
    "ProxyHeartbeat": lambda s: s.ProxyHeartbeat(pb.ProxyHeartbeatRequest(proxy_id="p1")),
    "LookupUserSessions": lambda s: s.LookupUserSessions(pb.LookupUserSessionsRequest(user="alice")),
    "ListServers": lambda s: s.ListServers(pb.ListServersRequest()),
    "SetServerState": lambda s: s.SetServerState(
        pb.SetServerStateRequest(address=A, admin_state=pb.ADMIN_STATE_ENABLED)
    ),
    "EndSession": lambda s: s.EndSession(pb.EndSessionRequest(session_id="no-such-session")),
    "ClaimProbeTargets": lambda s: s.ClaimProbeTargets(
        pb.ClaimProbeTargetsRequest(replica_id="h1", lease_ms=1000)
    ),
    "ReportProbeResults": lambda s: s.ReportProbeResults(pb.ReportProbeResultsRequest(replica_id="h1")),
    "ReportServerSessions": lambda s: s.ReportServerSessions(
        pb.ReportServerSessionsRequest(replica_id="h1", address=A)
    ),
}
PROXY_RPCS = {
    "Route",
    "RouteStream",
    "ConnectionOpened",
    "ConnectionClosed",
    "ReportConnections",
    "ProxyHeartbeat",
}
HEALTH_RPCS = {"ClaimProbeTargets", "ReportProbeResults", "ReportServerSessions"}
ADMIN_RPCS = {"LookupUserSessions", "ListServers", "SetServerState", "EndSession"}


def expected(caller: str) -> dict[str, str]:
    """What each RPC answers `caller`: "allowed" (reached the servicer) or the refusal's code."""
    own = {"proxy": PROXY_RPCS, "health": HEALTH_RPCS, "admin": ADMIN_RPCS}.get(caller)
    if own is None:
        return dict.fromkeys(REQUESTS, "UNAUTHENTICATED")
    return {rpc: "allowed" if rpc in own else "PERMISSION_DENIED" for rpc in REQUESTS}


def test_every_broker_rpc_has_its_role_in_the_table() -> None:
    names = {m.name for m in pb.DESCRIPTOR.services_by_name["Broker"].methods}
    assert names == set(REQUESTS) == PROXY_RPCS | HEALTH_RPCS | ADMIN_RPCS
    roles = {
        rpc: role
        for role, rpcs in (("proxy", PROXY_RPCS), ("health", HEALTH_RPCS), ("admin", ADMIN_RPCS))
        for rpc in rpcs
    }
    assert dict(METHOD_ROLES) == {f"/{SERVICE}/{rpc}": role for rpc, role in roles.items()}


def refusals(rpc: str) -> dict[str, int]:
    return {reason: rpc_authz.refused_count(reason, f"{SERVICE}/{rpc}") for reason in REASONS}


async def outcomes(
    stub: broker_pb2_grpc.BrokerStub, metadata: Sequence[tuple[str, str]] = ()
) -> dict[str, str]:
    """Call every RPC once; "allowed" when authorization let it through (whatever the servicer answered)."""
    found: dict[str, str] = {}
    for rpc, send in REQUESTS.items():
        before = refusals(rpc)
        code = grpc.StatusCode.OK
        try:
            await send(_with(stub, metadata))
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
        after = refusals(rpc)
        counted = {reason for reason in REASONS if after[reason] != before[reason]}
        if not counted:
            assert code is not grpc.StatusCode.UNAUTHENTICATED, rpc
            found[rpc] = "allowed"
        else:
            assert sum(after.values()) == sum(before.values()) + 1, rpc  # counted once
            want = "PERMISSION_DENIED" if counted == {rpc_authz.WRONG_ROLE} else "UNAUTHENTICATED"
            assert code.name == want, (rpc, code, counted)
            found[rpc] = code.name
    return found


class _With:
    """A stub whose calls all carry `metadata` and a timeout."""

    def __init__(self, stub: broker_pb2_grpc.BrokerStub, metadata: Sequence[tuple[str, str]]) -> None:
        self.stub, self.metadata = stub, tuple(metadata)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.stub, name)
        return lambda request: method(request, metadata=self.metadata, timeout=TIMEOUT_S)


def _with(stub: broker_pb2_grpc.BrokerStub, metadata: Sequence[tuple[str, str]]) -> Any:
    return _With(stub, metadata)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def with_tokens(url: str, **kw: Any) -> BrokerSettings:
    return settings_for(url, **{f"grpc_{role}_token": SecretStr(t) for role, t in TOKENS.items()}, **kw)


# --- tokens ----------------------------------------------------------------------------------------


async def test_each_token_calls_exactly_its_role_s_rpcs(pg_database_url: str, engine: Any) -> None:
    await seed(engine, server(A))
    async with running_broker(with_tokens(pg_database_url)) as broker:
        table = {
            "proxy": await outcomes(broker.stub, bearer(TOKENS["proxy"])),
            "health": await outcomes(broker.stub, bearer(TOKENS["health"])),
            "admin": await outcomes(broker.stub, bearer(TOKENS["admin"])),
            "none": await outcomes(broker.stub),
            "wrong": await outcomes(broker.stub, bearer("not-a-token")),
        }
    assert table == {caller: expected(caller) for caller in table}


async def test_refusals_say_what_to_do(pg_database_url: str, engine: Any) -> None:
    async with running_broker(with_tokens(pg_database_url)) as broker:
        with pytest.raises(grpc.aio.AioRpcError) as none:
            await broker.stub.ListServers(pb.ListServersRequest(), timeout=TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await broker.stub.ListServers(pb.ListServersRequest(), metadata=bearer("x"), timeout=TIMEOUT_S)
        with pytest.raises(grpc.aio.AioRpcError) as role:
            await broker.stub.ListServers(
                pb.ListServersRequest(), metadata=bearer(TOKENS["proxy"]), timeout=TIMEOUT_S
            )
    assert none.value.details() == (
        "the broker needs credentials: `authorization: Bearer <token>` metadata "
        "(RDBROKER_BROKER_TOKEN or --broker-token-file)"
    )
    assert (wrong.value.details() or "").startswith("the bearer token matches no role of the broker")
    assert role.value.details() == (
        "token:proxy (role proxy) may not call ListServers: it needs the admin role (the admin token)"
    )


async def test_the_attack_of_the_issue_changes_nothing(pg_database_url: str, engine: Any) -> None:
    """SetServerState(MAINTENANCE) and EndSession without credentials, or as a proxy, are refused."""
    await seed(engine, server(A))
    async with running_broker(with_tokens(pg_database_url)) as broker:
        routed = await broker.stub.Route(
            pb.RouteRequest(connection_id="c1", proxy_id="p1", cookie="alice"),
            metadata=bearer(TOKENS["proxy"]),
            timeout=TIMEOUT_S,
        )
        for metadata in ([], bearer(TOKENS["proxy"]), bearer(TOKENS["health"])):
            with pytest.raises(grpc.aio.AioRpcError):
                await broker.stub.SetServerState(
                    pb.SetServerStateRequest(address=A, admin_state=pb.ADMIN_STATE_MAINTENANCE),
                    metadata=metadata,
                    timeout=TIMEOUT_S,
                )
            with pytest.raises(grpc.aio.AioRpcError):
                await broker.stub.EndSession(
                    pb.EndSessionRequest(session_id=routed.session_id), metadata=metadata, timeout=TIMEOUT_S
                )
        admin = bearer(TOKENS["admin"])
        listed = await broker.stub.ListServers(pb.ListServersRequest(), metadata=admin, timeout=TIMEOUT_S)
        found = await broker.stub.LookupUserSessions(
            pb.LookupUserSessionsRequest(user="alice"), metadata=admin, timeout=TIMEOUT_S
        )
    assert [s.admin_state for s in listed.servers] == [pb.ADMIN_STATE_ENABLED]
    assert [s.session_id for s in found.sessions] == [routed.session_id]  # still live


@contextmanager
def recording_callers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[callers.Caller]]:
    """Who `BrokerService.set_server_state` sees as the caller, call by call."""
    seen: list[callers.Caller] = []
    original = BrokerService.set_server_state

    async def recorded(self: BrokerService, *args: Any, **kwargs: Any) -> Any:
        seen.append(callers.current.get())
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(BrokerService, "set_server_state", recorded)
    yield seen


async def test_the_use_cases_see_who_called(
    pg_database_url: str, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(engine, server(A))
    request = pb.SetServerStateRequest(address=A, admin_state=pb.ADMIN_STATE_DRAINING)
    with recording_callers(monkeypatch) as seen:
        async with running_broker(with_tokens(pg_database_url)) as broker:
            await broker.stub.SetServerState(request, metadata=bearer(TOKENS["admin"]), timeout=TIMEOUT_S)
        async with running_broker(settings_for(pg_database_url)) as broker:  # open, on loopback
            await broker.stub.SetServerState(request, timeout=TIMEOUT_S)
    assert [(c.actor, c.role) for c in seen] == [("token:admin", "admin"), ("open", "admin")]
    assert all(c.client.startswith("ipv4:127.0.0.1:") for c in seen)
    assert callers.current.get() is callers.UNKNOWN  # nothing leaks out of the calls


async def test_admin_calls_are_audited_under_the_caller_s_name(
    pg_database_url: str, engine: Any, tmp_path: Path
) -> None:
    """The interceptor's caller reaches the audit record: the token's name, or the certificate's ID."""
    await seed(engine, server(A))
    drain = pb.SetServerStateRequest(address=A, admin_state=pb.ADMIN_STATE_DRAINING)
    enable = pb.SetServerStateRequest(address=A, admin_state=pb.ADMIN_STATE_ENABLED)
    async with running_broker(with_tokens(pg_database_url)) as broker:
        await broker.stub.SetServerState(drain, metadata=bearer(TOKENS["admin"]), timeout=TIMEOUT_S)
    ca = Authority(tmp_path, "farm")
    served = ca.issue("broker", server=True)
    admin = ca.issue("admin", server=False, uris=[spiffe("admin")])
    settings = settings_for(
        pg_database_url, tls_ca=str(ca.ca_path), tls_cert=str(served.cert), tls_key=str(served.key)
    )
    async with running_broker(settings) as broker:
        channel = channel_for(broker.grpc_port, ca, admin)
        try:
            await broker_pb2_grpc.BrokerStub(channel).SetServerState(enable, timeout=TIMEOUT_S)
        finally:
            await channel.close()
    rows = [r for r in await audit_rows(engine, target=A) if r["action"] != "server.add"]  # (the seed)
    assert [(r["action"], r["actor"], r["outcome"]) for r in rows] == [
        ("server.drain", "token:admin", "ok"),
        ("server.enable", spiffe("admin"), "ok"),
    ]
    assert all(r["client"].startswith(("ipv4:127.0.0.1:", "ipv6:")) for r in rows)


# --- certificates ----------------------------------------------------------------------------------


def channel_for(port: int, ca: Authority, client: Issued) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        ca.ca_path.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def test_each_certificate_calls_exactly_its_role_s_rpcs(
    pg_database_url: str, engine: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(engine, server(A))
    ca = Authority(tmp_path, "farm")
    served = ca.issue("broker", server=True)
    clients = {
        "proxy": ca.issue("proxy", server=False, uris=[spiffe("proxy")]),
        "health": ca.issue("health", server=False, uris=[spiffe("health")]),
        "admin": ca.issue("admin", server=False, uris=[spiffe("admin")]),
        "none": ca.issue("no-role", server=False),  # signed by the CA, but names no role
        "wrong": ca.issue("elsewhere", server=False, uris=[spiffe("admin", "other.example")]),
    }
    settings = settings_for(
        pg_database_url, tls_ca=str(ca.ca_path), tls_cert=str(served.cert), tls_key=str(served.key)
    )
    table: dict[str, dict[str, str]] = {}
    with recording_callers(monkeypatch) as seen:
        async with running_broker(settings) as broker:
            for caller, client in clients.items():
                async with channel_for(broker.grpc_port, ca, client) as channel:
                    table[caller] = await outcomes(broker_pb2_grpc.BrokerStub(channel))
    assert table == {caller: expected(caller) for caller in table}
    assert [(c.actor, c.role) for c in seen] == [(spiffe("admin"), "admin")]


async def test_a_certificate_without_a_role_may_still_send_a_token(
    pg_database_url: str, engine: Any, tmp_path: Path
) -> None:
    ca = Authority(tmp_path, "farm")
    served = ca.issue("broker", server=True)
    client = ca.issue("no-role", server=False)
    settings = with_tokens(
        pg_database_url, tls_ca=str(ca.ca_path), tls_cert=str(served.cert), tls_key=str(served.key)
    )
    async with running_broker(settings) as broker, channel_for(broker.grpc_port, ca, client) as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        answer = await stub.ProxyHeartbeat(
            pb.ProxyHeartbeatRequest(proxy_id="p1"), metadata=bearer(TOKENS["proxy"]), timeout=TIMEOUT_S
        )
        assert answer.heartbeat_interval_ms == 5000
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ProxyHeartbeat(pb.ProxyHeartbeatRequest(proxy_id="p1"), timeout=TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "a client certificate with the URI SAN spiffe://rdbroker.local/rdbroker/<role>" in (
        caught.value.details() or ""
    )


# --- start-up --------------------------------------------------------------------------------------


async def test_an_open_grpc_port_off_loopback_refuses_to_start(pg_database_url: str, engine: Any) -> None:
    with pytest.raises(StartupError) as caught:
        await serve(settings_for(pg_database_url, grpc_listen="0.0.0.0:0"))
    assert str(caught.value).startswith(
        "the broker would serve gRPC on 0.0.0.0:0 to anyone: set RDBROKER_GRPC_"
    )


async def test_insecure_grpc_lets_it_start(pg_database_url: str, engine: Any) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host: binding it fails after the check passed, so
    # the test learns that the flag lets the broker by without serving anything off loopback.
    settings = settings_for(pg_database_url, grpc_listen="192.0.2.1:0", insecure_grpc=True)
    with pytest.raises(StartupError) as caught:
        await serve(settings)
    assert str(caught.value).startswith("cannot listen for gRPC on 192.0.2.1:0")


async def test_tokens_let_it_start_off_loopback(pg_database_url: str, engine: Any) -> None:
    with pytest.raises(StartupError) as caught:
        await serve(with_tokens(pg_database_url, grpc_listen="192.0.2.1:0"))
    assert str(caught.value).startswith("cannot listen for gRPC on 192.0.2.1:0")


def run_broker(pg_database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    common = ["--database-url", pg_database_url, "--migrate", "--http-listen", "127.0.0.1:0"]
    return subprocess.run(
        [sys.executable, "-m", "rdbroker_broker", *common, "--log-level", "ERROR", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_refusal_is_one_line_and_the_flag_is_a_flag(pg_database_url: str, engine: Any) -> None:
    refused = run_broker(pg_database_url, "--grpc-listen", "0.0.0.0:0")
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.splitlines() if line.startswith("rdbroker broker:")]
    assert lines == [
        "rdbroker broker: the broker would serve gRPC on 0.0.0.0:0 to anyone: set "
        "RDBROKER_GRPC_PROXY_TOKEN, RDBROKER_GRPC_HEALTH_TOKEN and RDBROKER_GRPC_ADMIN_TOKEN, or mutual "
        "TLS (--tls-ca/--tls-cert/--tls-key), or listen on 127.0.0.1, or give --insecure-grpc "
        "(RDBROKER_INSECURE_GRPC) to serve it open on purpose"
    ]
    passed = run_broker(pg_database_url, "--grpc-listen", "192.0.2.1:0", "--insecure-grpc")
    assert passed.returncode == 1
    assert "rdbroker broker: cannot listen for gRPC on 192.0.2.1:0" in passed.stderr


def test_tokens_are_not_flags(pg_database_url: str) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "rdbroker_broker", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "--insecure-grpc" in shown.stdout
    assert "--grpc-reflection" in shown.stdout
    assert "--grpc-trust-domain" in shown.stdout
    assert "--grpc-admin-token" not in shown.stdout  # a command line shows in `ps`
    assert "--grpc-proxy-token" not in shown.stdout


# --- reflection ----------------------------------------------------------------------------------


async def reflected(broker: RunningBroker, metadata: Sequence[tuple[str, str]] = ()) -> set[str] | str:
    stub = reflection_pb2_grpc.ServerReflectionStub(broker.channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata, timeout=TIMEOUT_S
    )
    names: set[str] = set()
    try:
        async for reply in replies:
            names |= {s.name for s in reply.list_services_response.service}
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return names


async def test_reflection_is_off_unless_asked(pg_database_url: str, engine: Any) -> None:
    async with running_broker(settings_for(pg_database_url)) as broker:
        assert await reflected(broker) == "UNIMPLEMENTED"
    async with running_broker(settings_for(pg_database_url, grpc_reflection=True)) as broker:
        names = await reflected(broker)
        assert isinstance(names, set)
        assert SERVICE in names
    async with running_broker(with_tokens(pg_database_url, grpc_reflection=True)) as broker:
        assert await reflected(broker) == "UNAUTHENTICATED"
        assert await reflected(broker, bearer(TOKENS["proxy"])) == "PERMISSION_DENIED"  # an admin call
        names = await reflected(broker, bearer(TOKENS["admin"]))
        assert isinstance(names, set)
        assert SERVICE in names


async def test_kubelet_health_checks_need_no_credentials(pg_database_url: str, engine: Any) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with running_broker(with_tokens(pg_database_url)) as broker:
        answer = await health_pb2_grpc.HealthStub(broker.channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT_S
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_refusal_metric_counts_by_reason_and_method(pg_database_url: str, engine: Any) -> None:
    method = f"{SERVICE}/EndSession"
    before = {reason: rpc_authz.refused_count(reason, method) for reason in REASONS}
    async with running_broker(with_tokens(pg_database_url)) as broker:
        for metadata, times in (([], 3), (bearer("nope"), 2), (bearer(TOKENS["health"]), 1)):
            for _ in range(times):
                with pytest.raises(grpc.aio.AioRpcError):
                    await broker.stub.EndSession(
                        pb.EndSessionRequest(session_id="x"), metadata=metadata, timeout=TIMEOUT_S
                    )
    after = {reason: rpc_authz.refused_count(reason, method) - before[reason] for reason in REASONS}
    assert after == {"no_credentials": 3, "bad_token": 2, "wrong_role": 1}


async def test_the_refusal_metric_is_exported(pg_database_url: str, engine: Any) -> None:
    metrics_port = free_port()
    env = {f"RDBROKER_GRPC_{role.upper()}_TOKEN": token for role, token in TOKENS.items()}
    async with broker_process(pg_database_url, "--metrics-listen", f"127.0.0.1:{metrics_port}", env=env) as (
        grpc_port,
        _,
    ):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            for metadata in ([], [], bearer(TOKENS["proxy"])):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ListServers(pb.ListServersRequest(), metadata=metadata, timeout=TIMEOUT_S)
            await stub.ListServers(
                pb.ListServersRequest(), metadata=bearer(TOKENS["admin"]), timeout=TIMEOUT_S
            )
        text = await asyncio.to_thread(prom.scrape, metrics_port)
    method = f"{SERVICE}/ListServers"
    assert prom.sample(text, "rdbroker_grpc_refused_total", reason="no_credentials", method=method) == 2
    assert prom.sample(text, "rdbroker_grpc_refused_total", reason="wrong_role", method=method) == 1
    assert prom.sample(text, "rdbroker_grpc_refused_total", reason="bad_token") is None
