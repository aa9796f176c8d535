"""The dashboard's pictures in headless Chromium, under the broker's CSP with nothing leaving loopback:
each pool's sessions per server by state as stacked bars, logons per minute from `GET /v1/history`, a
server's sessions on a click of its row (with the session actions, here a log off through the server's
agent), the route explain view (the broker's own answers; hidden when a broker answers 404 for
`GET /v1/route/explain`; a rule, notes and unavailable servers drawn from an answer of that contract),
and a 200-server farm read with one request per table refresh."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, Route, expect

from tests.e2e.test_dashboard import browser, enter_token, watched
from tests.integration.rest import conftest as rest
from tests.integration.rest.conftest import SERVERS, LiveBroker
from tests.support.agent_thread import QUSER_ALICE, windows_agent
from tests.unit.agent.fakes import FakeSources

live_broker = rest.live_broker
__all__ = ["browser", "live_broker"]  # fixtures, used by name
ADMIN = {"Authorization": f"Bearer {rest.ADMIN}"}
BIG_FARM = 200

# (id, user, server, state): SERVERS[0] holds 2 active, 1 disconnected, 1 pending; SERVERS[1] 1 active.
SEEDED = [
    ("s-alice", "alice", SERVERS[0], "active"),
    ("s-amy", "amy", SERVERS[0], "active"),
    ("s-dan", "dan", SERVERS[0], "disconnected"),
    ("s-pat", "pat", SERVERS[0], "pending"),
    ("s-bob", "bob", SERVERS[1], "active"),
]


def seed(db: psycopg.Connection, now: datetime) -> None:
    for sid, user, server, state in SEEDED:
        db.execute(
            'INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from, '
            "client_address, created_at, updated_at, disconnected_at, expires_at, end_reason, confirmed) "
            "VALUES (%s, 'default', %s, %s, %s, %s, 'route', '', %s, %s, %s, %s, '', true)",
            (sid, user, user, server, state, now - timedelta(minutes=30), now,
             now - timedelta(minutes=5) if state == "disconnected" else None, now + timedelta(hours=1)),
        )  # fmt: skip
    # Route answers: 3 new and 1 reconnect ten minutes ago, 2 new seventy minutes ago, and a proxy's
    # retry (attempt 1), which is no logon.
    answers = [(f"c{n}", 0, "new", 10) for n in range(3)] + [("c3", 0, "reconnect", 10)]
    answers += [("c4", 0, "new", 70), ("c5", 0, "new", 70), ("c5", 1, "new", 70)]
    # Refusals as the brokers' sweeps write them: 2 (no capacity) in the minute of the logons, 1 (unknown
    # pool) ten minutes later.
    ten_ago = (now - timedelta(minutes=10)).replace(second=0, microsecond=0)
    for minute, reason, count in (
        (ten_ago, "resource_exhausted", 2),
        (ten_ago + timedelta(minutes=10), "not_found", 1),
    ):
        db.execute(
            "INSERT INTO route_refusals (minute, reason, count) VALUES (%s, %s, %s)", (minute, reason, count)
        )
    for connection_id, attempt, reason, ago in answers:
        db.execute(
            "INSERT INTO connections (connection_id, attempt, session_id, proxy_id, server_address, reason, "
            '"user", pool, client_address, created_at, bytes_from_client, bytes_from_server, duration_ms, '
            "end_reason) VALUES (%s, %s, 's-alice', 'p1', %s, %s, 'alice', 'default', '', %s, 0, 0, 0, '')",
            (connection_id, attempt, SERVERS[0], reason, now - timedelta(minutes=ago)),
        )


def test_bars_history_and_a_servers_sessions(
    live_broker: LiveBroker, pg_database_url: str, browser: Browser, tmp_path
) -> None:
    sources = FakeSources(outputs={("quser",): QUSER_ALICE, ("logoff", "5"): ""})
    with windows_agent(sources) as agent, watched(browser, timezone_id="UTC") as (context, watch):
        answer = httpx.patch(
            f"{live_broker.url}/v1/servers/{SERVERS[0]}",
            json={"sessions_url": f"http://127.0.0.1:{agent.port}/sessions"},
            headers=ADMIN,
        )
        assert answer.status_code == 200, answer.text
        with psycopg.connect(pg_database_url, autocommit=True) as db:
            seed(db, datetime.now(UTC))
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.goto(live_broker.url + "/")
        enter_token(page, rest.READ, "needs a read or admin token")

        # Stacked bars: a bar per server of the pool, a segment per state with its count.
        bars = page.locator("article.pool[data-pool=default] svg.pool-bars g.bar")
        expect(bars).to_have_count(2)
        first = page.locator(f'article.pool[data-pool=default] g.bar[data-address="{SERVERS[0]}"]')
        for state, count in (("active", "2"), ("disconnected", "1"), ("pending", "1")):
            expect(first.locator(f"rect[data-state={state}]")).to_have_attribute("data-count", count)
        second = page.locator(f'g.bar[data-address="{SERVERS[1]}"]')
        expect(second.locator("rect.seg")).to_have_count(1)
        expect(second.locator("rect[data-state=active]")).to_have_attribute("data-count", "1")
        expect(page.locator(f'g.bar[data-address="{SERVERS[2]}"] rect.seg')).to_have_count(0)
        # The tallest bar is the pool's scale; the row's bar says the same in its title.
        expect(page.locator("article.pool[data-pool=default] .pool-scale")).to_have_text(
            "tallest: 4 sessions"
        )
        row = page.locator(f'tr.server[data-address="{SERVERS[0]}"]')
        expect(row.locator("td.sessions")).to_have_text("4")
        expect(row.locator("td.sessions")).to_have_attribute("title", "2 active, 1 disconnected, 1 pending")
        expect(page.locator('#tiles li[data-tile="active"] .tile-value')).to_have_text("3")
        expect(page.locator('#tiles li[data-tile="disconnected"] .tile-value')).to_have_text("1")
        expect(page.locator('#tiles li[data-tile="pending"] .tile-value')).to_have_text("1")

        # Logons per minute: 6 first answers in two minutes of the last 3 hours, 4 of them this hour;
        # refusals below the line, 3 in two minutes.
        chart = page.locator("#history-chart")
        expect(chart).to_have_attribute("data-logons", "6")
        expect(chart).to_have_attribute("data-refused", "3")
        expect(chart.locator("g.minute")).to_have_count(3)
        recent = chart.locator("g.minute").nth(1)
        expect(recent).to_have_attribute("data-logons", "4")
        expect(recent).to_have_attribute("data-refused", "2")
        expect(recent.locator("rect.seg-new")).to_have_count(1)
        expect(recent.locator("rect.seg-reconnect")).to_have_count(1)
        expect(recent.locator("rect.seg-refused")).to_have_count(1)
        expect(chart.locator("g.minute").last.locator("rect")).to_have_count(1)
        expect(page.locator('#tiles li[data-tile="logons"] .tile-value')).to_have_text("4")
        expect(page.locator('#tiles li[data-tile="refused"] .tile-value')).to_have_text("3")
        expect(page.locator('#tiles li[data-tile="refused"]')).to_have_class("alarm")
        page.select_option("#history-hours", "1")
        expect(chart).to_have_attribute("data-logons", "4")

        # A click on the row lists the server's live sessions, with the session actions.
        sessions = page.locator(f'tr.server-sessions[data-address="{SERVERS[0]}"]')
        expect(sessions).to_have_count(0)
        row.locator("td.address").click()
        expect(row).to_have_attribute("aria-expanded", "true")
        listed = sessions.locator("tbody tr")
        expect(listed).to_have_count(4)
        expect(sessions.locator("td.user")).to_have_text(["alice", "amy", "dan", "pat"])
        alice = sessions.locator("tr[data-session=s-alice]")
        expect(alice.locator("td.state")).to_have_text("active")
        expect(alice.locator("button")).to_have_text(["Log off", "Disconnect", "Message…"])
        # The list stays open across refreshes (the table is drawn anew every 5 s).
        page.wait_for_timeout(6000)
        expect(listed).to_have_count(4)

        alice.locator('button[data-action="logoff"]').click()
        expect(page.locator("#action-question")).to_have_text(
            f"Log alice off {SERVERS[0]}? Their programs end; unsaved work is lost."
        )
        page.click("#action-ok")
        enter_token(page, rest.ADMIN, "needs the admin token")
        expect(sessions.locator(".server-sessions-message")).to_have_text(
            f"Log off alice: logged off session 5 on {SERVERS[0]}."
        )
        expect(listed).to_have_count(3)
        expect(first.locator("rect[data-state=active]")).to_have_attribute("data-count", "1")
        page.screenshot(path=str(tmp_path / "dashboard-charts.png"), full_page=True)

        # Another click closes it.
        row.locator("td.address").click()
        expect(sessions).to_have_count(0)
        page.close()
    assert sources.runs == [("quser",), ("logoff", "5")]
    assert errors == []
    watch.assert_clean()


def test_explain_from_the_broker_hidden_on_404_and_drawn_from_its_answer(
    live_broker: LiveBroker, browser: Browser, tmp_path
) -> None:
    with watched(browser) as (context, watch):
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.goto(live_broker.url + "/")
        enter_token(page, rest.READ, "needs a read or admin token")
        # No Route yet: an empty chart says so, and a pool without sessions draws no bars.
        expect(page.locator("#history-message")).to_have_text("No logons or refusals in this time.")
        expect(page.locator("article.pool[data-pool=Sales] svg.pool-bars")).to_be_hidden()

        # The broker's own explain: no assignment rules, the default pool, a new session on either server.
        expect(page.locator("#explain")).to_be_visible()
        page.fill("#explain-user", "alice")
        page.click("#explain-form button[type=submit]")
        facts = page.locator("#explain-result dl.explain-facts")
        expect(facts.locator("[data-fact=rule] dd")).to_have_text(
            "no rule matched (0 rules): the default pool"
        )
        expect(facts.locator("[data-fact=pool] dd")).to_have_text("default (breadth)")
        expect(facts.locator("[data-fact=decision] dd")).to_have_text("a new session")
        expect(facts.locator("[data-fact=server] dd")).to_have_text(
            re.compile("|".join(map(re.escape, SERVERS[:2])))
        )
        expect(page.locator("#explain-result .explain-candidates tbody tr")).to_have_count(2)
        page.fill("#explain-client", "not-an-address")
        page.click("#explain-form button[type=submit]")
        expect(page.locator("#explain-message")).to_contain_text("400")
        expect(page.locator("#explain-result")).to_be_hidden()
        page.close()

        # A broker without the route (404 to the page's question): the view stays hidden.
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        asked: list[str] = []

        def missing(route: Route) -> None:
            asked.append(route.request.url)
            problem = {"title": "Not found", "status": 404, "detail": "no such resource: /v1/route/explain"}
            route.fulfill(status=404, content_type="application/problem+json", body=json.dumps(problem))

        page.route(re.compile(r".*/v1/route/explain(\?.*)?$"), missing)
        page.goto(live_broker.url + "/")
        enter_token(page, rest.READ, "needs a read or admin token")
        expect(page.locator(f'tr.server[data-address="{SERVERS[0]}"]')).to_be_visible()
        page.wait_for_function("() => document.querySelector('#history-chart').dataset.minutes !== undefined")
        assert asked == [f"{live_broker.url}/v1/route/explain"]
        expect(page.locator("#explain")).to_be_hidden()
        page.close()

        # A broker with the route: its answers (the contract of docs/api.md) drawn.
        explained = {
            "user": "CORP\\fin-alice", "client": "10.20.1.5", "pool_asked": "",
            "assignment": {"rule": 1, "match": "user CORP\\fin-*", "rules": 2, "consulted": True},
            "pool": "finance", "placement": "depth", "account_key": "corp\\fin-alice",
            "decision": "new", "server": "10.0.1.1:3389",
            "why": "new session: depth placement takes the highest effective load below its limit",
            "notes": ["ends session s-1: its server is down"], "session": None,
            "candidates": [
                {"address": "10.0.1.1:3389", "effective_load": 0.25, "load": -1, "held_sessions": 1,
                 "max_sessions": 4, "weight": 100},
                {"address": "10.0.1.2:3389", "effective_load": 0.0, "load": 10, "held_sessions": 0,
                 "max_sessions": 4, "weight": 100},
            ],
            "eligible": 2, "unavailable": [{"address": "10.0.1.3:3389", "why": "draining"}],
        }  # fmt: skip
        queries: list[str] = []

        def explain(route: Route) -> None:
            query = urlsplit(route.request.url).query
            queries.append(query)
            if not query:  # the page's question: is the route there?
                problem = {"title": "Unprocessable content", "status": 422, "detail": "query.user: missing"}
                route.fulfill(status=422, content_type="application/problem+json", body=json.dumps(problem))
            else:
                route.fulfill(status=200, content_type="application/json", body=json.dumps(explained))

        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.route(re.compile(r".*/v1/route/explain(\?.*)?$"), explain)
        page.goto(live_broker.url + "/")  # the token is this tab's: asked again
        enter_token(page, rest.READ, "needs a read or admin token")
        expect(page.locator("#explain")).to_be_visible()
        page.fill("#explain-user", "CORP\\fin-alice")
        page.fill("#explain-client", "10.20.1.5")
        page.click("#explain-form button[type=submit]")
        facts = page.locator("#explain-result dl.explain-facts")
        expect(facts.locator("[data-fact=rule] dd")).to_have_text("rule 1 of 2: user CORP\\fin-*")
        expect(facts.locator("[data-fact=pool] dd")).to_have_text("finance (depth)")
        expect(facts.locator("[data-fact=decision] dd")).to_have_text("a new session")
        expect(facts.locator("[data-fact=server] dd")).to_have_text("10.0.1.1:3389")
        expect(page.locator("#explain-result .explain-notes li")).to_have_text(
            ["ends session s-1: its server is down"]
        )
        candidates = page.locator("#explain-result .explain-candidates tbody tr")
        expect(candidates).to_have_count(2)
        expect(candidates.first).to_have_class("picked")
        expect(page.locator("#explain-result .explain-unavailable")).to_have_text(
            "2 servers take new sessions. Not taking new sessions: 10.0.1.3:3389 (draining)."
        )
        assert "user=CORP%5Cfin-alice&client=10.20.1.5" in queries
        page.screenshot(path=str(tmp_path / "dashboard-explain.png"), full_page=True)
        page.close()
    assert errors == []
    watch.assert_clean()


@pytest.mark.slow
def test_a_200_server_farm_is_read_in_one_request_per_table(
    live_broker: LiveBroker, pg_database_url: str, browser: Browser, tmp_path
) -> None:
    now = datetime.now(UTC)
    with psycopg.connect(pg_database_url, autocommit=True) as db:
        for n in range(BIG_FARM):
            db.execute(
                "INSERT INTO servers (address, pool, weight, max_sessions, admin_state, health, "
                "health_detail, agent_state, agent_detail, load, placements_since_report, live_sessions, "
                "held_sessions, "
                "agent_url, sessions_url, created_at, updated_at) VALUES (%s, 'Sales', 100, 20, 'enabled', "
                "'unknown', '', 'none', '', -1, 0, 0, 0, '', '', %s, %s)",
                (f"10.9.{n // 250}.{n % 250 + 1}:3389", now, now),
            )
        seed(db, now)
    with watched(browser) as (context, watch):
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(30_000)
        api: list[str] = []
        page.on("request", lambda r: api.append(urlsplit(r.url).path) if "/v1/" in r.url else None)
        page.goto(live_broker.url + "/")
        enter_token(page, rest.READ, "needs a read or admin token")
        expect(page.locator("article.pool[data-pool=Sales] g.bar")).to_have_count(BIG_FARM + 1)
        expect(page.locator("article.pool[data-pool=Sales] tr.server")).to_have_count(BIG_FARM + 1)
        api.clear()
        page.wait_for_timeout(11_000)  # two refreshes
        per_path = {path: api.count(path) for path in set(api)}
        assert set(per_path) <= {"/v1/servers", "/v1/pools", "/v1/history"}, per_path
        assert 2 <= per_path["/v1/servers"] <= 3
        assert per_path.get("/v1/history", 0) <= 1  # every 30 s
        page.screenshot(path=str(tmp_path / "dashboard-200.png"), full_page=False)
        page.close()
    assert errors == []
    watch.assert_clean()
