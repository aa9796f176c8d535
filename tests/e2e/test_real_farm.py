"""Real logons on a real two-server xrdp farm: users go back to their own desktop, through either proxy.

The farm (tests/support/real_farm.py): two xrdp + sesman servers with Xvnc desktops, each with the real
rdbroker-agent beside it (its xrdp source), a broker on PostgreSQL, two health replicas, two proxies; local
users made for the module. One farm serves the whole module and the tests run in order, each from the
state the one before left: alice's desktop on a server X, disconnected, reconnected, logged off...

They need root and Debian's xrdp, tigervnc-standalone-server, freerdp2-x11, xvfb and nmap
(scripts/install_system_deps.sh) and skip, saying which is missing, without them.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support import real_farm as rf
from tests.support import xrdp_server as xs

log = logging.getLogger(__name__)
pytestmark = pytest.mark.slow
INTERVAL = rf.SESSIONS_INTERVAL_S
# A list is read every INTERVAL; its report then takes a few tens of milliseconds on a quiet machine.
SLACK_S = 1.0


@pytest.fixture(scope="module")
def farm(pg_server_url: str) -> Iterator[rf.RealFarm]:
    missing = xs.missing_tools(rf.TOOLS)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: run scripts/install_system_deps.sh as root")
    farm = rf.real_farm(pg_server_url, ("alice", "bob", "carol"))
    try:
        yield farm
    finally:
        farm.stop()


@pytest.fixture(scope="module")
def state() -> dict[str, Any]:
    """What one test leaves for the next (alice's server X, her display, her session id)."""
    return {}


def created_display(sesman_text: str) -> str:
    """The display of the desktop sesman made or reconnected, from its log of one logon."""
    found = re.findall(r"display :?(\d+)", sesman_text)
    assert found, f"sesman logged no display:\n{sesman_text}"
    return found[-1]


def displays_written(farm: rf.RealFarm, name: str) -> list[str]:
    """The display numbers the user's session scripts wrote (one line per desktop made, none on a reconnect)."""
    path = Path(f"/home/{farm.users[name].name}") / xs.DESKTOPS_FILE
    lines = path.read_text().split() if path.exists() else []
    return [line.removeprefix(":").split(".")[0] for line in lines]  # `:10.0` -> `10`


def test_1_logon_then_killed_client_shows_disconnected_as_the_agent_reports(
    farm: rf.RealFarm, state: dict[str, Any]
) -> None:
    alice = farm.users["alice"].name
    logon = farm.logon(farm.proxies[0], "alice")
    x = logon.server
    assert xs.SESSION_CREATED in logon.sesman, logon.sesman  # a fresh desktop
    session = rf.wait_for(lambda: farm.live_session("alice"), "alice's session", 5) and farm.live_session("alice")
    assert session is not None and session["server_address"] == x.address, session
    rf.wait_for(lambda: farm.agent_sessions(x).get(alice) == "active", "agent lists alice active", 5)
    rf.wait_for(lambda: farm.live_session("alice")["confirmed"], "alice confirmed", INTERVAL + SLACK_S)

    killed = logon.kill()
    agent_s = rf.wait_for(
        lambda: farm.agent_sessions(x).get(alice) == "disconnected", "agent lists alice disconnected", 5
    )
    directory_s = rf.wait_for(
        lambda: farm.session(session["id"])["state"] == "disconnected", "directory disconnected", INTERVAL
    )
    # The proxy's close report may come first; the agent's next list must agree and keep it confirmed.
    time.sleep(INTERVAL + 0.2)
    row = farm.session(session["id"])
    assert (row["state"], row["confirmed"], row["server_address"]) == ("disconnected", True, x.address), row
    assert farm.agent_sessions(x) == {alice: "disconnected"}
    assert farm.agent_sessions(farm.other(x)) == {}
    log.warning(
        "REALFARM logon via proxy %.2f s; killed -> agent lists disconnected %.2f s, directory %.2f s",
        logon.seconds,
        agent_s,
        directory_s,
    )
    del killed
    state.update(x=x, display=created_display(logon.sesman), session_id=session["id"])


def test_2_logon_through_the_other_proxy_reconnects_to_the_same_display(
    farm: rf.RealFarm, state: dict[str, Any]
) -> None:
    x = state["x"]
    written = displays_written(farm, "alice")
    logon = farm.logon(farm.proxies[1], "alice")
    assert logon.server is x
    assert rf.SESSION_RECONNECTED in logon.sesman, logon.sesman
    assert xs.SESSION_CREATED not in logon.sesman
    assert created_display(logon.sesman) == state["display"]  # `++ reconnected session ... display :N`
    assert displays_written(farm, "alice") == written == [state["display"]]  # no new session script
    row = farm.live_session("alice")
    assert row is not None and row["id"] == state["session_id"] and row["state"] == "active", row
    log.warning("REALFARM reconnect via proxy 2: %.2f s to the desktop", logon.seconds)
    logon.kill()
    rf.wait_for(lambda: farm.live_session("alice")["state"] == "disconnected", "disconnected", INTERVAL + SLACK_S)


def test_3_bob_is_placed_on_the_other_server_while_alice_is_disconnected(
    farm: rf.RealFarm, state: dict[str, Any]
) -> None:
    x = state["x"]
    assert farm.live_session("alice")["state"] == "disconnected"
    logon = farm.logon(farm.proxies[0], "bob")
    assert logon.server is farm.other(x)
    row = rf.wait_for(lambda: farm.live_session("bob"), "bob's session", 5) and farm.live_session("bob")
    assert row["server_address"] == farm.other(x).address
    logon.kill()
    rf.wait_for(lambda: farm.live_session("bob")["state"] == "disconnected", "disconnected", INTERVAL + SLACK_S)


def test_4_logoff_ends_the_desktop_and_the_next_logon_gets_a_fresh_one(
    farm: rf.RealFarm, state: dict[str, Any]
) -> None:
    x, alice = state["x"], farm.users["alice"].name
    session_id = state["session_id"]
    answer = httpx.post(f"{farm.broker_http}/v1/sessions/{session_id}/logoff", timeout=30)
    if answer.status_code in (404, 405):
        paths = httpx.get(f"{farm.broker_http}/openapi.json", timeout=5).json()["paths"]
        if not any(p.endswith("/logoff") for p in paths):
            pytest.skip(f"POST /v1/sessions/{{id}}/logoff is not on this branch ({answer.status_code})")
    assert answer.status_code < 300, answer.text
    asked = time.monotonic()
    rf.wait_for(lambda: xs.SESSION_TERMINATED in x.sesman_text(), "sesman ended the desktop", 20)
    rf.wait_for(lambda: alice not in farm.agent_sessions(x), "agent stops listing alice", 5)
    shown = rf.wait_for(
        lambda: farm.session(session_id)["state"] == "ended", "directory shows the logoff", INTERVAL + SLACK_S
    )
    assert farm.session(session_id)["end_reason"] == "logged_off", farm.session(session_id)
    log.warning("REALFARM logoff: asked -> directory ended %.2f s", time.monotonic() - asked + 0 * shown)

    logon = farm.logon(farm.proxies[1], "alice")
    assert xs.SESSION_CREATED in logon.sesman and rf.SESSION_RECONNECTED not in logon.sesman, logon.sesman
    logon.kill()
    row = rf.wait_for(lambda: farm.live_session("alice"), "new session", 5) and farm.live_session("alice")
    assert row["id"] != session_id
    state.update(x=logon.server, session_id=row["id"])
    rf.wait_for(lambda: farm.live_session("alice")["state"] == "disconnected", "disconnected", INTERVAL + SLACK_S)


def test_6_junk_leaves_no_session_on_either_server_nor_in_the_directory(farm: rf.RealFarm) -> None:
    before = {s["id"] for s in farm.live_sessions()}
    (since,) = farm.rows("SELECT now() AS t")
    created = [s.sessions_created() for s in farm.servers]
    listed = [farm.agent_sessions(s) for s in farm.servers]
    assert "rdp-enum-encryption" in xs.nmap_enum_encryption(farm.proxies[0])
    farm.failed_logon(farm.proxies[1], "carol", hold_s=5)
    carol = farm.users["carol"].name
    # The wrong password's claim ends `unconfirmed` confirm_timeout after its close, at a list.
    rf.wait_for(
        lambda: farm.live_session("carol") is None,
        "carol's claim ends",
        rf.CONFIRM_TIMEOUT_S + INTERVAL + 5,
    )
    # nmap's connections (its cookie says `nmap`) carried too little to be logons: ended `abandoned`.
    made = farm.rows("SELECT * FROM sessions WHERE created_at >= %s", since["t"])
    reasons = {(s["account_name"] == carol, s["state"], s["end_reason"]) for s in made}
    assert reasons == {(False, "ended", "abandoned"), (True, "ended", "unconfirmed")}, made
    assert {s["id"] for s in farm.live_sessions()} == before
    assert [s.sessions_created() for s in farm.servers] == created
    assert [farm.agent_sessions(s) for s in farm.servers] == listed
    assert not xs.user_pids(carol)


def test_5_a_dead_xrdp_sends_alice_to_the_other_server_and_the_directory_says_why(
    farm: rf.RealFarm, state: dict[str, Any]
) -> None:
    x = state["x"]
    old = farm.live_session("alice")
    assert old is not None and old["server_address"] == x.address, old
    x.kill_xrdp()
    killed = time.monotonic()
    down_s = rf.wait_for(lambda: farm.server_row(x)["health"] == "down", "health marks X down", 10)
    log.warning("REALFARM xrdp killed -> health down %.2f s (%s)", down_s, farm.server_row(x)["health_detail"])
    del killed

    logon = farm.logon(farm.proxies[0], "alice")
    assert logon.server is farm.other(x)
    ended = farm.session(old["id"])
    assert (ended["state"], ended["end_reason"]) == ("ended", "server_down"), ended
    new = farm.live_session("alice")
    assert new is not None and new["server_address"] == farm.other(x).address, new
    assert farm.server_row(x)["health"] == "down"
    logon.kill()
