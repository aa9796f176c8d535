"""The whole rdbroker cluster under test, as processes on loopback: PostgreSQL primary + synchronous
standby, 2 brokers, 2 health replicas, 2 proxies and 4 terminal-server stand-ins.

Brokers reach PostgreSQL through the multi-host DSN (`target_session_attrs=read-write`); proxies and
health replicas know both brokers. Health runs fast (200 ms probes, fall 3) so a dead terminal server
is marked down in well under a second. The directory is read straight from the database (the tests
never write to it) and through the broker's `LookupUserSessions`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import psycopg

from rdbroker_proto.v1 import broker_pb2, broker_pb2_grpc
from tests.support.cluster import Harness, new_port

LIVE = ("pending", "active", "disconnected")


@dataclass(frozen=True)
class FarmSettings:
    hosts: int = 4
    brokers: int = 2
    health: int = 2
    proxies: int = 2
    probe_interval_ms: int = 200
    probe_timeout_ms: int = 500
    rise: int = 2
    fall: int = 3
    # A dead replica's servers are re-claimed once its leases lapse. Renewed every lease/3: 600 ms leaves
    # room for a renewal delayed by a loaded machine without the leases bouncing between replicas.
    health_lease_ms: int = 600


@dataclass(frozen=True)
class SessionRow:
    id: str
    user: str
    server: str
    state: str
    created_at: datetime


@dataclass
class Farm:
    harness: Harness
    settings: FarmSettings = field(default_factory=FarmSettings)
    dsn: str = ""
    hosts: list[str] = field(default_factory=list)
    brokers: list[str] = field(default_factory=list)
    proxies: list[str] = field(default_factory=list)

    def start(self) -> Farm:
        pg = self.harness.start_pg()
        self.dsn = pg.create_database("rdbroker")
        sup = self.harness.supervisor
        sup.run("migrate", ["-m", "rdbroker_cli", "migrate", "--database-url", self.dsn])
        for i in range(self.settings.hosts):
            port = new_port()
            sup.start(
                f"host{i}",
                ["-m", "tests.support.rdp_host", "--listen", f"127.0.0.1:{port}"],
                ports={"rdp": port},
                tcp_ready=["rdp"],
            )
            self.hosts.append(f"127.0.0.1:{port}")
        farm_file = sup.root / "farm.yaml"
        farm_file.write_text(self.farm_yaml())
        sup.run("apply", ["-m", "rdbroker_cli", "apply", "--database-url", self.dsn, "-f", str(farm_file)])
        for i in range(self.settings.brokers):
            self.start_broker(i)
        for i in range(self.settings.health):
            self.start_health(i)
        for i in range(self.settings.proxies):
            self.start_proxy(i)
        return self

    def farm_yaml(self) -> str:
        lines = ["pools:", "  - name: default", "    default: true", "    disconnect_timeout: 8h", "servers:"]
        for address in self.hosts:
            lines += [f"  - address: {address}", "    pool: default", "    weight: 100"]
        return "\n".join(lines) + "\n"

    def start_broker(self, i: int) -> None:
        s = self.settings
        grpc_port, http_port = new_port(), new_port()
        self.harness.supervisor.start(
            f"broker{i}",
            [
                "-m",
                "rdbroker_broker",
                "--database-url",
                self.dsn,
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--http-listen",
                f"127.0.0.1:{http_port}",
            ],
            ports={"grpc": grpc_port, "http": http_port},
            grpc_ready="grpc",
            env={
                "RDBROKER_PROBE_INTERVAL_MS": str(s.probe_interval_ms),
                "RDBROKER_PROBE_TIMEOUT_MS": str(s.probe_timeout_ms),
                "RDBROKER_PROBE_RISE": str(s.rise),
                "RDBROKER_PROBE_FALL": str(s.fall),
                "RDBROKER_LEASE_MS": str(s.health_lease_ms),
                "RDBROKER_SWEEP_INTERVAL_S": "1",
            },
        )
        address = f"127.0.0.1:{grpc_port}"
        if address not in self.brokers:
            self.brokers.insert(i, address)

    def start_health(self, i: int) -> None:
        s = self.settings
        grpc_port = new_port()
        self.harness.supervisor.start(
            f"health{i}",
            [
                "-m",
                "rdbroker_health",
                "--broker",
                ",".join(self.brokers),
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
            ],
            ports={"grpc": grpc_port},
            grpc_ready="grpc",
            env={
                "RDBROKER_PROBE_INTERVAL_S": str(s.probe_interval_ms / 1000),
                "RDBROKER_PROBE_TIMEOUT_S": str(s.probe_timeout_ms / 1000),
                "RDBROKER_RISE": str(s.rise),
                "RDBROKER_FALL": str(s.fall),
                "RDBROKER_LEASE_MS": str(s.health_lease_ms),
                "RDBROKER_REPORT_BATCH_S": "0.05",
                "RDBROKER_RPC_TIMEOUT_S": "1",
            },
        )

    def start_proxy(self, i: int) -> None:
        rdp_port, grpc_port = new_port(), new_port()
        self.harness.supervisor.start(
            f"proxy{i}",
            [
                "-m",
                "rdbroker_proxy",
                "--listen",
                f"127.0.0.1:{rdp_port}",
                "--broker",
                ",".join(self.brokers),
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--max-routing-per-client",
                "0",  # every client of the storms is 127.0.0.1
            ],
            ports={"rdp": rdp_port, "grpc": grpc_port},
            grpc_ready="grpc",
            tcp_ready=["rdp"],
            env={"RDBROKER_PROXY_ID": f"proxy{i}"},
        )
        self.proxies.append(f"127.0.0.1:{rdp_port}")

    def log_tails(self, lines: int = 8) -> str:
        """The end of every service's log, for an assertion message."""
        services = self.harness.supervisor.services.values()
        return "\n".join(
            f"--- {s.name}\n{s.log_tail(lines)}" for s in services if not s.name.startswith("host")
        )

    # Reading the directory ----------------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return list(conn.execute(sql, params).fetchall())

    def sessions(self, *, live_only: bool = True) -> dict[str, SessionRow]:
        where = "WHERE state IN ('pending', 'active', 'disconnected')" if live_only else ""
        rows = self.query(f'SELECT id, "user", server_address, state, created_at FROM sessions {where}')
        return {r[0]: SessionRow(*r) for r in rows}

    def duplicate_live_users(self) -> list[tuple[str, int]]:
        rows = self.query(
            "SELECT user_key, count(*) FROM sessions WHERE state IN ('pending', 'active', 'disconnected') "
            "AND user_key IS NOT NULL GROUP BY pool, user_key HAVING count(*) > 1"
        )
        return [(r[0], r[1]) for r in rows]

    def placements_on(self, server: str, after: datetime) -> int:
        """Connections routed to `server` after `after` (a reconnect to a user's own session included)."""
        rows = self.query(
            "SELECT count(*) FROM connections WHERE server_address = %s AND created_at > %s", (server, after)
        )
        return int(rows[0][0])

    def last_routed_to(self, server: str) -> datetime | None:
        """When the last connection was routed to `server`."""
        rows = self.query("SELECT max(created_at) FROM connections WHERE server_address = %s", (server,))
        return rows[0][0] if rows else None

    def sessions_placed_on(self, server: str, after: datetime) -> int:
        """New sessions placed on `server` after `after`."""
        rows = self.query(
            "SELECT count(*) FROM sessions WHERE server_address = %s AND created_at > %s", (server, after)
        )
        return int(rows[0][0])

    def health_changed_at(self, server: str) -> datetime | None:
        """When the directory last recorded a change of `server`'s health."""
        rows = self.query("SELECT health_changed_at FROM servers WHERE address = %s", (server,))
        return rows[0][0] if rows else None

    def server_health(self) -> dict[str, str]:
        return {r[0]: r[1] for r in self.query("SELECT address, health FROM servers")}

    def probed_at(self) -> dict[str, datetime | None]:
        return {r[0]: r[1] for r in self.query("SELECT address, probed_at FROM servers")}

    async def lookup(self, users: list[str]) -> dict[str, list[broker_pb2.Session]]:
        """Each user's live sessions, as the first broker that answers says."""
        out: dict[str, list[broker_pb2.Session]] = {}
        for address in self.brokers:
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    stub = broker_pb2_grpc.BrokerStub(channel)
                    for user in users:
                        answer = await stub.LookupUserSessions(
                            broker_pb2.LookupUserSessionsRequest(user=user), timeout=5
                        )
                        out[user] = list(answer.sessions)
                return out
            except grpc.aio.AioRpcError:
                continue
        raise RuntimeError("no broker answered LookupUserSessions")
