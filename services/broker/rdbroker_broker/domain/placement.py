"""Placement: which servers take new sessions or reconnects, their effective load, and their ranking by
the pool's placement (breadth or depth).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rdbroker_broker.domain.model import AdminState, Placement, Server


def session_unit(server: Server) -> float:
    """How much load one session adds, in the agent's 0..100 scale when a limit gives it one."""
    return 100.0 / server.max_sessions if server.max_sessions > 0 else 1.0


def effective_load(server: Server) -> float:
    """Last reported load plus the placements that figure cannot show yet, divided by weight.

    Without an agent load (or with a stale one: `as_seen_at`), the sessions holding capacity on the
    server stand in for its load (DESIGN §5): a closed claim the server's agent never confirmed counts
    for nothing. Counting recent placements is what spreads a logon storm: the idle-looking server
    stops looking idle after the first placement, and a load report does not make it look idle again,
    because the placements made since its sample time less the pool's logon lag (users still logging
    on) stay counted (`placements_since_report`).
    """
    unit = session_unit(server)
    if server.load >= 0:
        raw = server.load + server.placements_since_report * unit
    else:
        raw = server.held_sessions * unit
    return raw / max(server.weight, 1)


def takes_new_sessions(server: Server) -> bool:
    """Up and enabled, with weight, below full load and below its limit of sessions holding capacity."""
    if server.is_down or server.effective_admin_state is not AdminState.ENABLED:
        return False
    if server.weight <= 0 or server.load >= 100:
        return False
    return not (server.max_sessions > 0 and server.held_sessions >= server.max_sessions)


def why_no_new_sessions(server: Server) -> str:
    """Why `takes_new_sessions` refuses the server ("" when it takes them)."""
    if takes_new_sessions(server):
        return ""
    if server.is_down:
        return "down"
    if server.effective_admin_state is not AdminState.ENABLED:
        return server.effective_admin_state.value
    if server.weight <= 0:
        return "weight 0"
    if server.load >= 100:
        return "load 100"
    return f"full: {server.held_sessions} of {server.max_sessions} sessions"


def takes_reconnects(server: Server) -> bool:
    """Draining servers still take their own users back; down and maintenance servers do not."""
    return not server.is_down and server.effective_admin_state is not AdminState.MAINTENANCE


def rank_key(server: Server, placement: Placement = Placement.BREADTH) -> tuple[float, int, str]:
    """The order `rank_for_new_session` sorts by, lowest first: effective load, then sessions holding
    capacity, each lowest first for breadth (spread users out) and highest first for depth (fill the
    busiest server up to its limit before the next: idle servers stay idle). Effective load counts
    placements no load report shows yet in both, so a logon storm neither piles onto the server that
    looked idle nor overshoots a full one. The address last, so every replica and the SQL copy agree."""
    if placement is Placement.DEPTH:
        return (-effective_load(server), -server.held_sessions, server.address)
    return (effective_load(server), server.held_sessions, server.address)


def rank_for_new_session(
    servers: Iterable[Server], exclude: Sequence[str] = (), placement: Placement = Placement.BREADTH
) -> list[Server]:
    """Servers that can take a new session, best first by the pool's placement (`rank_key`)."""
    eligible = [s for s in servers if takes_new_sessions(s) and s.address not in exclude]
    return sorted(eligible, key=lambda s: rank_key(s, placement))


def choose_server(
    servers: Iterable[Server], exclude: Sequence[str] = (), placement: Placement = Placement.BREADTH
) -> Server | None:
    ranked = rank_for_new_session(servers, exclude, placement)
    return ranked[0] if ranked else None


def placement_problems(placement: Placement, servers: Iterable[Server]) -> list[str]:
    """Why a pool with this placement cannot hold these servers ([] when it can): depth fills each
    server up to its limit, so every server needs one (`max_sessions`)."""
    if placement is not Placement.DEPTH:
        return []
    unlimited = sorted(s.address for s in servers if s.max_sessions <= 0)
    if not unlimited:
        return []
    shown = ", ".join(unlimited[:5]) + (f" and {len(unlimited) - 5} more" if len(unlimited) > 5 else "")
    return [
        f"depth placement fills each server up to its max_sessions, and {shown} "
        f"{'has' if len(unlimited) == 1 else 'have'} none: set max_sessions on every server of the pool"
    ]
