"""The session actions this host offers, by its platform and session source (actions.py says how each
acts). A module of its own so that xrdp_actions.py builds on actions.py and nothing imports back."""

from __future__ import annotations

import sys

from .actions import NoActions, Run, SessionActions, WindowsActions
from .config import AgentConfig
from .xrdp_actions import XrdpActions


def actions_for(config: AgentConfig, run: Run, platform: str = sys.platform) -> SessionActions:
    """The actions this host offers, by its platform and session source."""
    if platform == "win32":
        return WindowsActions(run, config.command_timeout_s)
    if config.sessions.kind == "xrdp":
        return XrdpActions(config.command_timeout_s)
    return NoActions(
        f"this agent acts on sessions on Windows or with [sessions] source = 'xrdp', and this host "
        f"is {platform} with source {config.sessions.kind!r}"
    )
