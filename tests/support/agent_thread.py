"""The agent's real HTTP server over fake sources, run on 127.0.0.1 in a thread of its own (for tests
whose own code is synchronous: the CLI, the browser)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

from rdbroker_agent.actions import WindowsActions
from rdbroker_agent.config import parse_config
from rdbroker_agent.server import AgentServer
from tests.unit.agent.fakes import FakeSources

# quser's answer with alice in session 5 (the agent's Windows actions look her up in it).
QUSER_ALICE = """\
 USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME
 alice                 rdp-tcp#3           5  Active          .  11/27/2026 9:01 AM
"""


@contextlib.contextmanager
def windows_agent(sources: FakeSources) -> Iterator[AgentServer]:
    """An agent acting as on Windows (quser, logoff, tsdiscon, msg run through `sources`)."""
    config = parse_config({"counters": [{"kind": "cpu"}]})
    server = AgentServer(config, sources, actions=WindowsActions(sources.run, 5.0))
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.stop())

    thread = threading.Thread(target=serve, name="agent", daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the agent did not start"
        yield server
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
