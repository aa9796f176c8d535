"""The dashboard's drain cell in headless Chromium (under the broker's CSP, nothing leaving loopback): a
drain until empty shows its step and counts while it runs, and how it ended once the server is empty."""

from __future__ import annotations

import re

import httpx
import psycopg
import pytest
from playwright.sync_api import Browser, expect

from tests.e2e.test_dashboard import browser, enter_token, watched
from tests.integration.rest import conftest as rest
from tests.integration.rest.conftest import SERVERS, LiveBroker

live_broker = rest.live_broker
__all__ = ["browser", "live_broker"]  # fixtures, used by name
WAIT_MS = 20_000  # the page refreshes every 5 s


@pytest.fixture
def fast_drains(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDBROKER_DRAIN_INTERVAL_S", "0.5")


def test_the_server_table_shows_a_drain_until_empty(
    fast_drains: None, live_broker: LiveBroker, pg_database_url: str, browser: Browser
) -> None:
    address = SERVERS[0]
    with psycopg.connect(pg_database_url, autocommit=True) as db:
        db.execute(
            'INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from, '
            "client_address, created_at, updated_at, expires_at, end_reason, confirmed) VALUES "
            "('s-ben', 'default', 'ben', 'ben', %s, 'pending', 'route', '', now(), now(), "
            "now() + interval '1 hour', '', false)",
            (address,),
        )
    admin = {"Authorization": f"Bearer {rest.ADMIN}"}
    drain = {"notify": "Restart at noon", "logoff_disconnected_after_s": 600}
    answer = httpx.post(f"{live_broker.url}/v1/servers/{address}/drain", json=drain, headers=admin)
    assert answer.status_code == 200, answer.text

    with watched(browser, timezone_id="UTC") as (context, watch):
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.set_default_timeout(30_000)
        page.goto(live_broker.url + "/")
        enter_token(page, rest.READ, "needs a read or admin token")
        cell = page.locator(f'tr[data-address="{address}"] td.drain')
        # ben's pending claim is neither messaged nor logged off: the drain waits for it.
        expect(cell).to_have_text("waiting · 1 left · 0 messaged · 0 logged off", timeout=WAIT_MS)
        expect(cell).to_have_class(re.compile(r"\bdrain-running\b"))
        expect(cell).to_have_attribute(
            "title", re.compile(r"^1 session left: 0 active, 0 disconnected, 1 pending\n")
        )
        expect(page.locator(f'tr[data-address="{SERVERS[1]}"] td.drain')).to_have_text("\N{EN DASH}")

        gone = httpx.delete(f"{live_broker.url}/v1/sessions/s-ben", headers=admin)
        assert gone.status_code == 200, gone.text
        expect(cell).to_have_text("drained → maintenance", timeout=WAIT_MS)
        expect(page.locator(f'tr[data-address="{address}"] td.state')).to_have_text("maintenance")
    assert errors == []
    watch.assert_clean()
