"""The dashboard in headless Chromium (Debian's `chromium`, driven by Playwright): it shows the demo's
servers, asks for a token, drains a server with the admin token and shows the new state; on an open API
(no tokens, as the demo runs) it drains without asking for one.

scripts/test.sh installs chromium when it is missing; without it this test fails (it is not skipped).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.e2e.test_demo import demo_process

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
READ_TOKEN = "dashboard-read-token"
ADMIN_TOKEN = "dashboard-admin-token"


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
    with demo_process(tmp_path, tokens) as banner:
        url = banner["dashboard"]
        address = banner["fake RDP servers"].split(", ")[0]
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.goto(url)

        # Reads need a token on this broker: the page asks for one, then shows the servers.
        enter_token(page, READ_TOKEN, "needs a read or admin token")
        row = page.locator(f'tr[data-address="{address}"]')
        expect(row).to_be_visible()
        expect(row.locator("td.state")).to_have_text("enabled")
        expect(page.locator("article.pool[data-pool=default] tbody tr")).to_have_count(3)

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

        # The user search answers from the same API.
        page.fill("#search-user", "nobody")
        page.click("#search-form button[type=submit]")
        expect(page.locator("#search-message")).to_have_text("No sessions for nobody.")
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        page.close()
        assert errors == []


def test_drain_on_an_open_api_asks_for_no_token(tmp_path, browser):
    # As `rdbroker demo` runs by default: no tokens, loopback only. The buttons just work.
    no_tokens = {"RDBROKER_API_READ_TOKEN": "", "RDBROKER_API_ADMIN_TOKEN": ""}
    with demo_process(tmp_path, no_tokens) as banner:
        address = banner["fake RDP servers"].split(", ")[0]
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(20_000)
        page.goto(banner["dashboard"])
        row = page.locator(f'tr[data-address="{address}"]')
        expect(row.locator("td.state")).to_have_text("enabled")

        row.locator('button[data-action="drain"]').click()
        expect(row.locator("td.state")).to_have_text("draining")
        expect(page.locator("#token-dialog")).to_be_hidden()
        page.reload()
        expect(page.locator(f'tr[data-address="{address}"] td.state')).to_have_text("draining")
        expect(page.locator("#token-dialog")).to_be_hidden()
        page.close()
        assert errors == []
