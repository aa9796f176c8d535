"""Bearer tokens: reads need the read or admin token, changes the admin token; no token configured means
an open API that may only listen on loopback."""

from __future__ import annotations

import logging

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from rdbroker_broker.rest.app import create_app
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from tests.integration.rest.conftest import ADMIN, READ, SERVERS, settings_for

DRAIN = f"/v1/servers/{SERVERS[0]}/drain"
READS = ("/v1/servers", "/v1/pools", "/v1/sessions", "/v1/users/alice/sessions", f"/v1/servers/{SERVERS[0]}")
NO_TOKENS = {"api_read_token": SecretStr(""), "api_admin_token": SecretStr("")}
CHANGES = (
    ("DELETE", "/v1/sessions/x"),
    ("POST", "/v1/servers"),
    ("PATCH", f"/v1/servers/{SERVERS[0]}"),
    ("DELETE", f"/v1/servers/{SERVERS[0]}"),
    ("POST", f"/v1/servers/{SERVERS[0]}/enable"),
    ("POST", f"/v1/servers/{SERVERS[0]}/maintenance"),
)


def client_for(
    service: BrokerService, token: str | None, base_url: str = "http://broker"
) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    transport = httpx.ASGITransport(app=create_app(service))
    return httpx.AsyncClient(transport=transport, base_url=base_url, headers=headers)


@pytest.mark.parametrize(
    ("token", "read", "change"),
    [(None, 401, 401), ("wrong", 401, 401), ("", 401, 401), (READ, 200, 403), (ADMIN, 200, 200)],
)
async def test_tokens(service, token, read, change):
    async with client_for(service, token) as client:
        for path in READS:
            assert (await client.get(path)).status_code == read, path
        answer = await client.post(DRAIN)
        assert answer.status_code == change
        if change == 401:
            assert answer.headers["www-authenticate"] == "Bearer"
            assert answer.json()["title"] == "Authentication required"
        if change == 403:
            assert answer.json()["title"] == "Admin token required"
        if change != 200:  # every other change is refused the same way, before it is looked at
            for method, path in CHANGES:
                assert (await client.request(method, path, json={})).status_code == change, (method, path)


async def test_probes_and_the_dashboard_need_no_token(service):
    async with client_for(service, None) as client:
        for path in ("/healthz", "/readyz", "/", "/dashboard/app.js", "/dashboard/style.css", "/docs"):
            assert (await client.get(path)).status_code == 200, path


async def test_only_an_admin_token_makes_reads_need_it(engine, pg_database_url):
    settings = settings_for(pg_database_url, api_read_token=SecretStr(""))
    service = BrokerService(Store(engine), settings)
    async with client_for(service, READ) as client:
        assert (await client.get("/v1/servers")).status_code == 401
    async with client_for(service, ADMIN) as client:
        assert (await client.get("/v1/servers")).status_code == 200


async def test_no_tokens_is_an_open_api_on_loopback_and_says_so(engine, pg_database_url, caplog):
    settings = settings_for(pg_database_url, **NO_TOKENS)
    service = BrokerService(Store(engine), settings)
    with caplog.at_level(logging.WARNING, logger="rdbroker_broker.rest.app"):
        async with client_for(service, None, "http://127.0.0.1:8080") as client:
            assert (await client.post(DRAIN)).status_code == 200
    assert "REST API has no tokens" in caplog.text


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "10.0.0.5:8080", "[::]:8080", "broker.example:8080"])
def test_no_tokens_refuses_a_non_loopback_listen(listen):
    with pytest.raises(ValidationError) as caught:
        settings_for("sqlite+aiosqlite:///x.db", http_listen=listen, **NO_TOKENS)
    assert "no API token is set" in str(caught.value)
    assert listen in str(caught.value)


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.0.0.2:0", "[::1]:8080", "localhost:8080"])
def test_no_tokens_is_fine_on_loopback(listen):
    settings_for("sqlite+aiosqlite:///x.db", http_listen=listen, **NO_TOKENS)


def test_a_token_allows_any_listen():
    assert settings_for("sqlite+aiosqlite:///x.db", http_listen="0.0.0.0:8080").http_listen == "0.0.0.0:8080"


@pytest.fixture
def open_service(engine, pg_database_url) -> BrokerService:
    return BrokerService(Store(engine), settings_for(pg_database_url, **NO_TOKENS))


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8080", "127.0.0.1", "localhost:9", "LOCALHOST", "[::1]:8080", "127.0.0.2:80"]
)
async def test_an_open_api_answers_loopback_host_names(open_service, host):
    async with client_for(open_service, None, "http://127.0.0.1:8080") as client:
        assert (await client.get("/v1/sessions", headers={"Host": host})).status_code == 200
        answer = await client.post(DRAIN, headers={"Host": host})
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8080", "10.0.0.5:8080", "localhost.evil.example", ""]
)
async def test_an_open_api_refuses_other_host_names(open_service, host):
    # A DNS-rebinding page reaches 127.0.0.1 under its own name: it must read nothing and change nothing.
    async with client_for(open_service, None, "http://127.0.0.1:8080") as client:
        for method, path in (("GET", "/v1/sessions"), ("GET", "/"), ("POST", DRAIN)):
            answer = await client.request(method, path, headers={"Host": host})
            assert answer.status_code == 421, (method, path)
            assert answer.headers["content-type"] == "application/problem+json"
            assert "loopback Host" in answer.json()["detail"]
        state = await client.get(f"/v1/servers/{SERVERS[0]}")
        assert state.json()["admin_state"] == "enabled"


async def test_a_token_protected_api_answers_any_host_name(service):
    async with client_for(service, ADMIN, "http://broker.example") as client:
        assert (await client.get("/v1/sessions")).status_code == 200


CROSS_SITE = [
    {"Origin": "http://evil.example"},
    {"Origin": "null"},
    {"Origin": "http://127.0.0.1:9999"},  # another port is another origin
    {"Origin": "https://127.0.0.1:8080"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "cross-site"},
]


@pytest.mark.parametrize("tokens", ["open", "admin"])
async def test_a_change_from_another_site_is_refused(open_service, service, tokens):
    target, token = (open_service, None) if tokens == "open" else (service, ADMIN)
    async with client_for(target, token, "http://127.0.0.1:8080") as client:
        for headers in CROSS_SITE:
            for method, path in (("POST", DRAIN), *CHANGES):
                answer = await client.request(method, path, headers=headers)
                assert answer.status_code == 403, (headers, method, path)
                assert answer.headers["content-type"] == "application/problem+json"
                assert answer.json()["title"] == "Cross-site request refused"
            # Reads stay readable (a cross-site page cannot see the answer without CORS anyway).
            assert (await client.get("/v1/servers", headers=headers)).status_code == 200
        state = await client.get(f"/v1/servers/{SERVERS[0]}")
        assert state.json()["admin_state"] == "enabled"


@pytest.mark.parametrize(
    "headers",
    [
        {},  # the CLI, curl: no Origin
        {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"},  # the dashboard
        {"Origin": "HTTP://127.0.0.1:8080"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ],
)
async def test_a_change_from_the_api_own_origin_or_no_browser_is_accepted(open_service, headers):
    async with client_for(open_service, None, "http://127.0.0.1:8080") as client:
        answer = await client.post(DRAIN, headers=headers)
        assert answer.status_code == 200, answer.text
