"""`rdbroker COMMAND ...`: dispatch to the command's module, imported only when it is used.

A service command (`broker`, `proxy`, `health`) hands the rest of the command line to that service's
own `main(argv)`, so `rdbroker proxy --help` shows the proxy's own flags.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "broker": ("rdbroker_broker.__main__", "main", "run the broker (gRPC + REST) on a database"),
    "migrate": (
        "rdbroker_broker.__main__",
        "migrate_main",
        "upgrade the database schema to head",
    ),
    "apply": ("rdbroker_broker.__main__", "apply_main", "apply a farm file (pools, servers) to the database"),
    "proxy": ("rdbroker_proxy.__main__", "main", "run an RDP proxy replica"),
    "health": ("rdbroker_health.__main__", "main", "run a health-probe replica"),
    "up": ("rdbroker_cli.up", "up_main", "run proxy, broker and health in one process (embedded SQLite)"),
    "demo": ("rdbroker_cli.up", "demo_main", "`up` with a few fake RDP servers on loopback, to try it out"),
    "demo-connect": ("rdbroker_cli.demo_connect", "main", "connect once as USER (through `up`/`demo`)"),
    "servers": ("rdbroker_cli.admin", "servers_main", "list, drain, enable... servers (REST API)"),
    "sessions": ("rdbroker_cli.admin", "sessions_main", "look up, list and end sessions (REST API)"),
    "pools": ("rdbroker_cli.admin", "pools_main", "list, show and change pools' settings (REST API)"),
    "route": (
        "rdbroker_cli.route",
        "route_main",
        "explain which pool and server a user would get (REST API)",
    ),
    "audit": ("rdbroker_cli.admin", "audit_main", "who changed what: the audit trail (REST API, admin)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: rdbroker COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`rdbroker COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage() + "\n")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"rdbroker: unknown command {command!r}\n\n{usage()}\n")
        return 2
    module_name, function_name, _ = COMMANDS[command]
    function: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), function_name)
    return function(rest)


if __name__ == "__main__":
    raise SystemExit(main())
