"""Every REST endpoint of docs/api.md against a real PostgreSQL: shapes, filters, pages, state changes,
problem+json errors."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from rdbroker_broker import domain as d
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.tables import servers
from rdbroker_broker.rest.app import create_app
from rdbroker_broker.service import BrokerService
from rdbroker_rdp import encode_routing_token
from tests.integration.rest.conftest import ADMIN, READ, SERVERS, place

PROBLEM = "application/problem+json"


def assert_problem(
    response: httpx.Response, status: int, title: str, detail_part: str = ""
) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"] == title
    assert detail_part in body["detail"]
    assert body["instance"] == response.request.url.path
    return body


async def test_user_lookup_names_the_server(client, service):
    decision = await place(service, "alice", "c1")
    answer = (await client.get("/v1/users/ALICE/sessions")).json()
    assert answer["user"] == "ALICE"
    (session,) = answer["sessions"]
    assert session["id"] == decision.session_id
    assert session["server_address"] == decision.server_address
    assert session["state"] == "pending"
    assert session["pool"] == "default"
    assert set(session) == {
        "id", "user", "pool", "server_address", "state", "created_at", "updated_at",
        "disconnected_at", "expires_at", "end_reason", "confirmed",
    }  # fmt: skip
    assert session["confirmed"] is False  # a claim until the server's agent lists it
    assert (await client.get("/v1/users/nobody/sessions")).json() == {"user": "nobody", "sessions": []}


async def test_a_full_name_finds_the_session_of_a_truncated_cookie(client, service):
    decision = await place(service, "CORP\\alic", "c1")  # mstsc sent 9 characters of CORP\alice
    answer = (await client.get("/v1/users/CORP%5Calice/sessions")).json()
    assert [s["id"] for s in answer["sessions"]] == [decision.session_id]
    assert answer["sessions"][0]["user"] == "CORP\\alic"


@pytest.mark.parametrize(("placed_as", "looked_up"), [("CORP\\bob", "bob"), ("bob", "CORP%5CBOB")])
async def test_a_bare_name_and_a_domain_name_find_each_other(client, service, placed_as, looked_up):
    """The pool has no `domain`: a bare and a qualified spelling are one account (docs/accounts.md)."""
    decision = await place(service, placed_as, "c1")
    answer = (await client.get(f"/v1/users/{looked_up}/sessions")).json()
    assert [s["id"] for s in answer["sessions"]] == [decision.session_id]


async def test_lookup_by_pool_and_ended_sessions(client, service):
    decision = await place(service, "bob", "c1")
    await service.end_session(decision.session_id)
    assert (await client.get("/v1/users/bob/sessions")).json()["sessions"] == []
    ended = (await client.get("/v1/users/bob/sessions", params={"include_ended": "true"})).json()
    assert [(s["state"], s["end_reason"]) for s in ended["sessions"]] == [("ended", "operator")]
    assert (await client.get("/v1/users/bob/sessions", params={"pool": "sales"})).json()["sessions"] == []
    assert_problem(
        await client.get("/v1/users/bob/sessions", params={"pool": "nope"}), 404, "Not found", "nope"
    )


async def test_session_list_filters_and_pages(client, service):
    placed = [await place(service, f"user{i}", f"c{i}") for i in range(5)]
    sales = await place(service, "carol", "c-sales", pool="Sales")
    await service.end_session(placed[0].session_id)

    page = (await client.get("/v1/sessions", params={"limit": 2})).json()
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (5, 2, 0, 2)
    rest = (await client.get("/v1/sessions", params={"limit": 2, "offset": 4})).json()
    assert len(rest["items"]) == 1
    everything = (await client.get("/v1/sessions", params={"limit": 500})).json()["items"]
    assert {s["id"] for s in everything} == {p.session_id for p in placed[1:]} | {sales.session_id}

    by_pool = (await client.get("/v1/sessions", params={"pool": "Sales"})).json()
    assert [s["user"] for s in by_pool["items"]] == ["carol"]
    by_user = (await client.get("/v1/sessions", params={"user": "USER3"})).json()
    assert [s["id"] for s in by_user["items"]] == [placed[3].session_id]
    server = placed[1].server_address
    by_server = (await client.get("/v1/sessions", params={"server": server, "limit": 500})).json()
    assert by_server["items"]
    assert all(s["server_address"] == server for s in by_server["items"])
    ended = (await client.get("/v1/sessions", params={"state": "ended"})).json()
    assert [s["id"] for s in ended["items"]] == [placed[0].session_id]
    both = (await client.get("/v1/sessions", params=[("state", "ended"), ("state", "pending")])).json()
    assert both["total"] == 6


async def test_session_list_rejects_bad_parameters(client):
    body = assert_problem(await client.get("/v1/sessions", params={"limit": 0}), 422, "Invalid request")
    assert body["errors"][0]["location"] == "query.limit"
    assert_problem(
        await client.get("/v1/sessions", params={"state": "sleeping"}), 422, "Invalid request", "state"
    )
    assert_problem(await client.get("/v1/sessions", params={"offset": -1}), 422, "Invalid request", "offset")
    assert_problem(
        await client.get("/v1/sessions", params={"user": "a\x00b"}), 422, "Invalid request", "user"
    )


async def test_end_a_session(client, service):
    decision = await place(service, "dave", "c1")
    ended = await client.delete(f"/v1/sessions/{decision.session_id}")
    assert ended.status_code == 200
    assert (ended.json()["state"], ended.json()["end_reason"]) == ("ended", "operator")
    again = await client.delete(f"/v1/sessions/{decision.session_id}")
    assert again.json() == ended.json()
    assert_problem(await client.delete("/v1/sessions/unknown"), 404, "Not found", "unknown")
    # the user is placed anew
    assert (await place(service, "dave", "c2")).session_id != decision.session_id


async def test_servers_show_health_load_sessions_and_state(client, service):
    await place(service, "erin", "c1")
    servers = (await client.get("/v1/servers")).json()["servers"]
    assert [s["address"] for s in servers] == [SERVERS[2], SERVERS[0], SERVERS[1]]  # Sales sorts first
    first = next(s for s in servers if s["address"] == SERVERS[0])
    assert first["max_sessions"] == 50
    assert (first["admin_state"], first["effective_admin_state"], first["health"]) == (
        "enabled", "enabled", "unknown",
    )  # fmt: skip
    assert (first["load"], first["routable"], first["agent_state"]) == (-1, True, "none")
    assert sum(s["live_sessions"] for s in servers) == 1
    sales = (await client.get("/v1/servers", params={"pool": "sales"})).json()["servers"]
    assert [s["address"] for s in sales] == [SERVERS[2]]
    assert_problem(await client.get("/v1/servers", params={"pool": "x"}), 404, "Not found", "'x'")
    one = await client.get(f"/v1/servers/{SERVERS[1]}")
    assert one.json()["address"] == SERVERS[1]
    assert_problem(await client.get("/v1/servers/10.9.9.9:3389"), 404, "Not found", "10.9.9.9:3389")


@pytest.mark.parametrize(("action", "state", "routable"), [
    ("drain", "draining", False), ("maintenance", "maintenance", False), ("enable", "enabled", True),
])  # fmt: skip
async def test_server_state_actions(client, action, state, routable):
    answer = await client.post(f"/v1/servers/{SERVERS[0]}/{action}")
    assert answer.status_code == 200
    assert (answer.json()["admin_state"], answer.json()["routable"]) == (state, routable)
    assert (await client.get(f"/v1/servers/{SERVERS[0]}")).json()["admin_state"] == state
    assert_problem(await client.post(f"/v1/servers/10.9.9.9:3389/{action}"), 404, "Not found")


async def test_register_change_and_remove_a_server(client):
    created = await client.post(
        "/v1/servers",
        json={"address": "10.0.0.13:3389", "max_sessions": 20, "agent_url": "http://10.0.0.13:8088/load"},
    )
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/servers/10.0.0.13:3389"
    assert (created.json()["pool"], created.json()["weight"], created.json()["max_sessions"]) == (
        "default",
        100,
        20,
    )
    assert_problem(await client.post("/v1/servers", json={"address": "10.0.0.13:3389"}), 409, "Conflict")

    drained = await client.post(
        "/v1/servers", json={"address": "10.0.1.22:3389", "pool": "sales", "admin_state": "draining"}
    )
    assert (drained.json()["pool"], drained.json()["admin_state"]) == ("Sales", "draining")

    changed = await client.patch("/v1/servers/10.0.0.13:3389", json={"weight": 250, "agent_url": ""})
    assert (changed.json()["weight"], changed.json()["agent_url"], changed.json()["max_sessions"]) == (
        250,
        "",
        20,
    )
    unchanged = await client.patch("/v1/servers/10.0.0.13:3389", json={})
    assert unchanged.json() == changed.json()
    assert_problem(await client.patch("/v1/servers/10.9.9.9:3389", json={"weight": 1}), 404, "Not found")

    v6 = await client.post("/v1/servers", json={"address": "[2001:DB8::1]:3389"})
    assert (v6.json()["address"], v6.headers["location"]) == (
        "[2001:db8::1]:3389",
        "/v1/servers/[2001:db8::1]:3389",
    )

    removed = await client.delete("/v1/servers/10.0.0.13:3389")
    assert (removed.status_code, removed.content) == (204, b"")
    assert_problem(await client.get("/v1/servers/10.0.0.13:3389"), 404, "Not found")


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({}, "body.address"),
        ({"address": "no-port"}, "body.address"),
        ({"address": "10.0.0.1:70000"}, "body.address"),
        ({"address": "\U0001f60dx:12"}, "body.address"),
        ({"address": "[0.]:2"}, "body.address"),
        ({"address": "10.0.0.1:3389", "weight": -1}, "body.weight"),
        ({"address": "10.0.0.1:3389", "agent_url": "ftp://x"}, "body.agent_url"),
        ({"address": "10.0.0.1:3389", "admin_state": "asleep"}, "body.admin_state"),
        ({"address": "10.0.0.1:3389", "color": "red"}, "body.color"),
    ],
)
async def test_register_validates_its_input(client, body, location):
    problem = assert_problem(await client.post("/v1/servers", json=body), 422, "Invalid request")
    assert problem["errors"][0]["location"] == location
    assert problem["detail"].startswith(location)


async def test_register_in_an_unknown_pool_is_404(client):
    assert_problem(
        await client.post("/v1/servers", json={"address": "10.0.0.1:3389", "pool": "x"}), 404, "Not found"
    )


async def test_removing_a_server_with_live_sessions_needs_force(client, service):
    decision = await place(service, "frank", "c1")
    refused = assert_problem(await client.delete(f"/v1/servers/{decision.server_address}"), 409, "Conflict")
    assert "1 live session" in refused["detail"]
    assert (
        await client.delete(f"/v1/servers/{decision.server_address}", params={"force": "true"})
    ).status_code == 204
    ended = (await client.get("/v1/users/frank/sessions", params={"include_ended": "true"})).json()[
        "sessions"
    ]
    assert [(s["state"], s["end_reason"]) for s in ended] == [("ended", "server_removed")]


async def test_pools_count_servers_and_sessions(client, service):
    await place(service, "gina", "c1")
    pools = (await client.get("/v1/pools")).json()["pools"]
    counts = [
        (p["name"], p["default"], p["disconnect_timeout_s"], p["servers"], p["live_sessions"]) for p in pools
    ]
    assert counts == [("Sales", False, 7200.0, 1, 0), ("default", True, 3600.0, 2, 1)]


DEFAULT_SETTINGS = {
    "domain": "",
    "upn_suffixes": [],
    "junk_bytes": 2048,
    "confirm_timeout_s": 120.0,
    "stale_after_ms": 0,
    "logon_lag_s": 30.0,
    "honor_routing_tokens": True,
    "probe_interval_ms": 0,
    "probe_timeout_ms": 0,
    "probe_rise": 0,
    "probe_fall": 0,
    "sessions_interval_ms": 0,
    "placement": "breadth",
}


async def test_pools_show_every_setting(client):
    sales = (await client.get("/v1/pools")).json()["pools"][0]
    assert sales == {
        "name": "Sales", "default": False, "disconnect_timeout_s": 7200.0, "servers": 1, "live_sessions": 0,
        **DEFAULT_SETTINGS,
    }  # fmt: skip
    assert (await client.get("/v1/pools/sales")).json() == sales
    assert_problem(await client.get("/v1/pools/nope"), 404, "Not found", "nope")


async def test_patch_a_pool_changes_its_settings(client, service):
    body = {
        "domain": "CORP",
        "upn_suffixes": ["Corp.Example.com", "@corp.example.org."],
        "junk_bytes": 4096,
        "confirm_timeout_s": 300,
        "stale_after_ms": 30_000,
        "logon_lag_s": 0,
        "honor_routing_tokens": False,
        "probe_interval_ms": 1000,
        "sessions_interval_ms": 5000,
        "disconnect_timeout_s": 1800,
    }
    answer = await client.patch("/v1/pools/SALES", json=body)
    assert answer.status_code == 200, answer.text
    changed = answer.json()
    assert changed["name"] == "Sales"
    assert changed["upn_suffixes"] == ["corp.example.com", "corp.example.org"]  # stored lower case
    assert {k: changed[k] for k in body if k != "upn_suffixes"} == {
        k: v for k, v in body.items() if k != "upn_suffixes"
    }
    pool = next(p for p in await service.list_pools() if p.name == "Sales")
    assert (pool.domain, pool.upn_suffixes, pool.junk_bytes, pool.stale_after_ms) == (
        "CORP",
        ("corp.example.com", "corp.example.org"),
        4096,
        30_000,
    )
    assert (pool.confirm_timeout_s, pool.logon_lag_s, pool.sessions_interval_ms) == (300.0, 0.0, 5000)
    assert pool.honor_routing_tokens is False

    # A subset changes only itself; an empty body changes nothing; "" and [] clear; 0 means the default.
    again = await client.patch("/v1/pools/Sales", json={"junk_bytes": 0})
    assert {**changed, "junk_bytes": 0} == again.json()
    assert (await client.patch("/v1/pools/Sales", json={})).json() == again.json()
    cleared = await client.patch(
        "/v1/pools/Sales",
        json={"upn_suffixes": [], "domain": "", "stale_after_ms": 0, "probe_interval_ms": 0},
    )
    assert {
        k: cleared.json()[k] for k in ("domain", "upn_suffixes", "stale_after_ms", "probe_interval_ms")
    } == {
        "domain": "",
        "upn_suffixes": [],
        "stale_after_ms": 0,
        "probe_interval_ms": 0,
    }
    # The other pool is untouched.
    default = (await client.get("/v1/pools/default")).json()
    assert {k: default[k] for k in DEFAULT_SETTINGS} == DEFAULT_SETTINGS


@pytest.mark.parametrize(
    ("body", "location", "message"),
    [
        ({"junk_bytes": -1}, "body.junk_bytes", "expected 0 bytes to 1MiB"),
        ({"junk_bytes": 2 * 1024 * 1024}, "body.junk_bytes", "expected 0 bytes to 1MiB"),
        ({"junk_bytes": "lots"}, "body.junk_bytes", "integer"),
        ({"confirm_timeout_s": 0}, "body.confirm_timeout_s", "expected 1s to 1d"),
        ({"stale_after_ms": 500}, "body.stale_after_ms", "expected 1s to 1d, or 0 for three probe intervals"),
        ({"logon_lag_s": 3601}, "body.logon_lag_s", "expected 0s to 1h"),
        ({"sessions_interval_ms": 50}, "body.sessions_interval_ms", "expected 100ms to 1h, or 0"),
        ({"probe_rise": 101}, "body.probe_rise", "expected an integer from 1 to 100"),
        ({"disconnect_timeout_s": 0}, "body.disconnect_timeout_s", "expected 1s to 366d"),
        ({"domain": "CORP\\bob"}, "body.domain", "NetBIOS domain name"),
        ({"domain": "ABCDEFGHIJKLMNOP"}, "body.domain", "at most 15 characters"),
        ({"upn_suffixes": ["corp..com"]}, "body.upn_suffixes.0", "is not a DNS name"),
        ({"upn_suffixes": "corp.com"}, "body.upn_suffixes", "list"),
        ({"upn_suffixes": ["a.com", "A.com"]}, "body.upn_suffixes", "a.com is listed twice"),
        ({"name": "other"}, "body.name", "Extra inputs"),
        ({"default": True}, "body.default", "Extra inputs"),
        # A security switch takes true or false only: "false" or 0 must not read as a value.
        ({"honor_routing_tokens": "false"}, "body.honor_routing_tokens", "expected true or false"),
        ({"honor_routing_tokens": 0}, "body.honor_routing_tokens", "expected true or false"),
        ({"honor_routing_tokens": "yes"}, "body.honor_routing_tokens", "expected true or false"),
    ],
)
async def test_patch_a_pool_refuses_bad_values(client, body, location, message):
    problem = assert_problem(await client.patch("/v1/pools/default", json=body), 422, "Invalid request")
    assert problem["errors"][0]["location"] == location
    assert message in problem["errors"][0]["message"]
    unchanged = (await client.get("/v1/pools/default")).json()
    assert (unchanged["junk_bytes"], unchanged["honor_routing_tokens"]) == (2048, True)  # nothing changed


async def test_patch_a_pool_to_ignore_routing_tokens(client, service):
    host, port = SERVERS[1].split(":")  # the default pool's second server
    token = encode_routing_token(host, int(port))
    first = await service.route(d.RouteRequest("t1", proxy_id="p1", cookie="ada", routing_token=token))
    assert (first.reason, first.server_address) == (d.RouteReason.TOKEN, SERVERS[1])
    answer = await client.patch("/v1/pools/default", json={"honor_routing_tokens": False})
    assert (answer.status_code, answer.json()["honor_routing_tokens"]) == (200, False)
    ignored = await service.route(d.RouteRequest("t2", proxy_id="p1", cookie="bea", routing_token=token))
    assert (ignored.reason, ignored.server_address) == (d.RouteReason.NEW, SERVERS[0])  # least loaded
    assert (await client.get("/v1/pools/Sales")).json()["honor_routing_tokens"] is True


async def test_patch_a_pool_refuses_settings_that_contradict_each_other(client):
    problem = assert_problem(
        await client.patch("/v1/pools/default", json={"upn_suffixes": ["corp.example.com"]}),
        400,
        "Invalid input",
        "upn_suffixes: UPN suffixes need the pool's `domain`",
    )
    assert "errors" not in problem
    await client.patch("/v1/pools/default", json={"domain": "CORP", "upn_suffixes": ["corp.example.com"]})
    # Clearing the domain alone would leave the suffixes meaning nothing.
    assert_problem(
        await client.patch("/v1/pools/default", json={"domain": ""}), 400, "Invalid input", "domain"
    )
    assert_problem(
        await client.patch("/v1/pools/default", json={"probe_interval_ms": 5000, "stale_after_ms": 5000}),
        400,
        "Invalid input",
        "stale_after_ms: must be longer than the probe interval (5s)",
    )
    assert (await client.get("/v1/pools/default")).json()["probe_interval_ms"] == 0
    # A pool without its own interval has the broker's (RDBROKER_PROBE_INTERVAL_MS, 2s here).
    assert_problem(
        await client.patch("/v1/pools/default", json={"stale_after_ms": 2000}),
        400,
        "Invalid input",
        "stale_after_ms: must be longer than the probe interval (2s)",
    )
    assert (await client.patch("/v1/pools/default", json={"stale_after_ms": 2001})).status_code == 200


async def test_patch_an_unknown_pool_is_404_and_needs_the_admin_token(client):
    assert_problem(await client.patch("/v1/pools/nope", json={"junk_bytes": 1}), 404, "Not found", "nope")
    refused = await client.patch(
        "/v1/pools/default", json={"junk_bytes": 1}, headers={"Authorization": f"Bearer {READ}"}
    )
    assert_problem(refused, 403, "Admin token required")
    unauthenticated = await client.patch(
        "/v1/pools/default", json={"junk_bytes": 1}, headers={"Authorization": ""}
    )
    assert_problem(unauthenticated, 401, "Authentication required")
    assert (await client.get("/v1/pools/default")).json()["junk_bytes"] == 2048


async def test_servers_show_held_sessions_and_a_stale_result_as_unknown(client, service, engine):
    decision = await place(service, "hana", "c1")
    now = service.now()
    probed = now - timedelta(minutes=2)
    other = next(a for a in SERVERS[:2] if a != decision.server_address)
    async with engine.begin() as conn:
        await conn.execute(
            update(servers)
            .where(servers.c.address == decision.server_address)
            .values(
                health="up",
                agent_state="up",
                load=40,
                probed_at=probed,
                fresh_until=now - timedelta(seconds=1),
            )
        )
        await conn.execute(
            update(servers)
            .where(servers.c.address == other)
            .values(
                health="down", agent_state="up", load=70, probed_at=now, fresh_until=now + timedelta(hours=1)
            )
        )
    listed = {s["address"]: s for s in (await client.get("/v1/servers")).json()["servers"]}
    stale = listed[decision.server_address]
    assert (stale["health"], stale["stale"], stale["agent_state"], stale["load"]) == (
        "unknown",
        True,
        "none",
        -1,
    )
    assert datetime.fromisoformat(stale["probed_at"]) == probed
    assert (stale["live_sessions"], stale["held_sessions"], stale["routable"]) == (1, 1, True)
    fresh = listed[other]
    assert (fresh["health"], fresh["stale"], fresh["load"], fresh["held_sessions"]) == ("down", False, 70, 0)
    never = listed[SERVERS[2]]
    assert (never["health"], never["stale"], never["probed_at"]) == ("unknown", False, None)
    one = (await client.get(f"/v1/servers/{decision.server_address}")).json()
    assert (one["health"], one["stale"]) == ("unknown", True)


async def test_unknown_paths_and_methods_are_problems(client):
    assert_problem(await client.get("/v1/nothing"), 404, "Not found", "/v1/nothing")
    assert_problem(await client.put("/v1/servers"), 405, "Method not allowed", "PUT")
    malformed = await client.post(
        "/v1/servers", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(malformed, 422, "Invalid request")


async def test_probes_dashboard_and_openapi(client):
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    page = await client.get("/", headers={"Authorization": ""})
    assert page.status_code == 200
    assert '<script src="/dashboard/app.js" defer></script>' in page.text
    assert (await client.get("/dashboard/app.js")).headers["content-type"].startswith("text/javascript")
    schema = (await client.get("/openapi.json")).json()
    assert {"/v1/users/{user}/sessions", "/v1/sessions", "/v1/servers", "/v1/pools"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert (await client.get("/docs")).status_code == 200


async def test_the_database_down_is_503_but_the_broker_stays_ready(service: BrokerService, client):
    """Calls that need the database fail; readiness does not follow (a failover would empty the
    Service); /v1/status tells the database's state from what the calls found, and its return."""
    assert (await client.get("/v1/status")).json()["database"]["state"] == "up"
    working = service.store.engine
    service.store.engine = make_engine("postgresql://postgres:S3cretPw@127.0.0.1:1/nowhere?connect_timeout=2")
    try:
        assert_problem(await client.get("/v1/servers"), 503, "Unavailable", "unreachable")
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        status = (await client.get("/v1/status")).json()
        assert status["ready"] is True
        database = status["database"]
        assert database["state"] == "down"
        assert database["last_error"].startswith("the database is unreachable: ")
        assert "port 1 failed" in database["last_error"]
        assert "S3cretPw" not in str(status)
    finally:
        await service.store.engine.dispose()
        service.store.engine = working
    assert (await client.get("/v1/servers")).status_code == 200
    database = (await client.get("/v1/status")).json()["database"]
    assert (database["state"], database["last_error"] is not None) == ("up", True)


