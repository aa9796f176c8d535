"""gRPC authorization by role: a real grpc.aio server on 127.0.0.1 behind `AuthzInterceptor`, with tokens
and with client certificates made here; the refusal log and count; the exposure rule; the trust domain."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rdbroker_common import rpc_authz, tls
from rdbroker_common.rpc_authz import ADMIN, HEALTH, PROXY, AuthzInterceptor, Identity, Policy
from rdbroker_common.rpc_server import add_standard_services, mark_serving
from tests.unit.common.test_tls import Authority, Issued, spiffe

SERVICE = "test.Roles"
PROXY_CALL, HEALTH_CALL, OTHER_CALL, STREAM_CALL = (
    f"/{SERVICE}/{name}" for name in ("ProxyCall", "HealthCall", "OtherCall", "StreamCall")
)
METHODS = {PROXY_CALL: PROXY, HEALTH_CALL: HEALTH}  # OtherCall and StreamCall: the default, admin
TOKENS = {PROXY: "proxy-secret", HEALTH: "health-secret", ADMIN: "admin-secret"}
TIMEOUT_S = 10.0

# What the servicer methods see of the caller: the interceptor's `bind` sets it around them.
seen_caller: ContextVar[Identity | None] = ContextVar("seen_caller", default=None)


@contextlib.contextmanager
def bind(identity: Identity) -> Iterator[None]:
    token = seen_caller.set(identity)
    try:
        yield
    finally:
        seen_caller.reset(token)


async def answer_who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    identity = seen_caller.get()
    return b"nobody" if identity is None else f"{identity.actor}|{identity.role}".encode()


async def stream_who(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield await answer_who(b"", context)


def handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ProxyCall": grpc.unary_unary_rpc_method_handler(answer_who),
            "HealthCall": grpc.unary_unary_rpc_method_handler(answer_who),
            "OtherCall": grpc.unary_unary_rpc_method_handler(answer_who),
            "StreamCall": grpc.stream_stream_rpc_method_handler(stream_who),
        },
    )


@dataclass
class Served:
    port: int
    ca: Authority | None = None

    def channel(self, client: Issued | None = None) -> grpc.aio.Channel:
        if self.ca is None:
            return grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")
        assert client is not None
        credentials = grpc.ssl_channel_credentials(
            self.ca.ca_path.read_bytes(), client.key.read_bytes(), client.cert.read_bytes()
        )
        return grpc.aio.secure_channel(f"localhost:{self.port}", credentials)


@contextlib.asynccontextmanager
async def serving(policy: Policy, ca: Authority | None = None) -> AsyncIterator[Served]:
    server = grpc.aio.server(interceptors=[AuthzInterceptor(policy, bind=bind)])
    server.add_generic_rpc_handlers((handlers(),))
    health = add_standard_services(server, [SERVICE])
    if ca is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        issued = ca.issue("server", server=True)
        credentials = tls.server_credentials(ca.ca_path, issued.cert, issued.key)
        assert credentials is not None
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    await mark_serving(health, [SERVICE])
    try:
        yield Served(port, ca)
    finally:
        await server.stop(None)


async def call(channel: grpc.aio.Channel, method: str, metadata: Sequence[tuple[str, str]] = ()) -> str:
    """The servicer's answer ("actor|role"), or the refusal as "CODE: details"."""
    try:
        if method == STREAM_CALL:
            stream = channel.stream_stream(method)(iter([b"x"]), metadata=metadata, timeout=TIMEOUT_S)
            answers = [bytes(a) async for a in stream]
            return answers[0].decode()
        answer = await channel.unary_unary(method)(b"x", metadata=metadata, timeout=TIMEOUT_S)
        return bytes(answer).decode()
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


ALL = (PROXY_CALL, HEALTH_CALL, OTHER_CALL, STREAM_CALL)
ROLE_OF = {PROXY_CALL: PROXY, HEALTH_CALL: HEALTH, OTHER_CALL: ADMIN, STREAM_CALL: ADMIN}


# --- tokens ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [PROXY, HEALTH, ADMIN])
async def test_each_token_calls_its_role_s_methods_only(role: str) -> None:
    async with serving(Policy(METHODS, tokens=TOKENS)) as served, served.channel() as channel:
        for method in ALL:
            got = await call(channel, method, bearer(TOKENS[role]))
            if ROLE_OF[method] == role:
                assert got == f"token:{role}|{role}", method  # the servicer saw the caller
            else:
                assert got.startswith("PERMISSION_DENIED: token:" + role), (method, got)
                assert f"needs the {ROLE_OF[method]} role" in got


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([], "no_credentials"),
        (bearer("not-a-token"), "bad_token"),
        (bearer(""), "bad_token"),
        ([("authorization", "Basic YWRtaW46YWRtaW4=")], "bad_token"),
        ([("authorization", TOKENS[ADMIN])], "bad_token"),  # no scheme
        (bearer(TOKENS[ADMIN] + "x"), "bad_token"),
        (bearer(TOKENS[ADMIN][:-1]), "bad_token"),
    ],
)
async def test_missing_or_wrong_credentials_are_unauthenticated(
    metadata: list[tuple[str, str]], reason: str
) -> None:
    async with serving(Policy(METHODS, tokens=TOKENS)) as served, served.channel() as channel:
        for method in ALL:
            before = rpc_authz.refused_count(reason, method.lstrip("/"))
            got = await call(channel, method, metadata)
            assert got.startswith("UNAUTHENTICATED: "), (method, got)
            assert rpc_authz.refused_count(reason, method.lstrip("/")) == before + 1
    if reason == "no_credentials":
        assert "Bearer <token>" in got  # says what to send


