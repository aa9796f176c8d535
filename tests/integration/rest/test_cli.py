"""The admin verbs against the real broker (uvicorn on 127.0.0.1, PostgreSQL): what an operator types."""

from __future__ import annotations

import json

import pytest

from rdbroker_cli.__main__ import main as rdbroker
from rdbroker_cli.admin import APPLY_NOTE as NOTE
from tests.integration.rest.conftest import ADMIN, READ, SERVERS, LiveBroker


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rdbroker(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_operator_session(live_broker: LiveBroker, capsys, monkeypatch):
    monkeypatch.setenv("RDBROKER_URL", live_broker.url)
    monkeypatch.setenv("RDBROKER_TOKEN", READ)

    code, out, err = run(capsys, "servers", "list")
    assert (code, err) == (0, "")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == [
        "POOL", "ADDRESS", "STATE", "HEALTH", "POWER", "LOAD", "SESSIONS", "HELD", "WEIGHT", "MAX",
    ]  # fmt: skip
    assert rows[1:] == [
        ["Sales", SERVERS[2], "enabled", "unknown", "on", "-", "0", "0", "100", "0"],
        ["default", SERVERS[0], "enabled", "unknown", "on", "-", "0", "0", "100", "0"],
        ["default", SERVERS[1], "enabled", "unknown", "on", "-", "0", "0", "100", "0"],
    ]

    code, _, err = run(capsys, "servers", "drain", SERVERS[0])
    assert (code, err) == (
        1,
        "rdbroker: 403 Admin token required: this change needs the admin token; "
        "the read token reads the directory only\n",
    )
    code, out, _ = run(capsys, "servers", "drain", SERVERS[0], "--token", ADMIN, "--json")
    assert (code, json.loads(out)["admin_state"]) == (0, "draining")
    code, out, _ = run(capsys, "servers", "enable", SERVERS[0], "--token", ADMIN)
    assert code == 0
    assert "enabled" in out.splitlines()[1]
    code, _, err = run(capsys, "servers", "maintenance", "10.9.9.9:3389", "--token", ADMIN)
    assert (code, err) == (1, "rdbroker: 404 Not found: unknown server '10.9.9.9:3389'\n")

    code, out, _ = run(
        capsys, "servers", "add", "10.0.0.40:3389", "--pool", "sales", "--max-sessions", "5", "--token", ADMIN
    )
    assert code == 0
    assert out.splitlines()[1].split()[:2] == ["Sales", "10.0.0.40:3389"]
    code, out, _ = run(
        capsys, "servers", "set", "10.0.0.40:3389", "--weight", "300", "--json", "--token", ADMIN
    )
    assert (code, json.loads(out)["weight"]) == (0, 300)
    code, _, err = run(capsys, "servers", "add", "not an address", "--token", ADMIN)
    assert code == 1
    assert err.startswith("rdbroker: 422 Invalid request: body.address: ")
    code, out, _ = run(capsys, "servers", "remove", "10.0.0.40:3389", "--token", ADMIN)
    assert (code, out) == (0, "removed 10.0.0.40:3389\n")

    code, out, _ = run(capsys, "pools", "list")
    assert code == 0
    assert [line.split() for line in out.splitlines()[1:]] == [
        ["Sales", "8h", "-", "-", "2KiB", "2m", "default", "30s", "yes", "breadth", "1", "0"],
        ["default", "yes", "8h", "-", "-", "2KiB", "2m", "default", "30s", "yes", "breadth", "2", "0"],
    ]
    code, out, err = run(
        capsys, "pools", "set", "sales", "--domain", "CORP", "--upn-suffix", "Corp.Example.com",
        "--stale-after", "45s", "--token", ADMIN,
    )  # fmt: skip
    assert (code, err) == (0, NOTE)
    assert "upn_suffixes:             corp.example.com\n" in out
    code, out, _ = run(capsys, "pools", "show", "Sales")
    assert (code, out.splitlines()[3], out.splitlines()[7]) == (
        0,
        "domain:                   CORP",
        "stale_after:              45s",
    )
    code, _, err = run(capsys, "pools", "set", "sales", "--domain", "", "--token", ADMIN)
    assert (code, err) == (
        1,
        "rdbroker: 400 Invalid input: upn_suffixes: UPN suffixes need the pool's `domain` (the domain they "
        "mean)\n",
    )
    code, out, err = run(
        capsys, "pools", "set", "sales", "--no-honor-routing-tokens", "--json", "--token", ADMIN
    )
    assert (code, err, json.loads(out)["honor_routing_tokens"]) == (0, NOTE, False)
    code, out, _ = run(capsys, "pools", "show", "Sales")
    assert (code, out.splitlines()[9]) == (0, "honor_routing_tokens:     no")
    code, _, err = run(capsys, "pools", "set", "sales", "--logon-lag", "2h", "--token", ADMIN)
    assert (code, err) == (
        1,
        "rdbroker: 422 Invalid request: body.logon_lag_s: Value error, expected 0s to 1h\n",
    )

    assert run(capsys, "sessions", "lookup", "alice") == (0, "no sessions for alice\n", "")
    code, out, _ = run(capsys, "sessions", "list", "--state", "ended", "--json")
    assert (code, json.loads(out)) == (0, {"items": [], "total": 0, "limit": 100, "offset": 0})
    code, _, err = run(capsys, "sessions", "list", "--limit", "501")
    assert code == 1
    assert err.startswith("rdbroker: 422 Invalid request: query.limit: ")
    code, _, err = run(capsys, "sessions", "end", "0123", "--token", ADMIN)
    assert (code, err) == (1, "rdbroker: 404 Not found: unknown session '0123'\n")
