"""A power hook receiver on 127.0.0.1 (uvicorn + Starlette) that checks every request's signature as
docs/power.md tells receivers to, and records what it took."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import uvicorn
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rdbroker_broker import domain as d
from rdbroker_broker.db.tables import servers
from rdbroker_common import power

SECRET = "test-power-hook-secret-0123456789"
POOL = d.Pool("default", True, 3600.0)


@dataclass
class Receiver:
    secret: str = SECRET
    port: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)  # each request taken, in order
    refused: list[str] = field(default_factory=list)  # why each bad request was refused
    deliveries: list[str] = field(default_factory=list)  # every attempt's delivery id
    fail_next: int = 0  # answer this many requests 503 first
    answer: int = 202
    called: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    async def handle(self, request: Request) -> JSONResponse:
        body = await request.body()
        why = power.verify(
            self.secret.encode(),
            body,
            request.headers.get(power.TIMESTAMP_HEADER),
            request.headers.get(power.SIGNATURE_HEADER),
            time.time(),
        )
        if why:
            self.refused.append(why)
            return JSONResponse({"error": why}, status_code=401)
        self.deliveries.append(request.headers.get(power.DELIVERY_HEADER, ""))
        if self.fail_next:
            self.fail_next -= 1
            return JSONResponse({"error": "try again"}, status_code=503)
        self.calls.append({"path": request.url.path, **json.loads(body)})
        self.called.set()
        return JSONResponse({"ok": True}, status_code=self.answer)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def]
        yield


@contextlib.asynccontextmanager
async def receiver(**kw: Any) -> AsyncIterator[Receiver]:
    got = Receiver(**kw)
    app = Starlette(routes=[Route("/{hook}", got.handle, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    got.port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(200):  # bounded: 10 s
            if server.started:
                break
            await asyncio.sleep(0.05)
        yield got
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def set_health(engine: AsyncEngine, address: str, health: str, at: datetime) -> None:
    """What a health replica's report leaves on the row: the result, its time, fresh for an hour."""
    async with engine.begin() as conn:
        await conn.execute(
            update(servers)
            .where(servers.c.address == address)
            .values(health=health, probed_at=at, health_changed_at=at, fresh_until=at + timedelta(hours=1))
        )


async def state(engine: AsyncEngine, address: str) -> tuple[str, str]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(servers.c.power, servers.c.admin_state).where(servers.c.address == address)
            )
        ).one()
    return row.power, row.admin_state
