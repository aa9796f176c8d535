"""Servers: health, load and sessions; register, change, remove; drain (until empty), maintenance,
enable."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request, Response

from rdbroker_broker import domain as d
from rdbroker_broker import drains, history
from rdbroker_broker.rest import audited, auth
from rdbroker_broker.rest.schemas import (
    PRINTABLE,
    DrainIn,
    DrainOut,
    ServerIn,
    ServerOut,
    ServerPatch,
    ServersOut,
)
from rdbroker_broker.service import BrokerService
from rdbroker_broker.service.servers import ServerChanges

router = APIRouter(prefix="/v1", tags=["servers"])

AddressPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=255,
        pattern=PRINTABLE,
        description="host:port as registered",
        examples=["10.0.0.11:3389"],
    ),
]


def _service(request: Request) -> BrokerService:
    service: BrokerService = request.app.state.service
    return service


async def _out(request: Request, server: d.Server) -> ServerOut:
    drain = await drains.drain_of(_service(request), server.address)
    states = await history.session_states(_service(request), [server.address])
    return ServerOut.of(server, _service(request).now(), drain, states.get(server.address))


@router.get("/servers", dependencies=[auth.Read], summary="List servers")
async def list_servers(
    request: Request, pool: Annotated[str, Query(max_length=128, pattern=PRINTABLE)] = ""
) -> ServersOut:
    """Servers with their health, load, live sessions (by state) and state, by pool then address."""
    servers = await _service(request).list_servers(pool)
    found = await drains.all_drains(_service(request))
    states = await history.session_states(_service(request))
    now = _service(request).now()
    return ServersOut(
        servers=[ServerOut.of(s, now, found.get(s.address), states.get(s.address)) for s in servers]
    )


@router.get("/servers/{address}", dependencies=[auth.Read], summary="One server")
async def get_server(request: Request, address: AddressPath) -> ServerOut:
    return await _out(request, await _service(request).get_server(address))


@router.post(
    "/servers",
    dependencies=[auth.Admin, audited.action("server.add")],
    status_code=201,
    summary="Register a server",
)
async def add_server(request: Request, response: Response, body: ServerIn) -> ServerOut:
    server = d.Server(
        address=body.address,
        pool=body.pool,
        weight=body.weight,
        max_sessions=body.max_sessions,
        agent_url=body.agent_url,
        sessions_url=body.sessions_url,
        admin_state=d.AdminState(body.admin_state),
    )
    added = await _service(request).add_server(server)
    response.headers["Location"] = f"/v1/servers/{quote(added.address, safe=':[]')}"
    return await _out(request, added)


@router.patch(
    "/servers/{address}",
    dependencies=[auth.Admin, audited.action("server.update")],
    summary="Change a server",
)
async def update_server(request: Request, address: AddressPath, body: ServerPatch) -> ServerOut:
    changes = ServerChanges(
        weight=body.weight,
        max_sessions=body.max_sessions,
        agent_url=body.agent_url,
        sessions_url=body.sessions_url,
        admin_state=d.AdminState(body.admin_state) if body.admin_state else None,
    )
    return await _out(request, await _service(request).update_server(address, changes))


@router.delete(
    "/servers/{address}",
    dependencies=[auth.Admin, audited.action("server.remove")],
    status_code=204,
    response_class=Response,
    summary="Remove a server",
)
async def remove_server(
    request: Request,
    address: AddressPath,
    force: Annotated[bool, Query(description="also end its live sessions")] = False,
) -> Response:
    """Refused (409) while the server holds live sessions, unless force=true."""
    await _service(request).remove_server(address, force)
    return Response(status_code=204)


async def _set_state(request: Request, address: str, state: d.AdminState) -> ServerOut:
    return await _out(request, await _service(request).set_server_state(address, state))


@router.post(
    "/servers/{address}/drain",
    dependencies=[auth.Admin, audited.action("server.drain")],
    summary="Drain a server (until empty, with a body)",
)
async def drain(request: Request, address: AddressPath, body: DrainIn | None = None) -> ServerOut:
    """No new sessions; its users still reconnect to it. With a body, a drain until empty: the broker
    messages the users, logs off sessions disconnected for `logoff_disconnected_after_s`, and moves
    the server to `then` once it holds no sessions; its progress is the answer's `drain` (and
    `GET .../drain`). 409 while a drain of the server is under way."""
    if body is None:
        return await _set_state(request, address, d.AdminState.DRAINING)
    service = _service(request)
    await drains.start_drain(service, address, body.notify, body.logoff_disconnected_after_s, body.then)
    return await _out(request, await service.get_server(address))


@router.get("/servers/{address}/drain", dependencies=[auth.Read], summary="A server's drain until empty")
async def get_drain(request: Request, address: AddressPath) -> DrainOut:
    """Its latest drain until empty and its progress; 404 when it has had none."""
    return DrainOut.of(await drains.get_drain(_service(request), address))


@router.delete(
    "/servers/{address}/drain",
    dependencies=[auth.Admin, audited.action("server.drain_cancel")],
    summary="Cancel a server's drain until empty",
)
async def cancel_drain(request: Request, address: AddressPath) -> DrainOut:
    """The drain stops where it is; the server stays draining (`enable` takes it back). 409 when no
    drain of it is under way."""
    return DrainOut.of(await drains.cancel_drain(_service(request), address))


@router.post(
    "/servers/{address}/maintenance",
    dependencies=[auth.Admin, audited.action("server.maintenance")],
    summary="Maintenance",
)
async def maintenance(request: Request, address: AddressPath) -> ServerOut:
    """Nothing is routed to it, not even its own users."""
    return await _set_state(request, address, d.AdminState.MAINTENANCE)


@router.post(
    "/servers/{address}/enable",
    dependencies=[auth.Admin, audited.action("server.enable")],
    summary="Enable a server",
)
async def enable(request: Request, address: AddressPath) -> ServerOut:
    return await _set_state(request, address, d.AdminState.ENABLED)
