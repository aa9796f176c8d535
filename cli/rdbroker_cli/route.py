"""`rdbroker route explain USER`: which assignment rule, pool and server a Route would give a user
now, and why (`GET /v1/route/explain`; nothing is placed)."""

from __future__ import annotations

import argparse
from typing import Any

from rdbroker_cli import tables
from rdbroker_cli.admin import Parser, _connection_options, _main
from rdbroker_cli.client import ApiClient

CANDIDATE_COLUMNS: list[tables.Column] = [
    ("ADDRESS", tables.field("address")),
    ("EFFECTIVE LOAD", lambda row: f"{row.get('effective_load', 0):.4g}"),
    ("LOAD", tables.load),
    ("HELD", tables.field("held_sessions", "0")),
    ("MAX", lambda row: str(row.get("max_sessions") or "-")),
    ("WEIGHT", tables.field("weight")),
]


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rdbroker route", description="how the broker routes users")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)
    explain = verbs.add_parser(
        "explain",
        help="which rule, pool and server a connection of USER would get now, and why (places nothing)",
        description="Which assignment rule a connection of USER meets, which pool it goes to, and which "
        "server the routing policy would pick now (the user's live session, or the placement ranking), "
        "and why. Reads only: nothing is placed.",
    )
    explain.add_argument("user", metavar="USER", help="the user name as a client sends it (CORP\\alice)")
    explain.add_argument("--client", default="", metavar="ADDR", help="the client's address (10.20.1.5)")
    explain.add_argument("--pool", default="", help="the pool the client names (a tsv:// collection)")
    _connection_options(explain)
    return parser


def render(answer: dict[str, Any]) -> str:
    """The explanation as lines a person reads top down."""
    rule = answer.get("assignment") or {}
    if not rule.get("consulted", True):
        assignment = "not read: the client named the pool"
    elif rule.get("rule"):
        assignment = (
            f"rule {rule['rule']} of {rule.get('rules')}: {rule.get('match')} -> {answer.get('pool')}"
        )
    else:
        count = rule.get("rules") or 0
        assignment = (
            f"none of {count} rules matched: the default pool" if count else "no rules: the default pool"
        )
    client = answer.get("client") or "-"
    lines = [
        ("user", f"{answer.get('user')} (account key {answer.get('account_key')})"),
        ("client", client),
        ("assignment", assignment),
        ("pool", f"{answer.get('pool')} (placement {answer.get('placement')})"),
        ("answer", _answer(answer)),
        ("why", str(answer.get("why", ""))),
    ]
    lines += [("note", str(note)) for note in answer.get("notes") or []]
    text = "".join(f"{name + ':':<12}{tables._one_line(value)}\n" for name, value in lines)
    candidates = answer.get("candidates") or []
    if candidates:
        eligible = answer.get("eligible", len(candidates))
        text += f"\ncandidates, best first ({len(candidates)} of {eligible}):\n"
        text += tables.render(candidates, CANDIDATE_COLUMNS)
    unavailable = answer.get("unavailable") or []
    if unavailable:
        text += "\ntaking no new sessions:\n"
        text += tables.render(
            unavailable, [("ADDRESS", tables.field("address")), ("WHY", tables.field("why"))]
        )
    return text + "\nnothing was placed: explain only reads\n"


def _answer(answer: dict[str, Any]) -> str:
    decision, server = answer.get("decision"), answer.get("server")
    if decision == "reconnect":
        return f"reconnect to {server}"
    if decision == "new":
        return f"a new session on {server}"
    return "refused: no server can take a new session"


def _run(client: ApiClient, args: argparse.Namespace) -> tuple[Any, str]:
    answer = client.explain_route(args.user, args.client, args.pool)
    return answer, render(answer)


def route_main(argv: list[str]) -> int:
    return _main(_parser(), _run, argv)
