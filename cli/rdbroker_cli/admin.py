"""Admin verbs over the REST API: `rdbroker servers ...`, `sessions ...`, `pools ...`, `audit`.

Tables by default, `--json` for scripts. `--url` / `--token` default to `RDBROKER_URL` / `RDBROKER_TOKEN`.
Any failure prints one line on stderr and exits 1 (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from rdbroker_cli import drain, tables
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
        ("drain", "take no new sessions; its users still reconnect (until empty with --notify, ...)"),
        ("maintenance", "route nothing to it"),
        ("enable", "route to it again"),
    ):
        sub = verbs.add_parser(verb, help=help_)
        sub.add_argument("address", metavar="ADDRESS", help="host:port as registered")
        if verb == "drain":
            drain.add_options(sub, _duration(allow_zero=True))
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
    if args.verb == "drain" and (drain.until_empty(args) or args.watch or args.cancel):
        return drain.run(client, args)
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
    parser = Parser(
        prog="rdbroker sessions",
        description="find and end users' sessions; log off, disconnect or message them through their "
        "server's agent",
    )
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
    for verb, help_ in SESSION_ACTIONS.items():
        action = verbs.add_parser(verb, help=help_)
        action.add_argument("session_id", metavar="ID")
        if verb == "message":
            action.add_argument("--text", required=True, help="one line, at most 500 characters")
        _connection_options(action)
        # The broker waits for the agent (RDBROKER_AGENT_ACTION_TIMEOUT_S, 20 s by default).
        action.set_defaults(timeout=ACTION_TIMEOUT_S)
    return parser


# Actions the session's server's agent carries out (docs/api.md).
SESSION_ACTIONS = {
    "logoff": "log the user's session off its server (their programs end)",
    "disconnect": "close the user's connection; the session stays on its server",
    "message": "show the user a message in their session",
}
ACTION_TIMEOUT_S = 30.0


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
    if args.verb in SESSION_ACTIONS:
        done = client.session_action(args.session_id, args.verb, getattr(args, "text", None))
        session = done["session"]
        line = f"{done.get('detail')} on {done.get('server_address')} (as {done.get('server_user')})\n"
        return done, line + tables.render([session], tables.SESSION_COLUMNS)
    session = client.end_session(args.session_id)
    return session, tables.render([session], tables.SESSION_COLUMNS)


# --- pools ---------------------------------------------------------------------------------------


def _pools_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rdbroker pools", description="the pools (farms, collections) and their settings")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    _connection_options(verbs.add_parser("list", help="pools with their settings, servers and sessions"))
    show = verbs.add_parser("show", help="every setting of one pool")
    show.add_argument("name", metavar="NAME")
    _connection_options(show)
    change = verbs.add_parser(
        "set",
        help="change a pool's settings (the next `rdbroker apply` sets them from the farm file again)",
        description="Change a pool's settings. The next `rdbroker apply` of a farm file sets every "
        "setting from the file again: put lasting changes in the file.",
    )
    change.add_argument("name", metavar="NAME")
    change.add_argument("--domain", default=None, help="NetBIOS domain of bare user names ('' for none)")
    change.add_argument(
        "--upn-suffix",
        dest="upn_suffixes",
        action="append",
        default=None,
        metavar="SUFFIX",
        help="a UPN suffix that means the domain (repeatable; replaces the list)",
    )
    change.add_argument("--no-upn-suffixes", action="store_true", help="clear the UPN suffixes")
    change.add_argument("--junk-bytes", type=_size, default=None, help="2048, 2KiB, 0 = none is junk")
    change.add_argument("--confirm-timeout", type=_duration(), default=None, help="like 2m")
    change.add_argument("--stale-after", type=_duration(zero=True), default=None, help="like 30s, or default")
    change.add_argument("--logon-lag", type=_duration(allow_zero=True), default=None, help="like 30s")
    change.add_argument(
        "--sessions-interval", type=_duration(zero=True), default=None, help="like 5s, or default"
    )
    change.add_argument("--disconnect-timeout", type=_duration(), default=None, help="like 8h")
    change.add_argument(
        "--probe-interval", type=_duration(zero=True), default=None, help="like 2s, or default"
    )
    change.add_argument(
        "--probe-timeout", type=_duration(zero=True), default=None, help="like 2s, or default"
    )
    change.add_argument(
        "--honor-routing-tokens",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="follow clients' routing tokens where policy allows (--no-...: ignore them, place by policy)",
    )
    change.add_argument(
        "--placement",
        choices=("breadth", "depth"),
        default=None,
        help="breadth: the least loaded server; depth: fill the busiest up to its max_sessions first",
    )
    change.add_argument("--probe-rise", type=_positive, default=None, help="1..100, 0 = default")
    change.add_argument("--probe-fall", type=_positive, default=None, help="1..100, 0 = default")
    _connection_options(change)
    return parser


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?")
_SIZE = re.compile(r"(\d+)\s*(b|kib|mib)?", re.IGNORECASE)


def _duration(zero: bool = False, allow_zero: bool = False) -> Callable[[str], int]:
    """`500ms`, `30s`, `2m`, `1h30m`, `2d` or seconds, in milliseconds; `default` (= 0) where `zero`.
    The broker checks the bounds."""

    def parse(text: str) -> int:
        value = text.strip()
        if zero and value == "default":
            return 0
        match = _DURATION.fullmatch(value)
        if value.isdigit():
            ms = int(value) * 1000
        elif value and match and any(match.groups()):
            days, hours, minutes, secs, millis = (int(g or 0) for g in match.groups())
            ms = (((days * 24 + hours) * 60 + minutes) * 60 + secs) * 1000 + millis
        else:
            raise argparse.ArgumentTypeError(
                f"not a duration: {text!r} (like 500ms, 30s, 2m, 1h30m{', or default' if zero else ''})"
            )
        if ms == 0 and not (zero or allow_zero):
            raise argparse.ArgumentTypeError(f"must be longer than 0: {text!r}")
        return ms

    return parse


def _size(text: str) -> int:
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (like 2048, 512B, 2KiB, 1MiB)")
    return int(match[1]) * {"": 1, "b": 1, "kib": 1024, "mib": 1024 * 1024}[(match[2] or "").lower()]


# flag -> (API field, divisor of the parsed value: durations parse to milliseconds, `_s` fields take seconds)
_POOL_FLAGS: dict[str, tuple[str, float]] = {
    "domain": ("domain", 1),
    "junk_bytes": ("junk_bytes", 1),
    "confirm_timeout": ("confirm_timeout_s", 1000),
    "stale_after": ("stale_after_ms", 1),
    "logon_lag": ("logon_lag_s", 1000),
    "sessions_interval": ("sessions_interval_ms", 1),
    "disconnect_timeout": ("disconnect_timeout_s", 1000),
    "probe_interval": ("probe_interval_ms", 1),
    "probe_timeout": ("probe_timeout_ms", 1),
    "probe_rise": ("probe_rise", 1),
    "probe_fall": ("probe_fall", 1),
    "honor_routing_tokens": ("honor_routing_tokens", 1),
    "placement": ("placement", 1),
}
APPLY_NOTE = "note: the next `rdbroker apply` of a farm file sets the pool's settings from the file again\n"


def _pool_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for flag, (name, divisor) in _POOL_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            body[name] = value if divisor == 1 else value / divisor
    if args.no_upn_suffixes and args.upn_suffixes:
        raise ApiError("give --upn-suffix or --no-upn-suffixes, not both")
    if args.no_upn_suffixes:
        body["upn_suffixes"] = []
    elif args.upn_suffixes is not None:
        body["upn_suffixes"] = args.upn_suffixes
    return body


def _run_pools(client: ApiClient, args: argparse.Namespace) -> tuple[Any, str]:
    if args.verb == "show":
        pool = client.get_pool(args.name)
        return pool, tables.render_settings(pool, tables.POOL_SETTINGS)
    if args.verb == "set":
        body = _pool_body(args)
        if not body:
            raise ApiError("nothing to change: give at least one setting (see `rdbroker pools set --help`)")
        pool = client.update_pool(args.name, body)
        sys.stderr.write(APPLY_NOTE)
        return pool, tables.render_settings(pool, tables.POOL_SETTINGS)
    pools = client.list_pools()
    return {"pools": pools}, tables.render(pools, tables.POOL_COLUMNS)


# --- audit ---------------------------------------------------------------------------------------


def _audit_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="rdbroker audit",
        description="operators' changes to the directory, newest first (needs the admin token); "
        "refused attempts are in the broker's log only",
    )
    parser.add_argument("--action", default="", help="only this action, like server.drain")
    parser.add_argument("--target", default="", help="only this server address, pool name or session id")
    parser.add_argument("--actor", default="", help="only this actor, like token:admin")
    parser.add_argument("--limit", type=_positive, default=50, help="at most this many (1..1000)")
    parser.add_argument("--before", type=_positive, default=None, help="only entries older than this id")
    _connection_options(parser)
    return parser


def _run_audit(client: ApiClient, args: argparse.Namespace) -> tuple[Any, str]:
    params = [(name, getattr(args, name)) for name in ("action", "target", "actor") if getattr(args, name)]
    params.append(("limit", str(args.limit)))
    if args.before is not None:
        params.append(("before", str(args.before)))
    page = client.list_audit(params)
    items = page["items"]
    if not items:
        return page, "no audit records\n"
    text = tables.render(items, tables.AUDIT_COLUMNS)
    older = page.get("next_before")
    if isinstance(older, int):
        text += f"older entries: --before {older}\n"
    return page, text


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


def audit_main(argv: list[str]) -> int:
    return _main(_audit_parser(), _run_audit, argv)