async def test_the_bearer_scheme_is_case_insensitive() -> None:
    async with serving(Policy(METHODS, tokens=TOKENS)) as served, served.channel() as channel:
        got = await call(channel, PROXY_CALL, [("authorization", f"bearer {TOKENS[PROXY]}")])
    assert got == "token:proxy|proxy"


async def test_during_a_rotation_old_and_new_tokens_both_work() -> None:
    policy = Policy(METHODS, tokens={PROXY: "new-token, old-token", ADMIN: "admin-secret"})
    async with serving(policy) as served, served.channel() as channel:
        assert await call(channel, PROXY_CALL, bearer("new-token")) == "token:proxy|proxy"
        assert await call(channel, PROXY_CALL, bearer("old-token")) == "token:proxy|proxy"
        assert (await call(channel, PROXY_CALL, bearer("new-token, old-token"))).startswith("UNAUTHENTICATED")
        assert (await call(channel, PROXY_CALL, bearer("new-token,"))).startswith("UNAUTHENTICATED")


async def test_a_role_without_a_token_has_no_way_in() -> None:
    async with serving(Policy(METHODS, tokens={PROXY: "p"})) as served, served.channel() as channel:
        assert await call(channel, PROXY_CALL, bearer("p")) == "token:proxy|proxy"
        got = await call(channel, OTHER_CALL, bearer("p"))
    assert got.startswith("PERMISSION_DENIED")
    assert "no credential for admin is configured" in got


async def test_open_policy_lets_everyone_call_everything() -> None:
    async with serving(Policy(METHODS)) as served, served.channel() as channel:
        for method in ALL:
            assert await call(channel, method) == f"open|{ROLE_OF[method]}"
            assert await call(channel, method, bearer("anything")) == f"open|{ROLE_OF[method]}"


async def test_health_checks_stay_open() -> None:
    async with serving(Policy(METHODS, tokens=TOKENS)) as served, served.channel() as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT_S
        )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        async for update in watch:
            assert update.status == health_pb2.HealthCheckResponse.SERVING
            break
        watch.cancel()


async def test_the_caller_is_not_seen_outside_its_call() -> None:
    async with serving(Policy(METHODS, tokens=TOKENS)) as served, served.channel() as channel:
        assert await call(channel, PROXY_CALL, bearer(TOKENS[PROXY])) == "token:proxy|proxy"
    assert seen_caller.get() is None


# --- certificates ----------------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path: Path) -> Authority:
    return Authority(tmp_path, "rdbroker")


@pytest.mark.parametrize("role", [PROXY, HEALTH, ADMIN])
async def test_each_certificate_calls_its_role_s_methods_only(ca: Authority, role: str) -> None:
    client = ca.issue(f"{role}-client", server=False, uris=[spiffe(role)])
    async with serving(Policy(METHODS, mtls=True), ca) as served, served.channel(client) as channel:
        for method in ALL:
            got = await call(channel, method)
            if ROLE_OF[method] == role:
                assert got == f"{spiffe(role)}|{role}", method
            else:
                assert got.startswith(f"PERMISSION_DENIED: {spiffe(role)} (role {role})"), (method, got)


@pytest.mark.parametrize(
    "uris",
    [
        [],  # a certificate of the CA without any role, as every certificate before roles
        [spiffe(ADMIN, "other.example")],  # another trust domain
        ["spiffe://rdbroker.local/rdbroker/root"],  # no such role
        ["spiffe://rdbroker.local/admin"],  # not under /rdbroker/
        [spiffe(PROXY), spiffe(ADMIN)],  # two identities: none
        ["https://rdbroker.local/rdbroker/admin"],
    ],
)
async def test_a_certificate_without_a_role_is_unauthenticated_but_may_send_a_token(
    ca: Authority, uris: list[str]
) -> None:
    client = ca.issue("no-role", server=False, uris=uris)
    policy = Policy(METHODS, tokens={ADMIN: "admin-secret"}, mtls=True)
    async with serving(policy, ca) as served, served.channel(client) as channel:
        got = await call(channel, OTHER_CALL)
        assert got.startswith("UNAUTHENTICATED: this server needs credentials"), got
        assert "spiffe://rdbroker.local/rdbroker/<role>" in got
        assert await call(channel, OTHER_CALL, bearer("admin-secret")) == "token:admin|admin"


