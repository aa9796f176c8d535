"""The audit trail through the REST API (docs/security.md, Audit trail): each change verb writes one log
line and one `audit` row by the token that made it and the client it came from; a refused change writes
its line and no row; `GET /v1/audit` pages and filters, for the admin token only."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from rdbroker_broker import callers
from rdbroker_broker import domain as d
from rdbroker_broker.db import migrate
from rdbroker_broker.db.audit_repository import AuditFilter
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.farm import Farm, apply_caller, apply_farm
from rdbroker_broker.rest.app import create_app
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from tests.integration.rest.conftest import ADMIN, READ, SERVERS, place, settings_for
from tests.support.audit import audit_lines, audit_rows, fields

A, B, IN_SALES = SERVERS
NEW = "10.0.2.1:3389"
ADMIN_FROM_TEST = ("token:admin", "127.0.0.1")  # httpx's ASGI transport calls from 127.0.0.1
SETUP = callers.Caller("test-setup")

Setup = Callable[[BrokerService], Awaitable[Any]]


async def nothing(service: BrokerService) -> None:
    return None


async def drained(service: BrokerService) -> None:
    with callers.use_caller(SETUP):
        await service.set_server_state(A, d.AdminState.DRAINING)


async def a_session_on_a(service: BrokerService) -> str:
    with callers.use_caller(SETUP):
        await service.set_server_state(B, d.AdminState.MAINTENANCE)
    decision = await place(service, "alice", "c1")
    assert decision.server_address == A
    return decision.session_id


# (setup, method, path (may name what setup answered), body, action, target, detail)
VERBS: list[tuple[Setup, str, str, Any, str, str, str]] = [
    (
        nothing,
        "POST",
        "/v1/servers",
        {"address": NEW, "pool": "sales", "weight": 5},
        "server.add",
        NEW,
        "pool Sales, weight 5, max_sessions 0, agent_url '', sessions_url '', admin_state enabled",
    ),
    (nothing, "PATCH", f"/v1/servers/{A}", {"weight": 7}, "server.update", A, "weight 100 -> 7"),
    (
        nothing,
        "PATCH",
        f"/v1/servers/{A}",
        {"admin_state": "draining", "max_sessions": 50},  # 50 is what it was
        "server.update",
        A,
        "admin_state enabled -> draining",
    ),
    (nothing, "DELETE", f"/v1/servers/{IN_SALES}", None, "server.remove", IN_SALES, "pool Sales"),
    (
        a_session_on_a,
        "DELETE",
        f"/v1/servers/{A}?force=true",
        None,
        "server.remove",
        A,
        "pool default, 1 live sessions ended",
    ),
    (nothing, "POST", f"/v1/servers/{A}/drain", None, "server.drain", A, "admin_state enabled -> draining"),
    (
        nothing,
        "POST",
        f"/v1/servers/{A}/maintenance",
        None,
        "server.maintenance",
        A,
        "admin_state enabled -> maintenance",
    ),
    (drained, "POST", f"/v1/servers/{A}/enable", None, "server.enable", A, "admin_state draining -> enabled"),
    (
        a_session_on_a,
        "DELETE",
        "/v1/sessions/{}",
        None,
        "session.end",
        "{}",
        f"on {A} (pool default), reason operator",
    ),
    (
        nothing,
        "PATCH",
        "/v1/pools/SALES",
        {"junk_bytes": 4096, "domain": "CORP"},
        "pool.update",
        "Sales",  # the pool's own name, however the request spelt it
        "domain '' -> CORP, junk_bytes 2048 -> 4096",
    ),
]


@pytest.mark.parametrize(
    ("setup", "method", "path", "body", "action", "target", "detail"),
    VERBS,
    ids=[f"{v[4]}-{i}" for i, v in enumerate(VERBS)],
)
async def test_each_change_writes_its_line_and_its_record(
    client, service, engine, caplog, setup, method, path, body, action, target, detail
):
    made = await setup(service)
    path, target = path.format(made), target.format(made)
    caplog.clear()
    answer = await client.request(method, path, json=body)
    assert answer.status_code < 300, answer.text

    [line] = audit_lines(caplog)
    assert fields(line) == (action, target, *ADMIN_FROM_TEST, "ok")
    assert line["detail"] == detail
    [row] = await audit_rows(engine, actor="token:admin")
    assert fields(row) == fields(line)
    if action == "session.end":
        assert row["detail"] == f"{detail}; user alice"  # the user's name in the record, not in the log
    else:
        assert row["detail"] == detail
    assert row["at"] is not None


REFUSED = [
    ("POST", f"/v1/servers/{NEW}/drain", None, "server.drain", NEW, 404, "not_found"),
    ("PATCH", "/v1/servers/10.9.9.9:3389", {"weight": 1}, "server.update", "10.9.9.9:3389", 404, "not_found"),
    ("DELETE", "/v1/sessions/nosuchsession", None, "session.end", "nosuchsession", 404, "not_found"),
    ("PATCH", "/v1/pools/nope", {"junk_bytes": 1}, "pool.update", "nope", 404, "not_found"),
    ("POST", "/v1/servers", {"address": A}, "server.add", A, 409, "conflict"),
    ("PATCH", f"/v1/servers/{A}", {"weight": -1}, "server.update", A, 422, "invalid"),
    ("POST", "/v1/servers", {"address": "no port"}, "server.add", "no port", 422, "invalid"),
    ("PATCH", "/v1/pools/Sales", {"upn_suffixes": ["corp.example"]}, "pool.update", "Sales", 400, "invalid"),
    ("PATCH", "/v1/pools/Sales", {"color": "red"}, "pool.update", "Sales", 422, "invalid"),
    ("DELETE", f"/v1/sessions/{'x' * 65}", None, "session.end", "x" * 65, 422, "invalid"),
]


@pytest.mark.parametrize(("method", "path", "body", "action", "target", "status", "outcome"), REFUSED)
async def test_a_refused_change_logs_why_and_stores_nothing(
    client, engine, caplog, method, path, body, action, target, status, outcome
):
    before = await audit_rows(engine)
    caplog.clear()
    answer = await client.request(method, path, json=body)
    assert answer.status_code == status, answer.text
    [line] = audit_lines(caplog)
    assert fields(line) == (action, target, *ADMIN_FROM_TEST, outcome)
    assert line["detail"]  # why, as the problem's detail says it
    assert await audit_rows(engine) == before


async def test_a_server_with_live_sessions_is_not_removed_and_the_refusal_says_so(
    client, service, engine, caplog
):
    await a_session_on_a(service)
    caplog.clear()
    answer = await client.delete(f"/v1/servers/{A}")
    assert answer.status_code == 409
    [line] = audit_lines(caplog)
    assert fields(line) == ("server.remove", A, *ADMIN_FROM_TEST, "conflict")
    assert "1 live session" in line["detail"]
    assert await audit_rows(engine, actor="token:admin") == []


async def test_a_change_that_changes_nothing_logs_unchanged_and_stores_nothing(
    client, service, engine, caplog
):
    session_id = await a_session_on_a(service)
    assert (await client.delete(f"/v1/sessions/{session_id}")).status_code == 200
    assert (await client.post(f"/v1/servers/{A}/enable")).status_code == 200
    assert (await client.patch(f"/v1/servers/{A}", json={"weight": 100})).status_code == 200
    caplog.clear()
    assert (await client.delete(f"/v1/sessions/{session_id}")).json()["state"] == "ended"
    assert [(line["action"], line["outcome"]) for line in audit_lines(caplog)] == [
        ("session.end", "unchanged")
    ]
    rows = await audit_rows(engine, actor="token:admin")
    assert [row["action"] for row in rows] == ["session.end"]  # the first end only


async def test_a_change_refused_by_the_auth_layer_is_not_an_audited_attempt(service, engine, caplog):
    transport = httpx.ASGITransport(app=create_app(service))
    for token, status in ((READ, 403), ("wrong", 401)):
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers) as http:
            assert (await http.post(f"/v1/servers/{A}/drain")).status_code == status
            assert (await http.patch(f"/v1/servers/{A}", json={"weight": -1})).status_code == status
    assert audit_lines(caplog) == []
    assert await audit_rows(engine, action="server.drain") == []


async def test_an_open_api_is_the_actor_open_api(engine, pg_database_url, caplog):
    no_tokens = settings_for(pg_database_url, api_read_token=SecretStr(""), api_admin_token=SecretStr(""))
    service = BrokerService(Store(engine), no_tokens)
    transport = httpx.ASGITransport(app=create_app(service), client=("127.0.0.5", 4000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as http:
        assert (await http.post(f"/v1/servers/{A}/drain")).status_code == 200
        [line] = audit_lines(caplog)
        assert fields(line) == ("server.drain", A, "open-api", "127.0.0.5", "ok")
        page = (await http.get("/v1/audit", params={"actor": "open-api"})).json()
    assert [(item["action"], item["client"]) for item in page["items"]] == [("server.drain", "127.0.0.5")]


# --- GET /v1/audit -----------------------------------------------------------------------------------


async def test_only_the_admin_token_reads_the_trail(service):
    transport = httpx.ASGITransport(app=create_app(service))
    for token, status in ((None, 401), ("wrong", 401), (READ, 403), (ADMIN, 200)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers) as http:
            assert (await http.get("/v1/audit")).status_code == status, token


async def test_pages_newest_first_and_filters(client, engine):
    for verb in ("drain", "enable", "maintenance", "enable", "drain"):
        assert (await client.post(f"/v1/servers/{A}/{verb}")).status_code == 200
    assert (await client.post(f"/v1/servers/{B}/drain")).status_code == 200

    seen: list[dict[str, Any]] = []
    before = None
    for _ in range(10):  # bounded: 3 pages expected
        params: dict[str, Any] = {"limit": 2, "actor": "token:admin"}
        if before is not None:
            params["before"] = before
        page = (await client.get("/v1/audit", params=params)).json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        before = page["next_before"]
        if before is None:
            break
        assert before == page["items"][-1]["id"]
    assert [(item["action"], item["target"]) for item in seen] == [
        ("server.drain", B),
        ("server.drain", A),
        ("server.enable", A),
        ("server.maintenance", A),
        ("server.enable", A),
        ("server.drain", A),
    ]
    assert [item["id"] for item in seen] == sorted((item["id"] for item in seen), reverse=True)
    assert set(seen[0]) == {"id", "at", "actor", "client", "action", "target", "outcome", "detail"}
    assert {(item["actor"], item["client"], item["outcome"]) for item in seen} == {(*ADMIN_FROM_TEST, "ok")}

    async def listed(**params: Any) -> list[tuple[str, str]]:
        page = (await client.get("/v1/audit", params=params)).json()
        return [(item["action"], item["target"]) for item in page["items"]]

    assert await listed(action="server.enable") == [("server.enable", A)] * 2
    assert await listed(target=B) == [("server.drain", B), ("server.add", B)]
    assert await listed(action="server.drain", target=A) == [("server.drain", A)] * 2
    # The fixture's farm, applied by `apply_farm` as this test's OS user: one record per change line.
    assert await listed(actor=apply_caller().actor) == [
        ("server.add", IN_SALES),
        ("server.add", B),
        ("server.add", A),
        ("pool.create", "Sales"),
        ("pool.create", "default"),
    ]
    assert await listed(actor="token:read") == []
    assert len(await listed()) == 11  # the farm's five and the six above
    assert await listed(limit=1, before=seen[-1]["id"]) == [("server.add", IN_SALES)]
    last = (await client.get("/v1/audit", params={"limit": 11})).json()
    assert (len(last["items"]), last["next_before"]) == (11, None)
    assert (await client.get("/v1/audit", params={"limit": 10})).json()["next_before"] is not None


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 1001}, {"before": 0}, {"before": "x"}, {"action": "a" * 65}, {"actor": "\x01"}],
)
async def test_bad_paging_and_filters_are_422(client, params):
    answer = await client.get("/v1/audit", params=params)
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"] == "application/problem+json"


# --- the embedded SQLite -----------------------------------------------------------------------------


async def test_the_trail_on_sqlite(tmp_path, caplog):
    url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
        await apply_farm(
            engine, Farm(pools=[d.Pool("default", True, 3600.0)], servers=[d.Server(A, "default")])
        )
        service = BrokerService(Store(engine), settings_for(url))
        transport = httpx.ASGITransport(app=create_app(service))
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers) as http:
            assert (await http.post(f"/v1/servers/{A}/drain")).status_code == 200
            assert (await http.post(f"/v1/servers/{NEW}/drain")).status_code == 404
            assert (await http.post("/v1/servers", json={"address": NEW})).status_code == 201
            page = (await http.get("/v1/audit", params={"actor": "token:admin", "limit": 1})).json()
            assert [(i["action"], i["target"]) for i in page["items"]] == [("server.add", NEW)]
            older = (await http.get("/v1/audit", params={"before": page["next_before"]})).json()
        assert [(i["action"], i["target"], i["outcome"]) for i in older["items"]] == [
            ("server.drain", A, "ok"),
            ("server.add", A, "ok"),
            ("pool.create", "default", "ok"),
        ]
        assert [(line["action"], line["outcome"]) for line in audit_lines(caplog)] == [
            ("pool.create", "ok"),
            ("server.add", "ok"),
            ("server.drain", "ok"),
            ("server.drain", "not_found"),
            ("server.add", "ok"),
        ]
        rows = await service.audit_trail(AuditFilter(target=NEW), 10)
        assert [(row.action, row.actor) for row in rows] == [("server.add", "token:admin")]
    finally:
        await engine.dispose()
