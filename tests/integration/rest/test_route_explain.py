"""`GET /v1/route/explain` and `rdbroker route explain`: the rule, the pool and the server a Route
would give a user now, and why; and placement modes through the REST API (PATCH /v1/pools)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker.__main__ import apply_main
from rdbroker_broker.farm import Farm, apply_farm
from rdbroker_cli.__main__ import main as rdbroker
from tests.integration.rest.conftest import READ, LiveBroker, place
from tests.integration.rest.test_api import assert_problem

FINANCE = ("10.0.1.1:3389", "10.0.1.2:3389", "10.0.1.3:3389")
LAB = "10.0.2.1:3389"
FARM = Farm(
    pools=[
        d.Pool("default", True, 3600.0),
        d.Pool("finance", False, 3600.0, domain="CORP", placement=d.Placement.DEPTH),
        d.Pool("lab", False, 3600.0),
    ],
    servers=[
        d.Server("10.0.0.11:3389", "default"),
        *(d.Server(address, "finance", max_sessions=4) for address in FINANCE),
        d.Server(LAB, "lab"),
    ],
    assignments=[a.Rule("finance", user="CORP\\fin-*"), a.Rule("lab", network="10.20.0.0/16")],
)
FARM_YAML = """\
pools:
  - name: default
    default: true
  - name: finance
    domain: CORP
    placement: depth
  - name: lab
servers:
  - {address: 10.0.0.11:3389, pool: default}
  - {address: 10.0.1.1:3389, pool: finance, max_sessions: 4}
  - {address: 10.0.1.2:3389, pool: finance, max_sessions: 4}
  - {address: 10.0.1.3:3389, pool: finance, max_sessions: 4}
  - {address: 10.0.2.1:3389, pool: lab}
assignments:
  - match: {user: 'CORP\\fin-*'}
    pool: finance
  - match: {network: 10.20.0.0/16}
    pool: lab
"""
TABLES = ("pools", "servers", "sessions", "connections", "assignments", "audit", "proxies")


@pytest.fixture
async def farm(engine: AsyncEngine) -> None:
    plan = await apply_farm(engine, FARM, prune=True)
    assert not plan.refusals


async def snapshot(engine: AsyncEngine) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table the routing reads or writes."""
    async with engine.connect() as conn:
        return {
            t: sorted(map(tuple, await conn.execute(text(f"SELECT * FROM {t}"))), key=repr) for t in TABLES
        }


