"""The dashboard in headless Chromium (Debian's `chromium`, driven by Playwright): it shows the demo's
servers, asks for a token, drains a server with the admin token and shows the new state; on an open API
(no tokens, as the demo runs) it drains without asking for one. Against a broker on PostgreSQL it shows
the pools' settings, a stale health result as unknown with its time, held sessions and whether the
server's agent confirmed a user's session, and logs a user off through the server's agent after asking.

Every page runs under the broker's Content-Security-Policy with no request leaving loopback (`watched`: a
request to another host is recorded and aborted, a CSP violation is recorded from the page's
`securitypolicyviolation` events and Chromium's console). `/docs` renders Swagger UI from the broker's
own files and calls the API from it; an inline script does not run and no other page may frame the broker.

scripts/test.sh installs chromium when it is missing; without it this test fails (it is not skipped).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Route, expect, sync_playwright

from tests.e2e.test_demo import demo_process
from tests.integration.rest import conftest as rest
from tests.integration.rest.conftest import SERVERS, LiveBroker
from tests.support.agent_thread import QUSER_ALICE, windows_agent
from tests.unit.agent.fakes import FakeSources

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
live_broker = rest.live_broker  # `rdbroker broker` on PostgreSQL, the REST tests' fixture
READ_TOKEN = "dashboard-read-token"
ADMIN_TOKEN = "dashboard-admin-token"


# Runs before any script of a page, outside its CSP (Playwright injects it through the DevTools protocol).
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  const line = `${event.effectiveDirective} blocked ${event.blockedURI || "inline"} on ${location.pathname}`;
  (window.cspViolations = window.cspViolations || []).push(line);
  window.reportCspViolation(line);
});
"""


def is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    try:
        return parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname or "").is_loopback
    except ValueError:
        return False


@dataclass
class Watch:
    """What the pages of one browser context asked for and what their CSP refused."""

    requests: list[str] = field(default_factory=list)
    off_host: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def route(self, route: Route) -> None:
        url = route.request.url
        self.requests.append(url)
        if is_loopback_url(url):
            route.continue_()
        else:  # recorded, and never sent: the tests talk to loopback only
            self.off_host.append(url)
            route.abort()

    def report(self, line: str) -> None:
        self.violations.append(line)

    def console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.violations.append(message.text)

    def assert_clean(self) -> None:
        assert self.off_host == []
        assert self.violations == []


@contextlib.contextmanager
def watched(browser: Browser, **options: Any) -> Iterator[tuple[BrowserContext, Watch]]:
    context = browser.new_context(**options)
    watch = Watch()
    context.expose_function("reportCspViolation", watch.report)
    context.add_init_script(REPORT_VIOLATIONS)
    context.on("console", watch.console)
    context.route("**/*", watch.route)
    try:
        yield context, watch
    finally:
        context.close()


def assert_hardening_headers(headers: dict[str, str]) -> None:
    policy = headers["content-security-policy"]
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "unsafe" not in policy
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-frame-options"] == "DENY"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = shutil.which("chromium") or CHROMIUM
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, timeout=60_000)
        yield browser
        browser.close()


def enter_token(page: Page, token: str, reason: str) -> None:
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#token-reason")).to_contain_text(reason)
    page.fill("#token-input", token)
    page.click("#token-ok")
    expect(dialog).to_be_hidden()


