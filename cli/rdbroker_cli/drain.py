"""`rdbroker servers drain ADDR` with a drain until empty (docs/broker.md): start it, follow it on a live
line until the server is empty, cancel it.

The broker carries the drain on (any replica, across restarts); this command only asks and watches,
so Ctrl-C or `--no-wait` leave it running, and `--watch` follows it again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rdbroker_cli import tables
from rdbroker_cli.client import ApiClient

POLL_S = 1.0  # between two looks at the drain's progress


def add_options(parser: argparse.ArgumentParser, duration: Callable[[str], int]) -> None:
    parser.add_argument(
        "--notify",
        default=None,
        metavar="TEXT",
        help="drain until empty, sending this message once to each user",
    )
    parser.add_argument(
        "--logoff-disconnected-after",
        type=duration,
        default=None,
        metavar="DURATION",
        help="drain until empty, logging off sessions disconnected this long (like 30m, 0 = at once)",
    )
    parser.add_argument(
        "--then",
        choices=("maintenance", "draining"),
        default=None,
        help="drain until empty, then set the server to this state (default maintenance)",
    )
    parser.add_argument("--no-wait", action="store_true", help="start the drain and return at once")
    parser.add_argument("--watch", action="store_true", help="follow the server's drain until it ends")
    parser.add_argument("--cancel", action="store_true", help="stop the server's drain (it stays draining)")


def until_empty(args: argparse.Namespace) -> bool:
    """Whether the command asks for a drain until empty (else a plain drain, as always)."""
    asked = (args.notify, args.logoff_disconnected_after, args.then)
    return any(value is not None for value in asked) or args.no_wait


def body(args: argparse.Namespace) -> dict[str, Any]:
    request: dict[str, Any] = {"then": args.then or "maintenance"}
    if args.notify is not None:
        request["notify"] = args.notify
    if args.logoff_disconnected_after is not None:
        request["logoff_disconnected_after_s"] = args.logoff_disconnected_after / 1000
    return request


def run(client: ApiClient, args: argparse.Namespace, out: TextIO | None = None) -> tuple[Any, str]:
    """The drain verbs beyond a plain drain; (the answer for --json, the text for people)."""
    out = out or sys.stdout
    address = args.address
    if args.cancel:
        drain = client.cancel_drain(address)
        return drain, line(drain) + "\n"
    if args.watch:
        drain = client.get_drain(address)
    else:
        server = client.start_drain(address, body(args))
        drain = server.get("drain") or {}
        if args.no_wait:
            return server, tables.render([server], tables.SERVER_COLUMNS) + line(drain) + "\n"
    return follow(client, address, drain, out, quiet=args.json)


def follow(
    client: ApiClient, address: str, drain: dict[str, Any], out: TextIO, quiet: bool = False
) -> tuple[Any, str]:
    """Show the drain's progress on one line until it ends (a line per change when `out` is not a
    terminal); Ctrl-C stops watching, not the drain."""
    live = out.isatty() and not quiet
    shown = ""
    try:
        while drain.get("running"):
            text = line(drain)
            if not quiet and text != shown:
                out.write(f"\r\x1b[K{text}" if live else f"{text}\n")
                out.flush()
                shown = text
            time.sleep(POLL_S)
            drain = client.get_drain(address)
    except KeyboardInterrupt:
        if live:
            out.write("\n")
        sys.stderr.write(
            f"stopped watching; the drain goes on in the broker (`rdbroker servers drain {address} --watch` "
            f"follows it, `--cancel` stops it)\n"
        )
        return drain, ""
    if live and shown:
        out.write("\r\x1b[K")
    return drain, line(drain) + "\n"


def line(drain: dict[str, Any]) -> str:
    """`draining 10.0.0.11:3389: waiting, 2 sessions left: 1 active, 1 disconnected; messaged 3, ...`"""
    address = drain.get("server_address", "?")
    counts = (
        f"messaged {drain.get('messaged', 0)}, logged off {drain.get('logged_off', 0)}, "
        f"errors {drain.get('errors', 0)}"
    )
    step = drain.get("step")
    if step == "done":
        return f"drained {address}: {drain.get('detail')} ({counts})"
    if step == "cancelled":
        return f"drain of {address} cancelled: {drain.get('detail')} ({counts})"
    text = f"draining {address}: {step}, {drain.get('detail')}; {counts}"
    if drain.get("next_logoff_at"):
        text += f"; next logoff {tables.when('next_logoff_at')(drain)} UTC"
    if drain.get("errors") and drain.get("last_error"):
        text += f"; last error: {str(drain['last_error'])[:120]}"
    return "".join(ch if ch.isprintable() else "?" for ch in text)
