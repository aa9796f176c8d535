"""`python -m rdbroker_agent.quser`: Windows `quser` (query user) output as the agent's session JSON.

Use it as the session source on a Windows terminal server:

    [sessions]
    source = "command"
    command = ["C:\\\\Program Files\\\\Python311\\\\python.exe", "-m", "rdbroker_agent.quser"]

`quser` prints one line per user session, for example

     USERNAME              SESSIONNAME        ID  STATE   IDLE TIME  LOGON TIME
    >alice                 rdp-tcp#3           2  Active          .  11/27/2026 9:01 AM
     bob                                       3  Disc           12  11/27/2026 8:40 AM

A disconnected session has no SESSIONNAME, so the columns are told apart by the numeric ID. The
state words are English (`Active`, `Disc`); on a localized Windows other words are left out and
logged, so wrap `quser` yourself there. `quser` exits 1 with "No User exists" when nobody is logged on.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass

from .sources import Session, SessionState

log = logging.getLogger(__name__)

_STATES: dict[str, SessionState] = {"active": "active", "disc": "disconnected"}


@dataclass(frozen=True, slots=True)
class QuserEntry:
    user: str
    session_id: str  # quser's ID column: what `logoff`, `tsdiscon` and `msg` take
    state: SessionState


def quser_entries(text: str) -> list[QuserEntry]:
    """Each user session quser printed, with its ID (states other than Active and Disc left out)."""
    entries: list[QuserEntry] = []
    for line in text.splitlines()[1:]:  # the first line is the header
        fields = line[1:].split()  # column 0 is ' ' or '>' (the current session)
        if len(fields) < 3:
            continue
        rest = fields[1:] if fields[1].isdigit() else fields[2:]  # no SESSIONNAME when disconnected
        if len(rest) < 2 or not rest[0].isdigit():
            log.debug("skipped quser line %r", line)
            continue
        state = _STATES.get(rest[1].lower())
        if state is None:
            log.info("skipped quser session of %s in state %r", fields[0], rest[1])
            continue
        entries.append(QuserEntry(fields[0], rest[0], state))
    return entries


def parse_quser(text: str) -> list[Session]:
    return [Session(e.user, e.state) for e in quser_entries(text)]


def nobody_logged_on(output: str) -> bool:
    """quser's answer (exit 1) when no user session exists."""
    return "no user exists" in output.lower()


def main() -> int:
    try:
        result = subprocess.run(["quser"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        sys.stderr.write(f"cannot run quser: {exc}\n")
        return 1
    if result.returncode != 0 and not nobody_logged_on(result.stdout + result.stderr):
        sys.stderr.write(f"quser exited with {result.returncode}: {result.stderr.strip()}\n")
        return 1
    sessions = parse_quser(result.stdout) if result.returncode == 0 else []
    sys.stdout.write(json.dumps([{"user": s.user, "state": s.state} for s in sessions]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
