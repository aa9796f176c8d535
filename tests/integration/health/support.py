"""The real broker (a `python -m rdbroker_broker` process on PostgreSQL) and stand-ins for the servers'
agents, for the health service's integration tests."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc
import psycopg

from rdbroker_proto.v1 import broker_pb2, broker_pb2_grpc
from tests.support.cluster import Supervisor, make_root
from tests.support.postgres import free_port

# Probe settings the broker hands to replicas with each target (fast, for tests).
INTERVAL_S = 0.2
TIMEOUT_S = 0.15
RISE = 2
FALL = 3


@dataclass
class AgentStub:
    """An HTTP agent for several servers: `bodies[path]` is what GET path answers (None: never answers)."""

    bodies: dict[str, bytes | None] = field(default_factory=dict)
    server: asyncio.Server | None = None
    served: Counter[str] = field(default_factory=Counter)  # answers sent, by path

    async def start(self) -> AgentStub:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            body = self.bodies.get(path, b"")
            if body is None:
                await reader.read()  # hold the connection until the client gives up
                return
            status = b"200 OK" if path in self.bodies else b"404 Not Found"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            self.served[path] += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()


@dataclass
class Server:
    address: str
    agent_url: str = ""
    sessions_url: str = ""


@dataclass
class RealBroker:
    address: str
    dsn: str
    stub: broker_pb2_grpc.BrokerAsyncStub
    supervisor: Supervisor
    routes: int = 0

    async def servers(self) -> dict[str, broker_pb2.Server]:
        answer = await self.stub.ListServers(broker_pb2.ListServersRequest(), timeout=10)
        return {s.address: s for s in answer.servers}

    async def column(self, address: str, name: str) -> object:
        """One column of the server's row, read straight from the database (never written by tests)."""
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cursor = await conn.execute(f"SELECT {name} FROM servers WHERE address = %s", (address,))
            row = await cursor.fetchone()
        assert row is not None
        return row[0]

    async def lease_holders(self) -> dict[str, str]:
        """Server address -> replica id of every unexpired probe lease, from the database."""
        async with await psycopg.AsyncConnection.connect(self.dsn) as conn:
            cursor = await conn.execute(
                "SELECT server_address, replica_id FROM probe_leases WHERE expires_at > now()"
            )
            return dict(await cursor.fetchall())

    async def route(self, user: str) -> broker_pb2.RouteResponse:
        self.routes += 1
        request = broker_pb2.RouteRequest(
            connection_id=f"c{self.routes}-{user}", proxy_id="test", cookie=user
        )
        return await self.stub.Route(request, timeout=10)

    async def open(self, answer: broker_pb2.RouteResponse, user: str) -> None:
        await self.stub.ConnectionOpened(
            broker_pb2.ConnectionOpenedRequest(
                session_id=answer.session_id,
                connection_id=f"c{self.routes}-{user}",
                proxy_id="test",
                server_address=answer.server_address,
            ),
            timeout=10,
        )


def farm_yaml(servers: list[Server]) -> str:
    lines = ["pools:", "  - name: default", "    default: true", "    disconnect_timeout: 1h", "servers:"]
    for s in servers:
        lines += [f"  - address: {s.address}", "    pool: default"]
        if s.agent_url:
            lines.append(f"    agent_url: {s.agent_url}")
        if s.sessions_url:
            lines.append(f"    sessions_url: {s.sessions_url}")
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def real_broker(
    dsn: str,
    servers: list[Server],
    *,
    interval_s: float = INTERVAL_S,
    timeout_s: float = TIMEOUT_S,
    env: dict[str, str] | None = None,
) -> AsyncIterator[RealBroker]:
    """Migrate `dsn`, apply a farm of `servers`, run the broker as a process; yields a client of it."""
    root = make_root("rdbroker-health-it-")
    supervisor = Supervisor(root)
    try:
        await asyncio.to_thread(
            supervisor.run, "migrate", ["-m", "rdbroker_cli", "migrate", "--database-url", dsn]
        )
        (root / "farm.yaml").write_text(farm_yaml(servers))
        await asyncio.to_thread(
            supervisor.run,
            "apply",
            ["-m", "rdbroker_cli", "apply", "--database-url", dsn, "-f", str(root / "farm.yaml")],
        )
        grpc_port, http_port = free_port(), free_port()
        await asyncio.to_thread(
            supervisor.start,
            "broker",
            [
                "-m",
                "rdbroker_broker",
                "--database-url",
                dsn,
                "--grpc-listen",
                f"127.0.0.1:{grpc_port}",
                "--http-listen",
                f"127.0.0.1:{http_port}",
            ],
            ports={"grpc": grpc_port, "http": http_port},
            grpc_ready="grpc",
            env={
                "RDBROKER_PROBE_INTERVAL_MS": str(int(interval_s * 1000)),
                "RDBROKER_PROBE_TIMEOUT_MS": str(int(timeout_s * 1000)),
                "RDBROKER_PROBE_RISE": str(RISE),
                "RDBROKER_PROBE_FALL": str(FALL),
                **(env or {}),
            },
        )
        address = f"127.0.0.1:{grpc_port}"
        async with grpc.aio.insecure_channel(address) as channel:
            yield RealBroker(address, dsn, broker_pb2_grpc.BrokerStub(channel), supervisor)
    finally:
        await asyncio.to_thread(supervisor.stop_all)
        shutil.rmtree(root, ignore_errors=True)


@asynccontextmanager
async def health_replica(broker_address: str, **overrides: object) -> AsyncIterator[None]:
    """A health replica (the whole service, in this loop) reporting to `broker_address`."""
    from rdbroker_health import app
    from rdbroker_health.config import HealthSettings

    values: dict[str, object] = {
        "broker": broker_address,
        "grpc_listen": "127.0.0.1:0",
        "lease_ms": 300,
        "report_batch_s": 0.05,
        "rpc_timeout_s": 2.0,
        "shutdown_grace_s": 1.0,
    }
    settings = HealthSettings(**(values | overrides))  # type: ignore[arg-type]
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(app.run(settings, stop))
        try:
            yield
        finally:
            stop.set()


async def wait_for(check, timeout_s: float = 20.0, step_s: float = 0.05) -> float:
    """Await `check()` (async, truthy when done) until it holds; answers the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(step_s)
    return loop.time() - started