def test_drain_a_server_from_the_dashboard(tmp_path, browser):
    tokens = {"RDBROKER_API_READ_TOKEN": READ_TOKEN, "RDBROKER_API_ADMIN_TOKEN": ADMIN_TOKEN}
    with demo_process(tmp_path, tokens) as banner, watched(browser) as (context, watch):
        url = banner["dashboard"]
        address = banner["fake RDP servers"].split(", ")[0]
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        answer = page.goto(url)
        assert answer is not None
        assert_hardening_headers(answer.headers)

        # Reads need a token on this broker: the page asks for one, then shows the servers.
        enter_token(page, READ_TOKEN, "needs a read or admin token")
        row = page.locator(f'tr[data-address="{address}"]')
        expect(row).to_be_visible()
        expect(row.locator("td.state")).to_have_text("enabled")
        expect(page.locator("article.pool[data-pool=default] tbody tr")).to_have_count(3)
        # The audit trail is the admin token's to read: the panel says so, and asks nothing.
        page.click("#audit summary")
        expect(page.locator("#audit-message")).to_have_text(
            "The audit trail needs the admin token: use “Token…”."
        )
        expect(page.locator("#token-dialog")).to_be_hidden()
        page.click("#audit summary")

        # Draining needs the admin token: the read token is refused and the page asks again.
        row.locator('button[data-action="drain"]').click()
        enter_token(page, ADMIN_TOKEN, "needs the admin token")
        expect(row.locator("td.state")).to_have_text("draining")
        expect(row.locator('button[data-action="drain"]')).to_be_disabled()

        # The state is the broker's, not just the page's: a fresh page shows it too.
        page.reload()
        expect(page.locator(f'tr[data-address="{address}"] td.state')).to_have_text("draining")
        row.locator('button[data-action="enable"]').click()
        expect(row.locator("td.state")).to_have_text("enabled")

        # It refreshes itself: a change made elsewhere (here the API) shows up without a reload.
        other = banner["fake RDP servers"].split(", ")[1]
        answer = httpx.post(
            f"{url}v1/servers/{other}/maintenance", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert answer.status_code == 200
        expect(page.locator(f'tr[data-address="{other}"] td.state')).to_have_text(
            "maintenance", timeout=20_000
        )

        # Recent changes: the audit trail, newest first, by the token that made each change.
        page.click("#audit summary")
        newest = page.locator("#audit-entries tbody tr").first
        expect(newest.locator("td.action")).to_have_text("server.maintenance")
        expect(newest.locator("td.target")).to_have_text(other)
        expect(newest.locator("td.actor")).to_have_text("token:admin")
        expect(page.locator("#audit-entries td.action", has_text="server.drain")).to_have_count(1)

        # The user search answers from the same API.
        page.fill("#search-user", "nobody")
        page.click("#search-form button[type=submit]")
        expect(page.locator("#search-message")).to_have_text("No sessions for nobody.")
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        page.close()
        assert errors == []
        assert f"{url}dashboard/app.js" in watch.requests
        watch.assert_clean()


def test_drain_on_an_open_api_asks_for_no_token(tmp_path, browser):
    # As `rdbroker demo` runs by default: no tokens, loopback only. The buttons just work.
    no_tokens = {"RDBROKER_API_READ_TOKEN": "", "RDBROKER_API_ADMIN_TOKEN": ""}
    with demo_process(tmp_path, no_tokens) as banner, watched(browser) as (context, watch):
        address = banner["fake RDP servers"].split(", ")[0]
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.goto(banner["dashboard"])
        row = page.locator(f'tr[data-address="{address}"]')
        expect(row.locator("td.state")).to_have_text("enabled")

        row.locator('button[data-action="drain"]').click()
        expect(row.locator("td.state")).to_have_text("draining")
        expect(page.locator("#token-dialog")).to_be_hidden()
        page.click("#audit summary")
        newest = page.locator("#audit-entries tbody tr").first
        expect(newest.locator("td.action")).to_have_text("server.drain")
        expect(newest.locator("td.actor")).to_have_text("open-api")
        page.reload()
        expect(page.locator(f'tr[data-address="{address}"] td.state')).to_have_text("draining")
        expect(page.locator("#token-dialog")).to_be_hidden()
        page.close()
        assert errors == []
        watch.assert_clean()


def test_pool_settings_stale_results_and_confirmed_sessions(
    live_broker: LiveBroker, pg_database_url, browser, tmp_path
):
    # A broker on PostgreSQL with no health replica: the results written here stay as written.
    admin = {"Authorization": f"Bearer {rest.ADMIN}"}
    settings = {"domain": "CORP", "upn_suffixes": ["corp.example.com"], "junk_bytes": 4096,
                "confirm_timeout_s": 300, "stale_after_ms": 30_000, "logon_lag_s": 10,
                "sessions_interval_ms": 5000, "honor_routing_tokens": False}  # fmt: skip
    answer = httpx.patch(f"{live_broker.url}/v1/pools/default", json=settings, headers=admin)
    assert answer.status_code == 200, answer.text
    # Sales fills its one server first: depth needs its limit.
    answer = httpx.patch(
        f"{live_broker.url}/v1/servers/{SERVERS[2]}", json={"max_sessions": 20}, headers=admin
    )
    assert answer.status_code == 200, answer.text
    answer = httpx.patch(f"{live_broker.url}/v1/pools/Sales", json={"placement": "depth"}, headers=admin)
    assert answer.status_code == 200, answer.text
    stale, fresh = SERVERS[0], SERVERS[1]
    probed = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    with psycopg.connect(pg_database_url, autocommit=True) as db:
        db.execute(
            "UPDATE servers SET health = 'up', probed_at = %s, fresh_until = %s WHERE address = %s",
            (probed, probed + timedelta(seconds=30), stale),
        )
        db.execute(
            "UPDATE servers SET health = 'up', probed_at = now(), fresh_until = now() + interval '1 hour' "
            "WHERE address = %s",
            (fresh,),
        )
        for sid, user, state, confirmed in (
            ("s-ana", "ana", "disconnected", True),
            ("s-ben", "ben", "pending", False),
        ):
            db.execute(
                'INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from, '
                "client_address, created_at, updated_at, expires_at, end_reason, confirmed) VALUES (%s, "
                "'default', %s, %s, %s, %s, 'route', '', now(), now(), now() + interval '1 hour', '', %s)",
                (sid, user, user, stale, state, confirmed),
            )

    with watched(browser, timezone_id="UTC") as (context, watch):
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.goto(live_broker.url + "/")
        enter_token(page, rest.READ, "needs a read or admin token")

        pool = page.locator("article.pool[data-pool=default]")
        shown = {
            "domain": "Domain CORP",
            "upn_suffixes": "UPN suffixes corp.example.com",
            "junk_bytes": "Junk under 4 KiB",
            "confirm_timeout_s": "Confirm within 5m",
            "stale_after_ms": "Results stale after 30s",
            "logon_lag_s": "Logon lag 10s",
            "honor_routing_tokens": "Routing tokens ignored",
            "probe_interval_ms": "Probe every default",
            "sessions_interval_ms": "Session lists every 5s",
        }
        for setting, label in shown.items():
            expect(pool.locator(f'li[data-setting="{setting}"]')).to_have_text(label)
        sales = page.locator("article.pool[data-pool=Sales]")
        expect(sales.locator("li[data-setting=domain]")).to_have_text("Domain none")
        expect(sales.locator("li[data-setting=honor_routing_tokens]")).to_have_text("Routing tokens honoured")
        expect(sales.locator("li[data-setting=placement]")).to_have_text("Placement depth")
        expect(pool.locator("li[data-setting=placement]")).to_have_text("Placement breadth")

        stale_row = page.locator(f'tr[data-address="{stale}"]')
        expect(stale_row.locator("td.health")).to_have_text(f"unknown (last result {probed:%H:%M:%S})")
        expect(stale_row).to_have_class(re.compile(r"\bstale\b"))
        # ben's pending claim holds capacity, ana's confirmed disconnected session too.
        expect(stale_row.locator("td.sessions")).to_have_text("2")
        expect(stale_row.locator("td.held")).to_have_text("2")
        expect(page.locator(f'tr[data-address="{fresh}"] td.health')).to_have_text("up")
        expect(page.locator(f'tr[data-address="{fresh}"] td.power')).to_have_text("on")
        expect(page.locator(f'tr[data-address="{fresh}"] td.held')).to_have_text("0")

        for user, confirmed in (("ana", "yes"), ("ben", "claim")):
            page.fill("#search-user", user)
            page.click("#search-form button[type=submit]")
            row = page.locator(f"#search-results tr[data-session=s-{user}]")
            expect(row.locator("td.confirmed")).to_have_text(confirmed)
        page.screenshot(path=str(tmp_path / "dashboard-settings.png"), full_page=True)
    assert errors == []
    watch.assert_clean()


def test_log_a_user_off_from_the_dashboard(live_broker: LiveBroker, pg_database_url, browser, tmp_path):
    # alice's session on a server whose agent (Windows commands, faked) answers on 127.0.0.1.
    sources = FakeSources(outputs={("quser",): QUSER_ALICE, ("msg", "5", "Saving in 5 minutes"): "",
                                   ("logoff", "5"): ""})  # fmt: skip
    admin = {"Authorization": f"Bearer {rest.ADMIN}"}
    with windows_agent(sources) as agent, watched(browser) as (context, watch):
        sessions_url = f"http://127.0.0.1:{agent.port}/sessions"
        server_url = f"{live_broker.url}/v1/servers/{SERVERS[0]}"
        answer = httpx.patch(server_url, json={"sessions_url": sessions_url}, headers=admin)
        assert answer.status_code == 200, answer.text
        with psycopg.connect(pg_database_url, autocommit=True) as db:
            db.execute(
                'INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from, '
                "client_address, created_at, updated_at, expires_at, end_reason, confirmed) VALUES "
                "('s-alice', 'default', 'alice', 'alice', %s, 'active', 'route', '', now(), now(), NULL, '', "
                "true)",
                (SERVERS[0],),
            )
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.goto(live_broker.url + "/")
        enter_token(page, rest.READ, "needs a read or admin token")
        page.fill("#search-user", "alice")
        page.click("#search-form button[type=submit]")
        row = page.locator("#search-results tr[data-session=s-alice]")
        expect(row.locator("td.state")).to_have_text("active")

        # Each action asks first: cancelled, nothing is sent.
        dialog = page.locator("#action-dialog")
        row.locator('button[data-action="logoff"]').click()
        expect(dialog).to_be_visible()
        expect(page.locator("#action-question")).to_have_text(
            f"Log alice off {SERVERS[0]}? Their programs end; unsaved work is lost."
        )
        page.click("#action-cancel")
        expect(dialog).to_be_hidden()

        # A message: its text in the dialog; the read token is refused and the page asks for the admin's.
        row.locator('button[data-action="message"]').click()
        expect(page.locator("#action-text")).to_be_visible()
        page.fill("#action-text", "Saving in 5 minutes")
        page.click("#action-ok")
        enter_token(page, rest.ADMIN, "needs the admin token")
        expect(page.locator("#search-message")).to_have_text(
            f"Message alice: sent a message to session 5 on {SERVERS[0]}."
        )

        row.locator('button[data-action="logoff"]').click()
        expect(page.locator("#action-text")).to_be_hidden()
        page.click("#action-ok")
        expect(page.locator("#search-message")).to_have_text(
            f"Log off alice: logged off session 5 on {SERVERS[0]}."
        )
        # Ended in the directory at once: an ended session has no buttons (shown with include ended).
        page.check("#search-ended")
        page.click("#search-form button[type=submit]")
        expect(row.locator("td.state")).to_have_text("ended")
        expect(row.locator("button")).to_have_count(0)
        page.screenshot(path=str(tmp_path / "dashboard-session-actions.png"), full_page=True)
        page.close()
    assert sources.runs == [("quser",), ("msg", "5", "Saving in 5 minutes"), ("quser",), ("logoff", "5")]
    assert errors == []
    watch.assert_clean()


def test_docs_renders_swagger_ui_from_the_broker(live_broker: LiveBroker, browser, tmp_path):
    schema = httpx.get(f"{live_broker.url}/openapi.json").json()
    operations = sum(len(methods) for methods in schema["paths"].values())
    with watched(browser) as (context, watch):
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        answer = page.goto(live_broker.url + "/docs")
        assert answer is not None
        assert_hardening_headers(answer.headers)
        expect(page.locator(".information-container .title")).to_contain_text("rdbroker")
        expect(page.locator(".opblock")).to_have_count(operations)

        # Swagger UI's own calls run under the same policy: authorize with the read token, try a read.
        page.click("button.authorize")
        page.locator(".modal-ux input").fill(rest.READ)
        page.click(".modal-ux .auth-btn-wrapper button.authorize")
        page.click(".modal-ux button.btn-done")
        servers = page.locator(".opblock-get", has=page.locator('[data-path="/v1/servers"]'))
        servers.locator(".opblock-summary").click()
        servers.locator("button.try-out__btn").click()
        servers.locator("button.execute").click()
        expect(servers.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200")
        expect(servers.locator(".live-responses-table .microlight").first).to_contain_text(SERVERS[0])
        page.screenshot(path=str(tmp_path / "docs.png"))
        page.close()
    assert errors == []
    loaded = {urlsplit(url).path for url in watch.requests}
    assert {
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/init.js",
        "/openapi.json",
        "/v1/servers",
    } <= loaded
    watch.assert_clean()


def test_the_browser_runs_no_inline_script_and_frames_no_broker_page(live_broker: LiveBroker, browser):
    # The checks above can fail: an injected inline script is refused and reported, and so is a frame.
    with watched(browser) as (context, watch):
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(live_broker.url + "/docs")
        expect(page.locator(".opblock").first).to_be_visible()
        ran = page.evaluate(
            """() => {
                const script = document.createElement("script");
                script.textContent = "window.inlineRan = true";
                document.head.append(script);
                return window.inlineRan === true;
            }"""
        )
        assert ran is False
        page.wait_for_function("() => (window.cspViolations || []).length > 0")
        assert page.evaluate("window.cspViolations") == ["script-src-elem blocked inline on /docs"]

        framing = context.new_page()
        with framing.expect_console_message(lambda m: "frame-ancestors 'none'" in m.text):
            framing.set_content(f'<iframe src="{live_broker.url}/"></iframe>')
        [_, frame] = framing.frames
        assert frame.locator("#pools").count() == 0  # Chromium shows its error page instead
    assert watch.off_host == []
    assert any("frame-ancestors 'none'" in line for line in watch.violations)
