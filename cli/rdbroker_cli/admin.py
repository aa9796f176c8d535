"""Admin verbs over the REST API: `rdbroker servers ...`, `rdbroker sessions ...`, `rdbroker pools ...`.

Tables by default, `--json` for scripts. `--url` / `--token` default to `RDBROKER_URL` / `RDBROKER_TOKEN`.
Any failure prints one line on stderr and exits 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rdbroker_cli import tables
from rdbroker_cli.client import DEFAULT_URL, ApiClient, ApiError

SESSION_STATES = ("pending", "active", "disconnected", "ended", "live")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (exit 2), without the usage block."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("RDBROKER_URL", DEFAULT_URL),
        help="the broker's REST API (env RDBROKER_URL; default %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("RDBROKER_TOKEN", ""),
        help="bearer token (env RDBROKER_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the broker")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


# --- servers -------------------------------------------------------------------------------------


def _servers_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rdbroker servers", description="list and change the terminal servers")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    listing = verbs.add_parser("list", help="servers with health, load, sessions and state")
    listing.add_argument("--pool", default="", help="only this pool")
    _connection_options(listing)
    for verb, help_ in (
        ("drain", "take no new sessions; its users still reconnect"),
        ("maintenance", "route nothing to it"),
        ("enable", "route to it again"),
    ):
        sub = verbs.add_parser(verb, help=help_)
        sub.add_argument("address", metavar="ADDRESS", help="host:port as registered")
        _connection_options(sub)
    add = verbs.add_parser("add", help="register a server")
    add.add_argument("address", metavar="ADDRESS")
    add.add_argument("--pool", default=None, help="pool (default: the default pool)")
    _server_fields(add)
    _connection_options(add)
    change = verbs.add_parser("set", help="change a server's weight, limit or agent URLs")
    change.add_argument("address", metavar="ADDRESS")
    _server_fields(change)
    _connection_options(change)
    remove = verbs.add_parser("remove", help="unregister a server")
    remove.add_argument("address", metavar="ADDRESS")
    remove.add_argument("--force", action="store_true", help="end its live sessions too")
    _connection_options(remove)
    return parser


def _server_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight", type=_positive, default=None)
    parser.add_argument("--max-sessions", type=_positive, default=None, help="0 = no limit")
    parser.add_argument("--agent-url", default=None, help="the load agent's URL, '' for none")
    parser.add_argument("--sessions-url", default=None, help="the agent's session list URL, '' for none")


def _server_body(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _run_servers(client: ApiClient, args: argparse.Namespace) -> tuple[Any, str]:
    fields = ("weight", "max_sessions", "agent_url", "sessions_url")
    if args.verb == "list":
        servers = client.list_servers(args.pool)
        return {"servers": servers}, tables.render(servers, tables.SERVER_COLUMNS)
    if args.verb in ("drain", "maintenance", "enable"):
        server = client.server_action(args.address, args.verb)
        return server, tables.render([server], tables.SERVER_COLUMNS)
    if args.verb == "add":
        server = client.add_server({"address": args.address, **_server_body(args, "pool", *fields)})
        return server, tables.render([server], tables.SERVER_COLUMNS)
    if args.verb == "set":
        body = _server_body(args, *fields)
        if not body:
            raise ApiError("nothing to change: give --weight, --max-sessions, --agent-url or --sessions-url")
        server = client.update_server(args.address, body)
        return server, tables.render([server], tables.SERVER_COLUMNS)
    client.remove_server(args.address, args.force)
    return {"removed": args.address}, f"removed {args.address}\n"


# --- sessions ------------------------------------------------------------------------------------


def _sessions_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rdbroker sessions", description="find and end users' sessions")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    lookup = verbs.add_parser("lookup", help="where is this user? (their live sessions)")
    lookup.add_argument("user", metavar="USER")
    lookup.add_argument("--pool", default="", help="only this pool")
    lookup.add_argument("--include-ended", action="store_true", help="also recent ended sessions")
    _connection_options(lookup)
    listing = verbs.add_parser("list", help="sessions, filtered (default: the live ones)")
    listing.add_argument("--pool", default="")
    listing.add_argument("--server", default="", help="server address")
    listing.add_argument("--user", default="")
    listing.add_argument(
        "--state",
        action="append",
        choices=SESSION_STATES,
        help="repeatable; 'live' = pending, active and disconnected (the default)",
    )
    listing.add_argument("--limit", type=_positive, default=100, help="at most this many (1..500)")
    listing.add_argument("--offset", type=_positive, default=0)
    _connection_options(listing)
    end = verbs.add_parser("end", help="end a session: the user is placed anew next time")
    end.add_argument("session_id", metavar="ID")
    _connection_options(end)
    return parser


def _run_sessions(client: ApiClient, args: argparse.Namespace) -> tuple[Any, str]:
    if args.verb == "lookup":
        sessions = client.lookup_user(args.user, args.pool, args.include_ended)
        if not sessions:
            return {"user": args.user, "sessions": []}, f"no sessions for {args.user}\n"
        return {"user": args.user, "sessions": sessions}, tables.render(sessions, tables.SESSION_COLUMNS)
    if args.verb == "list":
        params = [(name, getattr(args, name)) for name in ("pool", "server", "user") if getattr(args, name)]
        params += [("state", value) for value in args.state or ()]
        params += [("limit", str(args.limit)), ("offset", str(args.offset))]
        page = client.list_sessions(params)
        items = page["items"]
        text = tables.render(items, tables.SESSION_COLUMNS)
        total = page.get("total")
        if isinstance(total, int) and total > args.offset + len(items):
            text += f"{len(items)} of {total} sessions; next page: --offset {args.offset + len(items)}\n"
        return page, text
    session = client.end_session(args.session_id)
    return session, tables.render([session], tables.SESSION_COLUMNS)


# --- pools ---------------------------------------------------------------------------------------


def _pools_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rdbroker pools", description="the pools (farms, collections)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    _connection_options(verbs.add_parser("list", help="pools with their server and session counts"))
    return parser


def _run_pools(client: ApiClient, args: argparse.Namespace) -> tuple[Any, str]:
    pools = client.list_pools()
    return {"pools": pools}, tables.render(pools, tables.POOL_COLUMNS)


# --- the entry points ----------------------------------------------------------------------------

Runner = Callable[[ApiClient, argparse.Namespace], tuple[Any, str]]


def _main(parser: argparse.ArgumentParser, run: Runner, argv: Sequence[str]) -> int:
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exc:  # --help (0) or a bad command line (2)
        return int(exc.code or 0)
    try:
        with ApiClient(args.url, args.token, args.timeout) as client:
            answer, text = run(client, args)
    except ApiError as exc:
        sys.stderr.write(f"rdbroker: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps(answer, indent=2, ensure_ascii=False) + "\n")
    else:
        sys.stdout.write(text)
    return 0


def servers_main(argv: list[str]) -> int:
    return _main(_servers_parser(), _run_servers, argv)


def sessions_main(argv: list[str]) -> int:
    return _main(_sessions_parser(), _run_sessions, argv)


def pools_main(argv: list[str]) -> int:
    return _main(_pools_parser(), _run_pools, argv)
