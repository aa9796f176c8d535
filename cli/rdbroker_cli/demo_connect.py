"""`rdbroker demo-connect USER`: open one RDP connection through the proxy as USER, the way a client starts
one (Connection Request with `Cookie: mstshash=USER`), wait for the server's Connection Confirm, then ask the
REST API where the broker put the user. Run it twice: the second time lands on the same server.

It is a demo and smoke-test tool, not an RDP client: after the confirm it stands in for a logon by sending
LOGON_BYTES and reading back what the server answers (the demo's fake servers echo them; the broker ends a
connection that carried fewer than its pool's `junk_bytes` from the server as junk), then closes (or holds
the connection open for `--hold` seconds, so the session shows as active meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from typing import Any

from rdbroker_cli.admin import Parser
from rdbroker_cli.client import DEFAULT_URL, ApiClient, ApiError
from rdbroker_common.settings import split_host_port
from rdbroker_rdp import (
    PROTOCOL_HYBRID,
    PROTOCOL_SSL,
    ConnectionConfirm,
    X224Error,
    build_connection_request,
    parse_connection_confirm,
)

DEFAULT_PROXY = "127.0.0.1:3389"
LOGON_BYTES = 4096  # more than the default junk_bytes (2048) once echoed back


class DemoError(Exception):
    """One line to show the user."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rdbroker demo-connect", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("user", metavar="USER", help="the user name the client sends (mstshash cookie)")
    parser.add_argument(
        "--to",
        default=os.environ.get("RDBROKER_DEMO_PROXY", DEFAULT_PROXY),
        help="the proxy's RDP address (env RDBROKER_DEMO_PROXY; default %(default)s)",
    )
    parser.add_argument("--pool", default="", help="ask for this pool (tsv:// load-balance info)")
    parser.add_argument("--hold", type=float, default=0.0, help="keep the connection open this many seconds")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each step")
    parser.add_argument("--url", default=os.environ.get("RDBROKER_URL", DEFAULT_URL), help="the REST API")
    parser.add_argument("--token", default=os.environ.get("RDBROKER_TOKEN", ""), help="bearer token")
    return parser


async def connect(address: str, user: str, pool: str, timeout_s: float) -> tuple[str, asyncio.StreamWriter]:
    """Connect, send the Connection Request, read the Confirm; answers (what it said, the open writer)."""
    host, port = split_host_port(address)
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        raise DemoError(f"cannot connect to the proxy at {address}: {exc or 'timed out'}") from exc
    lb_info = f"tsv://MS Terminal Services Plugin.1.{pool}" if pool else None
    request = build_connection_request(
        cookie=user, load_balance_info=lb_info, requested_protocols=PROTOCOL_SSL | PROTOCOL_HYBRID
    )
    try:
        confirm = await _exchange(reader, writer, request, address, timeout_s)
        if confirm.kind != "neg_failure":
            await _logon(reader, writer, timeout_s)
    except BaseException:
        writer.close()
        raise
    if confirm.kind == "neg_rsp":
        return f"negotiation response, protocol {confirm.selected_protocol}", writer
    if confirm.kind == "neg_failure":
        return f"negotiation failure, code {confirm.failure_code}", writer
    return "no negotiation data", writer


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, address: str, timeout_s: float
) -> ConnectionConfirm:
    buffer = b""
    try:
        async with asyncio.timeout(timeout_s):
            writer.write(request)
            await writer.drain()
            while (confirm := parse_connection_confirm(buffer)) is None:
                chunk = await reader.read(4096)
                if not chunk:
                    raise DemoError(f"the proxy at {address} closed the connection without an answer")
                buffer += chunk
    except TimeoutError as exc:
        raise DemoError(f"no Connection Confirm from {address} within {timeout_s:g} s") from exc
    except X224Error as exc:
        raise DemoError(f"the answer from {address} is not a Connection Confirm: {exc}") from exc
    except OSError as exc:
        raise DemoError(f"the connection to {address} failed: {exc}") from exc
    return confirm


async def _logon(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float) -> None:
    """Send LOGON_BYTES and read the answer until as many came back, the server closed, or timeout_s."""
    received = 0
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(timeout_s):
            writer.write(bytes(LOGON_BYTES))
            await writer.drain()
            while received < LOGON_BYTES and (chunk := await reader.read(65536)):
                received += len(chunk)


def where(client: ApiClient, user: str, timeout_s: float) -> list[dict[str, Any]]:
    """The user's live sessions; waits a little for the proxy's `opened` report to reach the broker."""
    deadline = time.monotonic() + timeout_s
    while True:
        sessions = client.lookup_user(user)
        if any(s.get("state") == "active" for s in sessions) or time.monotonic() > deadline:
            return sessions
        time.sleep(0.2)


async def run(args: argparse.Namespace) -> None:
    what, writer = await connect(args.to, args.user, args.pool, args.timeout)
    try:
        sys.stdout.write(f"{args.user}: connected through {args.to}; the server answered ({what})\n")
        with ApiClient(args.url, args.token, args.timeout) as client:
            sessions = await asyncio.to_thread(where, client, args.user, args.timeout)
        if not sessions:
            sys.stdout.write(f"{args.user}: the broker shows no live session (yet)\n")
        for session in sessions:
            sys.stdout.write(
                f"{args.user}: session {session.get('id')} on {session.get('server_address')}"
                f" in pool {session.get('pool')} ({session.get('state')})\n"
            )
        sys.stdout.flush()
        if args.hold > 0:
            await asyncio.sleep(args.hold)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        split_host_port(args.to)
    except ValueError as exc:
        sys.stderr.write(f"rdbroker demo-connect: bad --to address: {exc}\n")
        return 2
    try:
        asyncio.run(run(args))
    except (DemoError, ApiError) as exc:
        sys.stderr.write(f"rdbroker demo-connect: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