async def test_status_says_what_runs(client, service: BrokerService):
    from rdbroker_broker.rest.app import create_app, set_stopping

    status = (await client.get("/v1/status")).json()
    assert status["version"] == "0.1.0"
    assert (status["ready"], status["database"]["state"], status["database"]["last_error"]) == (
        True,
        "up",
        None,
    )
    app = create_app(service, schema_revision="0008")
    set_stopping(app)  # what SIGTERM does first
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers) as stopping:
        assert_problem(await stopping.get("/readyz"), 503, "Unavailable", "shutting down")
        status = (await stopping.get("/v1/status")).json()
        assert (status["ready"], status["schema_revision"]) == (False, "0008")


async def test_a_bug_is_a_bare_500_problem(service, monkeypatch, caplog):
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service, "pool_summaries", broken)
    transport = httpx.ASGITransport(app=create_app(service), raise_app_exceptions=False)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://broker", headers=headers) as client:
        body = assert_problem(await client.get("/v1/pools"), 500, "Internal error", "see its log")
    assert "secret" not in str(body)
    assert "unexpected error on GET /v1/pools: RuntimeError" in caplog.text


async def test_patching_a_pools_domain_rekeys_its_live_sessions(client, service, engine):
    """`bob` placed before the pool named its domain is stored under the key `bob`; once the pool says
    CORP, his live session moves to the account's key `corp\\bob`, so every spelling finds it."""
    from sqlalchemy import text

    first = await service.route(d.RouteRequest("c1", pool="Sales", cookie="bob"))
    answer = await client.patch("/v1/pools/Sales", json={"domain": "CORP"})
    assert answer.status_code == 200, answer.text
    async with engine.connect() as conn:
        key = await conn.execute(
            text("SELECT user_key FROM sessions WHERE id = :id"), {"id": first.session_id}
        )
        assert key.scalar_one() == "corp\\bob"
    again = await service.route(d.RouteRequest("c2", pool="Sales", cookie="CORP\\bob"))
    assert (again.session_id, again.reason) == (first.session_id, d.RouteReason.RECONNECT)
    [session] = (await client.get("/v1/users/CORP%5Cbob/sessions")).json()["sessions"]
    assert session["id"] == first.session_id