async def test_explain_by_account_places_nothing(client, service, engine, farm):
    await service.set_server_state(FINANCE[2], d.AdminState.DRAINING)
    before = await snapshot(engine)
    answer = await client.get("/v1/route/explain", params={"user": "fin-alice", "client": "10.20.1.5"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {k: body[k] for k in ("user", "client", "pool_asked", "pool", "placement", "account_key")} == {
        "user": "fin-alice",
        "client": "10.20.1.5",
        "pool_asked": "",
        "pool": "finance",
        "placement": "depth",
        "account_key": "corp\\fin-alice",  # in pool finance's domain: the glob matches it
    }
    assert body["assignment"] == {"rule": 1, "match": "user CORP\\fin-*", "rules": 2, "consulted": True}
    assert (body["decision"], body["server"], body["session"]) == ("new", FINANCE[0], None)
    assert body["why"] == (
        "new session: depth placement takes the highest effective load below its limit (0 here) among "
        "the 2 servers that take new sessions"
    )
    assert [c["address"] for c in body["candidates"]] == [FINANCE[0], FINANCE[1]]
    assert body["eligible"] == 2
    assert body["unavailable"] == [{"address": FINANCE[2], "why": "draining"}]
    # Placing nothing: two calls, the same answer, and not a row written anywhere.
    again = await client.get("/v1/route/explain", params={"user": "fin-alice", "client": "10.20.1.5"})
    assert again.json() == body
    assert await snapshot(engine) == before

    # What explain said is what a Route does.
    placed = await place(service, "fin-alice", "c1")
    assert (placed.pool, placed.server_address) == ("finance", FINANCE[0])
    # Now it is a reconnect, found by another spelling of the account.
    before = await snapshot(engine)
    body = (await client.get("/v1/route/explain", params={"user": "CORP\\FIN-ALICE"})).json()
    assert (body["decision"], body["server"], body["session"]["id"]) == (
        "reconnect",
        FINANCE[0],
        placed.session_id,
    )
    assert body["why"] == f"reconnect: the user's pending session {placed.session_id} is on {FINANCE[0]}"
    # Depth fills the server the first user opened.
    body = (await client.get("/v1/route/explain", params={"user": "CORP\\fin-bob"})).json()
    assert (body["decision"], body["server"]) == ("new", FINANCE[0])
    assert body["candidates"][0]["effective_load"] == 0.25  # one session of four, weight 100
    assert await snapshot(engine) == before


async def test_explain_by_network_and_by_named_pool(client, service, engine, farm):
    before = await snapshot(engine)
    body = (
        await client.get("/v1/route/explain", params={"user": "bob", "client": "[::ffff:10.20.9.9]:50000"})
    ).json()
    assert (body["client"], body["assignment"]["rule"], body["pool"], body["server"]) == (
        "10.20.9.9",
        2,
        "lab",
        LAB,
    )
    assert body["assignment"]["match"] == "network 10.20.0.0/16"
    body = (await client.get("/v1/route/explain", params={"user": "bob", "client": "10.30.0.1"})).json()
    assert (body["assignment"]["rule"], body["pool"], body["server"]) == (0, "default", "10.0.0.11:3389")
    # A client that names its pool (tsv://): the rules are not read.
    body = (await client.get("/v1/route/explain", params={"user": "CORP\\fin-x", "pool": "LAB"})).json()
    assert (body["pool_asked"], body["assignment"]["consulted"], body["pool"]) == ("LAB", False, "lab")
    # A session whose server went into maintenance: a Route would end it and place the user anew.
    placed = await place(service, "carol", "c1")
    await service.set_server_state(placed.server_address, d.AdminState.MAINTENANCE)
    before = await snapshot(engine)
    body = (await client.get("/v1/route/explain", params={"user": "carol"})).json()
    assert (body["decision"], body["server"], body["eligible"]) == ("none", "", 0)
    assert body["notes"] == [
        f"the user's pending session {placed.session_id} is on {placed.server_address}, which is in "
        "maintenance: a Route ends it and places the user anew"
    ]
    assert (
        body["why"] == "no server of the pool can take a new session: a Route is refused (RESOURCE_EXHAUSTED)"
    )
    assert await snapshot(engine) == before


async def test_explain_refuses_bad_input(client, farm):
    assert_problem(
        await client.get("/v1/route/explain", params={"user": "bob", "client": "10.20.1"}),
        400,
        "Invalid input",
        "client '10.20.1' is not an IP address",
    )
    assert_problem(
        await client.get("/v1/route/explain", params={"user": "bob", "pool": "nope"}),
        404,
        "Not found",
        "unknown pool 'nope'",
    )
    assert_problem(await client.get("/v1/route/explain"), 422, "Invalid request")
    assert_problem(await client.get("/v1/route/explain", params={"user": "a\x01b"}), 422, "Invalid request")
    answer = await client.get("/v1/route/explain", params={"user": "bob"}, headers={"Authorization": ""})
    assert answer.status_code == 401


async def test_placement_through_the_api(client, service, farm):
    pool = (await client.get("/v1/pools/finance")).json()
    assert pool["placement"] == "depth"
    assert_problem(
        await client.patch("/v1/pools/default", json={"placement": "depth"}),
        400,
        "Invalid input",
        "placement: depth placement fills each server up to its max_sessions, and 10.0.0.11:3389 has none",
    )
    assert_problem(
        await client.patch("/v1/pools/default", json={"placement": "deep"}), 422, "Invalid request"
    )
    assert (await client.patch("/v1/servers/10.0.0.11:3389", json={"max_sessions": 10})).status_code == 200
    changed = await client.patch("/v1/pools/default", json={"placement": "depth"})
    assert (changed.status_code, changed.json()["placement"]) == (200, "depth")
    assert_problem(
        await client.patch("/v1/servers/10.0.0.11:3389", json={"max_sessions": 0}),
        400,
        "Invalid input",
        "pool default: depth placement",
    )
    assert_problem(
        await client.post("/v1/servers", json={"address": "10.0.0.12:3389"}), 400, "Invalid input", "has none"
    )
    back = await client.patch("/v1/pools/default", json={"placement": "breadth"})
    assert back.json()["placement"] == "breadth"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rdbroker(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_cli_explains_and_sets_the_placement(live_broker: LiveBroker, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rdbroker_common.logs.configure", lambda *a, **k: None)  # keep pytest's capture
    monkeypatch.setenv("RDBROKER_URL", live_broker.url)
    monkeypatch.setenv("RDBROKER_TOKEN", READ)
    farm = tmp_path / "rules.yaml"
    farm.write_text(FARM_YAML)
    url = live_broker.env["RDBROKER_DATABASE_URL"]
    assert apply_main(["--database-url", url, "-f", str(farm), "--prune"]) == 0
    out = capsys.readouterr().out
    assert "set 2 assignment rules: 1. user CORP\\fin-* -> finance, 2. network 10.20.0.0/16 -> lab" in out

    code, out, err = run(capsys, "route", "explain", "CORP\\fin-alice", "--client", "10.20.1.5")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:6] == [
        "user:       CORP\\fin-alice (account key corp\\fin-alice)",
        "client:     10.20.1.5",
        "assignment: rule 1 of 2: user CORP\\fin-* -> finance",
        "pool:       finance (placement depth)",
        f"answer:     a new session on {FINANCE[0]}",
        "why:        new session: depth placement takes the highest effective load below its limit "
        "(0 here) among the 3 servers that take new sessions",
    ]
    assert lines[7] == "candidates, best first (3 of 3):"
    assert lines[8].split() == ["ADDRESS", "EFFECTIVE", "LOAD", "LOAD", "HELD", "MAX", "WEIGHT"]
    assert lines[9].split() == [FINANCE[0], "0", "-", "0", "4", "100"]
    assert lines[-1] == "nothing was placed: explain only reads"

    code, out, _ = run(capsys, "route", "explain", "dave", "--client", "10.30.0.1", "--json")
    assert code == 0
    answer = json.loads(out)
    assert (answer["assignment"]["rule"], answer["pool"], answer["decision"]) == (0, "default", "new")
    code, _, err = run(capsys, "route", "explain", "dave", "--client", "nowhere")
    assert (code, err) == (
        1,
        "rdbroker: 400 Invalid input: client 'nowhere' is not an IP address (expected 10.20.1.5, "
        "10.20.1.5:50123, 2001:db8::5 or [2001:db8::5]:50123)\n",
    )

    code, out, _ = run(capsys, "pools", "show", "finance")
    assert "placement:" in out
    assert "depth" in next(line for line in out.splitlines() if line.startswith("placement:"))
    admin = live_broker.env["RDBROKER_API_ADMIN_TOKEN"]
    code, _, err = run(capsys, "pools", "set", "default", "--placement", "depth", "--token", admin)
    assert code == 1
    assert "10.0.0.11:3389 has none" in err
