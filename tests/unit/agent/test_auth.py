"""Who may ask the agent: a bearer token (environment or a rotated token_file), or a client certificate
over HTTPS; /healthz needs neither; without either the agent listens on loopback only."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

import httpx
import pytest

from rdbroker_agent.auth import AgentAuth, ListenRefused, check_listen, default_listen, is_loopback
from rdbroker_agent.config import AgentConfig, parse_config
from rdbroker_agent.errors import ConfigError
from rdbroker_agent.server import AgentServer
from rdbroker_common.bearer import Tokens
from tests.unit.agent.fakes import FakeSources
from tests.unit.common.test_tls import Authority

TOKEN = "agent-token-0123456789"
OTHER = "another-token-987654321-xyz"  # a different length: a rewrite within one mtime tick still shows
COUNTERS = {"counters": [{"kind": "cpu"}]}
CONFIG = parse_config(COUNTERS)
PATHS = ["/load", "/sessions", "/nope"]


def with_token(token: str = TOKEN) -> AgentAuth:
    return AgentAuth(tokens=Tokens(fixed=token))


async def get(server: AgentServer, path: str, token: str | None = None, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    base = f"{server.scheme}://127.0.0.1:{server.port}"
    async with httpx.AsyncClient(base_url=base, timeout=5, **kwargs) as client:
        return await client.get(path, headers=headers)


@pytest.mark.parametrize("path", PATHS)
async def test_without_the_token_every_path_but_healthz_is_401(path: str) -> None:
    async with AgentServer(CONFIG, FakeSources(cpu=30), auth=with_token()) as server:
        missing = await get(server, path)
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == 'Bearer realm="rdbroker-agent"'
        assert missing.text == "missing bearer token: send Authorization: Bearer <the agent's token>\n"
        wrong = await get(server, path, token=TOKEN + "x")
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == 'Bearer realm="rdbroker-agent", error="invalid_token"'
        assert wrong.text == "wrong bearer token\n"
        assert TOKEN not in wrong.text
        assert (await get(server, path, token=OTHER)).status_code == 401
        basic = await get(server, path, auth=httpx.BasicAuth("health", TOKEN))
        assert basic.status_code == 401
        assert server.refusals.total == 4


async def test_with_the_token_the_agent_answers() -> None:
    async with AgentServer(CONFIG, FakeSources(cpu=30), auth=with_token()) as server:
        assert (await get(server, "/load", token=TOKEN)).text == "30\n"
        sessions = await get(server, "/sessions", token=TOKEN)
        assert sessions.json() == {"omits_disconnected": True, "sessions": []}
        assert (await get(server, "/nope", token=TOKEN)).status_code == 404  # after auth: no path map
        assert server.refusals.total == 0


async def test_healthz_needs_no_token() -> None:
    async with AgentServer(CONFIG, FakeSources(), auth=with_token()) as server:
        response = await get(server, "/healthz")
        assert (response.status_code, response.text) == (200, "ok\n")
        assert (await get(server, "/healthz", token="whatever")).status_code == 200


async def test_refusals_are_logged_once_per_interval_without_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rdbroker_agent")
    async with AgentServer(CONFIG, FakeSources(), auth=with_token()) as server:
        for _ in range(5):
            assert (await get(server, "/load", token=OTHER)).status_code == 401
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == ["refused 1 request(s) without valid credentials (the last from 127.0.0.1)"]
    assert OTHER not in caplog.text


def replace(path: Path, text: str) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def test_token_file_rotation_needs_no_restart(tmp_path: Path) -> None:
    token_file = tmp_path / "agent.token"
    token_file.write_text(TOKEN + "\n")
    config = parse_config({**COUNTERS, "token_file": "agent.token"}, base_dir=tmp_path)
    assert config.token_file == token_file
    auth = AgentAuth.from_config(config, env_token="")
    async with AgentServer(config, FakeSources(cpu=5), auth=auth) as server:
        assert (await get(server, "/load", token=TOKEN)).status_code == 200
        assert (await get(server, "/load", token=OTHER)).status_code == 401
        # Rotation: the new token joins, clients move over, the old one leaves.
        replace(token_file, f"{OTHER}\n{TOKEN}\n")
        assert (await get(server, "/load", token=OTHER)).status_code == 200
        assert (await get(server, "/load", token=TOKEN)).status_code == 200
        replace(token_file, f"{OTHER}\n")
        assert (await get(server, "/load", token=OTHER)).text == "5\n"
        assert (await get(server, "/load", token=TOKEN)).status_code == 401
        # Half written (empty): the last good token stays.
        replace(token_file, "")
        assert (await get(server, "/load", token=OTHER)).status_code == 200


def test_token_settings_that_cannot_be_used_are_config_errors(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(TOKEN)
    with_file = parse_config({**COUNTERS, "token_file": "t"}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="set RDBROKER_AGENT_TOKEN or token_file, not both"):
        AgentAuth.from_config(with_file, env_token=TOKEN)
    with pytest.raises(ConfigError, match="RDBROKER_AGENT_TOKEN: a token is at least 16 characters"):
        AgentAuth.from_config(CONFIG, env_token="short")
    missing = parse_config({**COUNTERS, "token_file": "nothing-here"}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        AgentAuth.from_config(missing, env_token="")
    assert not AgentAuth.from_config(CONFIG, env_token="").required
    assert AgentAuth.from_config(CONFIG, env_token=TOKEN).required


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("agent.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_without_auth_a_non_loopback_listen_is_refused_unless_allowed() -> None:
    with pytest.raises(ListenRefused) as refused:
        AgentServer(CONFIG, FakeSources(), host="0.0.0.0", port=8088)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("refusing to listen on 0.0.0.0 without authentication")
    assert "RDBROKER_AGENT_TOKEN" in message
    assert "--allow-unauthenticated" in message
    # Allowed, or authenticated: constructed (not started: tests listen on 127.0.0.1 only).
    AgentServer(CONFIG, FakeSources(), host="0.0.0.0", port=8088, allow_unauthenticated=True)
    AgentServer(CONFIG, FakeSources(), host="0.0.0.0", port=8088, auth=with_token())
    check_listen("127.0.0.1", AgentAuth(), allow_unauthenticated=False)


def test_the_default_listen_follows_authentication() -> None:
    assert default_listen(AgentAuth()) == "127.0.0.1:8088"
    assert default_listen(with_token()) == "0.0.0.0:8088"
    assert default_listen(AgentAuth(client_certificates=True)) == "0.0.0.0:8088"


# HTTPS -----------------------------------------------------------------------------------------


def tls_config(tmp_path: Path, ca: Authority, *, client_ca: Authority | None) -> AgentConfig:
    issued = ca.issue("agent", server=True)
    data: dict[str, object] = {**COUNTERS, "tls_cert": str(issued.cert), "tls_key": str(issued.key)}
    if client_ca is not None:
        data["tls_ca"] = str(client_ca.ca_path)
    return parse_config(data, base_dir=tmp_path)


def client_tls(ca: Authority, client: Authority | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca.ca_path)
    if client is not None:
        issued = client.issue(f"health-{client.name}", server=False)
        context.load_cert_chain(issued.cert, issued.key)
    return context


async def test_a_client_certificate_from_tls_ca_authenticates(tmp_path: Path) -> None:
    ca, stranger = Authority(tmp_path, "rdbroker"), Authority(tmp_path, "stranger")
    config = tls_config(tmp_path, ca, client_ca=ca)
    auth = AgentAuth.from_config(config, env_token="")
    assert auth.required  # so it may listen beyond loopback
    async with AgentServer(config, FakeSources(cpu=12), auth=auth) as server:
        assert server.scheme == "https"
        answer = await get(server, "/load", verify=client_tls(ca, client=ca))
        assert answer.text == "12\n"
        # No certificate, or one from another CA: the handshake fails, no HTTP answer at all.
        for refused in (client_tls(ca), client_tls(ca, client=stranger)):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await get(server, "/load", verify=refused)


async def test_https_without_tls_ca_still_needs_the_token(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "rdbroker")
    config = tls_config(tmp_path, ca, client_ca=None)
    async with AgentServer(config, FakeSources(cpu=12), auth=with_token()) as server:
        assert (await get(server, "/load", verify=client_tls(ca))).status_code == 401
        assert (await get(server, "/load", token=TOKEN, verify=client_tls(ca))).text == "12\n"
    assert not AgentAuth.from_config(config, env_token="").required


async def test_renewed_tls_files_take_over_without_a_restart(tmp_path: Path) -> None:
    ca = Authority(tmp_path, "rdbroker")
    config = tls_config(tmp_path, ca, client_ca=None)
    assert config.tls_cert is not None
    assert config.tls_key is not None
    first = config.tls_cert.read_bytes()
    async with AgentServer(config, FakeSources(), auth=with_token()) as server:

        async def served_certificate() -> bytes:
            context = client_tls(ca)
            url = f"https://127.0.0.1:{server.port}/healthz"
            async with (
                httpx.AsyncClient(verify=context, timeout=5) as client,
                client.stream("GET", url) as response,
            ):
                stream = response.extensions["network_stream"]
                der = stream.get_extra_info("ssl_object").getpeercert(binary_form=True)
            return ssl.DER_cert_to_PEM_cert(der).encode()

        assert _same_cert(await served_certificate(), first)
        renewed = ca.issue("agent-renewed", server=True)
        replace_bytes(config.tls_cert, renewed.cert.read_bytes())
        replace_bytes(config.tls_key, renewed.key.read_bytes())
        await served_certificate()  # this connection's look at the files picks up the renewal
        assert _same_cert(await served_certificate(), renewed.cert.read_bytes())
        # A broken rewrite keeps the renewed pair.
        replace_bytes(config.tls_key, b"not a key")
        await served_certificate()
        assert _same_cert(await served_certificate(), renewed.cert.read_bytes())


def replace_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _same_cert(pem_a: bytes, pem_b: bytes) -> bool:
    return ssl.PEM_cert_to_DER_cert(pem_a.decode()) == ssl.PEM_cert_to_DER_cert(pem_b.decode())


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        parse_config({**COUNTERS, "tls_cert": "agent.crt"})
    with pytest.raises(ConfigError, match=r"tls_ca \(client certificates\) needs tls_cert and tls_key"):
        parse_config({**COUNTERS, "tls_ca": "ca.crt"})
    with pytest.raises(ConfigError, match="token_file must be a non-empty path"):
        parse_config({**COUNTERS, "token_file": ""})


def test_tls_files_that_do_not_load_stop_the_start(tmp_path: Path) -> None:
    (tmp_path / "agent.crt").write_text("not a certificate")
    (tmp_path / "agent.key").write_text("not a key")
    config = parse_config({**COUNTERS, "tls_cert": "agent.crt", "tls_key": "agent.key"}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"tls_cert/tls_key/tls_ca: certificate .* do not load"):
        AgentServer(config, FakeSources(), auth=with_token())
