"""Claims: which closed connection's claim is junk (it ends `abandoned` and holds nothing)."""

from __future__ import annotations

from rdbroker_broker.domain.model import Pool


def is_junk_claim(
    pool: Pool,
    *,
    learnt_from: str,
    confirmed: bool,
    origin_connection_id: str | None,
    connection_id: str,
    bytes_from_server: int,
) -> bool:
    """A closed connection's claim is junk: a Route made it for this very connection, the server's
    agent never confirmed it, and the server sent fewer than the pool's `junk_bytes` (a port scan,
    another balancer's health check, a client that gave up during negotiation). It holds nothing:
    it ends `abandoned` instead of becoming disconnected."""
    return (
        learnt_from == "route"
        and not confirmed
        and origin_connection_id == connection_id
        and bytes_from_server < pool.junk_bytes
    )
