"""rdesktop on the real two-server xrdp farm: its users go back to their own desktop, through either proxy.

Debian 12's rdesktop 1.9.0 logs on to xrdp 0.9.21 (TLS, the password given on standard input with `-p -`,
the certificate trusted at its prompt) and is reconnected by sesman like xfreerdp, as long as it asks for
the same size and depth (`-g 1024x768 -a 24`, xfreerdp's `/size:1024x768 /bpp:24`). The farm is
tests/support/real_farm.py's, one for this module; each test has a user of its own, so they do not
depend on each other's order.

They need root and Debian's xrdp, tigervnc-standalone-server, freerdp2-x11, rdesktop and xvfb
(scripts/install_system_deps.sh) and skip, saying which is missing, without them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from tests.support import real_farm as rf
from tests.support import xrdp_server as xs

log = logging.getLogger(__name__)
pytestmark = pytest.mark.slow
INTERVAL = rf.SESSIONS_INTERVAL_S  # one agent interval: how often each server's list is read
SLACK_S = 1.0  # for the list's report and the 20 ms polls, on a loaded machine


@pytest.fixture(scope="module")
def farm(pg_server_url: str) -> Iterator[rf.RealFarm]:
    missing = xs.missing_tools((*rf.TOOLS, "rdesktop"))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: run scripts/install_system_deps.sh as root")
    farm = rf.real_farm(pg_server_url, ("rita", "fred"))
    try:
        yield farm
    finally:
        farm.stop()


def disconnected(farm: rf.RealFarm, name: str, server: xs.XrdpServer, logon: rf.Logon) -> dict[str, float]:
    """Kill the user's client; within one agent interval the directory shows the session disconnected
    and the agent lists it so. Answers the seconds each took."""
    user, live = farm.users[name].name, farm.live_session(name)
    assert live is not None
    session_id = live["id"]
    killed = logon.kill()
    directory_s = rf.wait_for(
        lambda: farm.session(session_id)["state"] == "disconnected", f"{name} disconnected", INTERVAL
    )
    rf.wait_for(lambda: farm.agent_sessions(server).get(user) == "disconnected", "the agent's list", INTERVAL)
    agent_s = time.monotonic() - killed
    # The agent's next list agrees with the proxy's close and keeps the session confirmed on its server.
    time.sleep(INTERVAL + 0.2)
    row = farm.session(session_id)
    assert (row["state"], row["confirmed"], row["server_address"]) == ("disconnected", True, server.address)
    return {"directory": directory_s, "agent": agent_s}


def reconnected(
    farm: rf.RealFarm, name: str, logon: rf.Logon, server: xs.XrdpServer, display: str, session_id: object
) -> None:
    """The logon went back to the user's desktop: same server, sesman's reconnect to the same display,
    no second session script, the same session in the directory, active once the desktop is up."""
    assert logon.server is server
    assert rf.SESSION_RECONNECTED in logon.sesman, logon.sesman
    assert xs.SESSION_CREATED not in logon.sesman, logon.sesman
    assert rf.sesman_display(logon.sesman) == display  # `++ reconnected session ... display :N`
    assert rf.displays_written(farm, name) == [display]
    user = farm.users[name].name
    rf.wait_for(lambda: farm.agent_sessions(server).get(user) == "active", "the agent lists it active", 5)
    rf.wait_for(
        lambda: (farm.live_session(name) or {}).get("state") == "active", "the directory shows it active", 5
    )
    row = farm.live_session(name)
    assert row is not None
    assert (row["id"], row["server_address"]) == (session_id, server.address), row


def test_rdesktop_logs_on_through_one_proxy_and_back_to_its_desktop_through_the_other(
    farm: rf.RealFarm,
) -> None:
    rita = farm.users["rita"].name
    first = farm.logon(farm.proxies[0], "rita", client_program="rdesktop")
    x = first.server
    assert xs.SESSION_CREATED in first.sesman, first.sesman  # a fresh desktop
    display = rf.sesman_display(first.sesman)
    # The session script notes its display once sesman has started it, after the desktop is up.
    rf.wait_for(lambda: rf.displays_written(farm, "rita") == [display], "rita's session script", 5)
    session = rf.wait_session(farm, "rita")
    assert session["server_address"] == x.address, session
    rf.wait_for(lambda: farm.agent_sessions(x).get(rita) == "active", "agent lists rita active", 5)
    rf.wait_for(lambda: farm.session(session["id"])["confirmed"], "confirmed", INTERVAL + SLACK_S)
    assert rita not in farm.agent_sessions(farm.other(x))
    gone = disconnected(farm, "rita", x, first)

    again = farm.logon(farm.proxies[1], "rita", client_program="rdesktop")
    reconnected(farm, "rita", again, x, display, session["id"])
    gone_again = disconnected(farm, "rita", x, again)
    log.warning(
        "REALFARM rdesktop: logon via proxy 1 %.2f s, killed -> directory disconnected %.2f s, agent %.2f s;"
        " reconnect via proxy 2 %.2f s, killed -> directory disconnected %.2f s",
        first.seconds,
        gone["directory"],
        gone["agent"],
        again.seconds,
        gone_again["directory"],
    )


def test_a_user_who_logged_on_with_xfreerdp_goes_back_to_the_same_desktop_with_rdesktop(
    farm: rf.RealFarm,
) -> None:
    first = farm.logon(farm.proxies[0], "fred")  # xfreerdp
    x = first.server
    assert xs.SESSION_CREATED in first.sesman, first.sesman
    display = rf.sesman_display(first.sesman)
    session = rf.wait_session(farm, "fred")
    rf.wait_for(lambda: farm.session(session["id"])["confirmed"], "confirmed", INTERVAL + SLACK_S)
    disconnected(farm, "fred", x, first)

    again = farm.logon(farm.proxies[1], "fred", client_program="rdesktop")
    reconnected(farm, "fred", again, x, display, session["id"])
    disconnected(farm, "fred", x, again)
    log.warning("REALFARM xfreerdp then rdesktop: reconnect via proxy 2 %.2f s", again.seconds)