async def test_a_certificate_role_wins_over_a_token(ca: Authority) -> None:
    client = ca.issue("proxy", server=False, uris=[spiffe(PROXY)])
    policy = Policy(METHODS, tokens=TOKENS, mtls=True)
    async with serving(policy, ca) as served, served.channel(client) as channel:
        assert await call(channel, PROXY_CALL, bearer("wrong")) == f"{spiffe(PROXY)}|proxy"
        got = await call(channel, OTHER_CALL, bearer(TOKENS[ADMIN]))
    assert got.startswith("PERMISSION_DENIED")  # the certificate says proxy: an admin token adds nothing


async def test_the_trust_domain_is_a_setting(ca: Authority) -> None:
    ours = ca.issue("ours", server=False, uris=[spiffe(ADMIN, "corp.example")])
    default = ca.issue("default", server=False, uris=[spiffe(ADMIN)])
    policy = Policy(METHODS, mtls=True, trust_domain="corp.example")
    async with serving(policy, ca) as served:
        async with served.channel(ours) as channel:
            assert await call(channel, OTHER_CALL) == "spiffe://corp.example/rdbroker/admin|admin"
        async with served.channel(default) as channel:
            assert (await call(channel, OTHER_CALL)).startswith("UNAUTHENTICATED")


# --- the refusal log and count ---------------------------------------------------------------------


def test_refusals_are_logged_once_per_interval_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    refusal = rpc_authz.Refused(grpc.StatusCode.UNAUTHENTICATED, "bad_token", "the token is wrong")
    other = rpc_authz.Refused(grpc.StatusCode.PERMISSION_DENIED, "wrong_role", "not yours")
    rpc_authz._logged.clear()
    before = rpc_authz.refused_count("bad_token", "x.Y/Z")
    with caplog.at_level(logging.WARNING, logger="rdbroker_common.rpc_authz"):
        for _ in range(5):
            rpc_authz.record_refusal(refusal, "/x.Y/Z", "ipv4:127.0.0.1:1", interval_s=3600)
        rpc_authz.record_refusal(other, "/x.Y/Z", "ipv4:127.0.0.1:1", interval_s=3600)
        rpc_authz.record_refusal(refusal, "/x.Y/Z", "ipv4:127.0.0.1:1", interval_s=0)
    assert rpc_authz.refused_count("bad_token", "x.Y/Z") == before + 6
    lines = [r for r in caplog.records if r.name == "rdbroker_common.rpc_authz"]
    assert [r.getMessage() for r in lines] == [
        "refused x.Y/Z from ipv4:127.0.0.1:1: the token is wrong",
        "refused x.Y/Z from ipv4:127.0.0.1:1: not yours",
        "refused x.Y/Z from ipv4:127.0.0.1:1: the token is wrong",
    ]
    assert lines[2].refused_unlogged == 4  # type: ignore[attr-defined]  # the four left out before it


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "mtls", "tokens", "insecure", "refused"),
    [
        ("127.0.0.1:50051", False, "", False, False),
        ("localhost:50051", False, "", False, False),
        ("[::1]:50051", False, "", False, False),
        ("0.0.0.0:50051", False, "", False, True),
        ("[::]:50051", False, "", False, True),
        ("10.0.0.5:50051", False, "", False, True),
        ("broker.example:50051", False, "", False, True),
        ("0.0.0.0:50051", False, " , ", False, True),  # a list of nothing is no token
        ("0.0.0.0:50051", True, "", False, False),
        ("0.0.0.0:50051", False, "t", False, False),
        ("0.0.0.0:50051", False, "", True, False),
    ],
)
def test_an_open_port_is_allowed_on_loopback_only(
    listen: str, mtls: bool, tokens: str, insecure: bool, refused: bool
) -> None:
    policy = Policy(METHODS, tokens={ADMIN: tokens}, mtls=mtls, server="the broker")
    why = rpc_authz.exposure_refusal(listen, policy, insecure=insecure, token_names="T")
    assert (why is not None) == refused
    if why is not None:
        assert "\n" not in why
        assert why.startswith(f"the broker would serve gRPC on {listen} to anyone: set T")
        assert "--insecure-grpc" in why


@pytest.mark.parametrize("value", ["", "Corp.Example", "spiffe://corp.example", "corp.example/x", "a b"])
def test_a_bad_trust_domain_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="is not a SPIFFE trust domain"):
        Policy(METHODS, trust_domain=value)


def test_a_policy_knows_only_the_three_roles() -> None:
    with pytest.raises(ValueError, match="unknown role 'root'"):
        Policy({PROXY_CALL: "root"})
    with pytest.raises(ValueError, match="token for unknown role 'root'"):
        Policy(METHODS, tokens={"root": "x"})
    assert Policy(METHODS, tokens={PROXY: "", HEALTH: ""}).open  # empty tokens are no tokens


def test_a_policy_never_shows_its_tokens() -> None:
    policy = Policy(METHODS, tokens=TOKENS)
    assert not any(token in repr(policy) for token in TOKENS.values())
