"""The admin verbs against a contract-serving FastAPI app on 127.0.0.1: tables, --json, env vars, errors."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from rdbroker_cli import tables
from rdbroker_cli.__main__ import main as rdbroker
from rdbroker_cli.client import ApiClient, ApiError
from tests.support.postgres import free_port
from tests.unit.cli.contract_app import ADMIN_TOKEN, READ_TOKEN, build_app, serve

NEEDS_ADMIN = "403 Admin token required: this change needs the admin token"
READ = ("--token", READ_TOKEN)
ADMIN = ("--token", ADMIN_TOKEN)


@pytest.fixture
def api() -> Iterator[tuple[str, object]]:
    app = build_app()
    with serve(app, free_port()) as url:
        yield url, app


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = rdbroker(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_servers_list_is_a_table(api, capsys):
    url, _ = api
    code, out, err = run(capsys, "servers", "list", "--url", url, *READ)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "POOL", "ADDRESS", "STATE", "HEALTH", "POWER", "LOAD", "SESSIONS", "HELD", "WEIGHT", "MAX",
    ]  # fmt: skip
    assert lines[1].split() == [
        "default", "10.0.0.11:3389", "enabled", "up", "on", "35", "1", "1", "100", "0",
    ]  # fmt: skip
    assert lines[2].split() == [
        "default", "10.0.0.12:3389", "enabled", "down", "off", "-", "0", "0", "100", "0",
    ]  # fmt: skip
    # A stale result reads unknown, with the time of the last result (UTC).
    assert lines[3].split() == [
        "default", "10.0.0.13:3389", "enabled", "unknown", "(last", "result", "00:00:05)", "on", "-",
        "2", "0", "100", "0",
    ]  # fmt: skip
    assert lines[0].index("LOAD") == lines[3].index("-  ")  # the columns stay aligned


def test_servers_list_json_is_the_api_answer(api, capsys):
    url, _ = api
    code, out, _ = run(capsys, "servers", "list", "--json", "--url", url, *READ)
    assert code == 0
    servers = json.loads(out)["servers"]
    assert [s["address"] for s in servers] == ["10.0.0.11:3389", "10.0.0.12:3389", "10.0.0.13:3389"]
    stale = servers[2]
    assert (stale["health"], stale["stale"], stale["held_sessions"]) == ("unknown", True, 0)
    assert stale["probed_at"].endswith("T00:00:05Z")


def test_url_and_token_come_from_the_environment(api, capsys, monkeypatch):
    url, app = api
    monkeypatch.setenv("RDBROKER_URL", url)
    monkeypatch.setenv("RDBROKER_TOKEN", ADMIN_TOKEN)
    code, out, err = run(capsys, "servers", "drain", "10.0.0.11:3389")
    assert (code, err) == (0, "")
    assert "draining" in out.splitlines()[1]
    assert ("POST", "/v1/servers/10.0.0.11:3389/drain", "") in app.state.calls


@pytest.mark.parametrize(("verb", "state"), [("maintenance", "maintenance"), ("enable", "enabled")])
def test_server_state_verbs(api, capsys, verb, state):
    url, _ = api
    code, out, _ = run(capsys, "servers", verb, "10.0.0.12:3389", "--json", "--url", url, *ADMIN)
    assert code == 0
    assert json.loads(out)["admin_state"] == state


def test_agent_tightened_state_is_shown(api, capsys):
    url, _ = api
    rdbroker(["servers", "set", "10.0.0.11:3389", "--weight", "50", "--url", url, *ADMIN])
    capsys.readouterr()
    code, out, _ = run(capsys, "servers", "list", "--url", url, *READ)
    assert code == 0
    assert " 50 " in out.splitlines()[1]


def test_add_and_remove_server(api, capsys):
    url, _ = api
    code, out, _ = run(
        capsys, "servers", "add", "10.0.0.13:3389", "--max-sessions", "20", "--url", url, *ADMIN
    )
    assert code == 0
    assert "10.0.0.13:3389" in out
    code, out, _ = run(capsys, "servers", "remove", "10.0.0.13:3389", "--url", url, *ADMIN)
    assert (code, out) == (0, "removed 10.0.0.13:3389\n")


def test_remove_refused_then_forced(api, capsys):
    url, app = api
    code, out, err = run(capsys, "servers", "remove", "10.0.0.11:3389", "--url", url, *ADMIN)
    assert (code, out) == (1, "")
    assert err == "rdbroker: 409 Server holds live sessions: 10.0.0.11:3389 holds 1 live session\n"
    code, _, _ = run(capsys, "servers", "remove", "10.0.0.11:3389", "--force", "--url", url, *ADMIN)
    assert code == 0
    assert ("DELETE", "/v1/servers/10.0.0.11:3389", "force=true") in app.state.calls


def test_set_with_nothing_to_change_is_refused(api, capsys):
    url, _ = api
    code, _, err = run(capsys, "servers", "set", "10.0.0.11:3389", "--url", url, *ADMIN)
    assert code == 1
    assert err.startswith("rdbroker: nothing to change")


def test_lookup_shows_the_users_server(api, capsys):
    url, _ = api
    code, out, _ = run(capsys, "sessions", "lookup", "ALICE", "--url", url, *READ)
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:6] == ["ID", "USER", "POOL", "SERVER", "STATE", "CONFIRMED"]
    assert row.split()[:6] == ["s-1", "alice", "default", "10.0.0.11:3389", "active", "claim"]
    assert "2026-11-27 09:30:00" in row


def test_sessions_show_whether_the_agent_confirmed_them(api, capsys):
    url, _ = api
    code, out, _ = run(capsys, "sessions", "list", "--state", "live", "--state", "ended", "--url", url, *READ)
    assert code == 0
    confirmed = {line.split()[0]: line.split()[5] for line in out.splitlines()[1:]}
    assert confirmed == {"s-1": "claim", "s-2": "no", "s-3": "yes"}
    code, out, _ = run(capsys, "sessions", "lookup", "carol", "--json", "--url", url, *READ)
    assert json.loads(out)["sessions"][0]["confirmed"] is True


def test_lookup_escapes_a_domain_user_and_says_when_nothing_is_found(api, capsys):
    url, app = api
    code, out, _ = run(capsys, "sessions", "lookup", "CORP\\bob", "--url", url, *READ)
    assert (code, out) == (0, "no sessions for CORP\\bob\n")
    assert b"/v1/users/CORP%5Cbob/sessions" in app.state.raw_paths
    assert any(call[1] == "/v1/users/CORP\\bob/sessions" for call in app.state.calls)
    code, out, _ = run(
        capsys, "sessions", "lookup", "CORP\\bob", "--include-ended", "--json", "--url", url, *READ
    )
    assert json.loads(out)["sessions"][0]["state"] == "ended"


def test_sessions_list_filters_and_pages(api, capsys):
    url, app = api
    code, out, _ = run(
        capsys,
        "sessions", "list", "--state", "active", "--state", "ended", "--pool", "default", "--limit", "1",
        "--url", url, *READ,
    )  # fmt: skip
    assert code == 0
    assert out.splitlines()[-1] == "1 of 2 sessions; next page: --offset 1"
    query = "pool=default&state=active&state=ended&limit=1&offset=0"
    assert ("GET", "/v1/sessions", query) in app.state.calls


def test_end_session(api, capsys):
    url, _ = api
    code, out, _ = run(capsys, "sessions", "end", "s-1", "--json", "--url", url, *ADMIN)
    assert code == 0
    assert json.loads(out)["state"] == "ended"


def test_pools_list(api, capsys):
    url, _ = api
    code, out, _ = run(capsys, "pools", "list", "--url", url, *READ)
    assert code == 0
    header, row = out.splitlines()
    assert header.split("  ")[0:1] == ["NAME"]
    assert [h.strip() for h in header.split("  ") if h.strip()] == [
        "NAME", "DEFAULT", "DISCONNECT TIMEOUT", "DOMAIN", "UPN SUFFIXES", "JUNK", "CONFIRM", "STALE AFTER",
        "LOGON LAG", "TOKENS", "PLACEMENT", "SERVERS", "SESSIONS",
    ]  # fmt: skip
    assert row.split() == [
        "default", "yes", "8h", "CORP", "corp.example.com", "2KiB", "2m", "default", "30s", "yes", "depth",
        "3", "1",
    ]  # fmt: skip


def test_pools_show_prints_every_setting(api, capsys):
    url, _ = api
    code, out, _ = run(capsys, "pools", "show", "default", "--url", url, *READ)
    assert code == 0
    settings = dict(line.split(":", 1) for line in out.splitlines())
    assert {k: v.strip() for k, v in settings.items()} == {
        "name": "default",
        "default": "yes",
        "disconnect_timeout": "8h",
        "domain": "CORP",
        "upn_suffixes": "corp.example.com",
        "junk_bytes": "2KiB",
        "confirm_timeout": "2m",
        "stale_after": "default (three probe intervals plus the probe lease)",
        "logon_lag": "30s",
        "honor_routing_tokens": "yes",
        "placement": "depth",
        "probe.interval": "2s",
        "probe.timeout": "default (RDBROKER_PROBE_TIMEOUT_MS)",
        "probe.rise": "default",
        "probe.fall": "3",
        "probe.sessions_interval": "5s",
        "servers": "3",
        "live_sessions": "1",
    }
    code, out, _ = run(capsys, "pools", "show", "default", "--json", "--url", url, *READ)
    assert json.loads(out)["upn_suffixes"] == ["corp.example.com"]


def test_pools_set_sends_each_setting_in_the_apis_units(api, capsys):
    url, app = api
    code, out, err = run(
        capsys,
        "pools", "set", "default", "--domain", "EU", "--upn-suffix", "eu.example.com", "--upn-suffix",
        "example.eu", "--junk-bytes", "4KiB", "--confirm-timeout", "5m", "--stale-after", "30s",
        "--logon-lag", "0", "--sessions-interval", "1500ms", "--disconnect-timeout", "1h30m",
        "--probe-interval", "default", "--probe-fall", "0", "--no-honor-routing-tokens", "--placement",
        "breadth", "--json", "--url", url, *ADMIN,
    )  # fmt: skip
    assert code == 0, err
    assert (
        err == "note: the next `rdbroker apply` of a farm file sets the pool's settings from the file again\n"
    )
    pool = json.loads(out)
    assert {k: pool[k] for k in (
        "domain", "upn_suffixes", "junk_bytes", "confirm_timeout_s", "stale_after_ms", "logon_lag_s",
        "sessions_interval_ms", "disconnect_timeout_s", "probe_interval_ms", "probe_fall",
        "honor_routing_tokens", "placement",
    )} == {
        "domain": "EU", "upn_suffixes": ["eu.example.com", "example.eu"], "junk_bytes": 4096,
        "confirm_timeout_s": 300.0, "stale_after_ms": 30_000, "logon_lag_s": 0.0,
        "sessions_interval_ms": 1500, "disconnect_timeout_s": 5400.0, "probe_interval_ms": 0, "probe_fall": 0,
        "honor_routing_tokens": False, "placement": "breadth",
    }  # fmt: skip
    assert ("PATCH", "/v1/pools/default", "") in app.state.calls
    code, out, _ = run(
        capsys, "pools", "set", "default", "--no-upn-suffixes", "--domain", "", "--url", url, *ADMIN
    )
    assert code == 0
    assert "domain:                   none" in out
    assert "upn_suffixes:             none" in out
    assert "honor_routing_tokens:     no" in out  # left as it was
    code, out, _ = run(capsys, "pools", "set", "default", "--honor-routing-tokens", "--url", url, *ADMIN)
    assert (code, app.state.calls[-1][1]) == (0, "/v1/pools/default")
    assert "honor_routing_tokens:     yes" in out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (
            ["--junk-bytes", "2MiB"],
            1,
            "rdbroker: 422 Invalid request: body.junk_bytes: Value error, expected 0",
        ),
        (
            ["--junk-bytes", "2KB"],
            2,
            "argument --junk-bytes: not a size: '2KB' (like 2048, 512B, 2KiB, 1MiB)",
        ),
        (["--confirm-timeout", "soon"], 2, "argument --confirm-timeout: not a duration: 'soon'"),
        (["--confirm-timeout", "0s"], 2, "argument --confirm-timeout: must be longer than 0: '0s'"),
        (["--confirm-timeout", "default"], 2, "argument --confirm-timeout: not a duration: 'default'"),
        (
            ["--upn-suffix", "a.com", "--no-upn-suffixes"],
            1,
            "rdbroker: give --upn-suffix or --no-upn-suffixes",
        ),
        ([], 1, "rdbroker: nothing to change: give at least one setting"),
    ],
)
def test_pools_set_refuses_bad_values(api, capsys, argv, code, message):
    url, _ = api
    got, out, err = run(capsys, "pools", "set", "default", *argv, "--url", url, *ADMIN)
    assert (got, out) == (code, "")
    assert message in err
    assert err.count("\n") == 1


def test_pools_set_needs_the_admin_token_and_a_known_pool(api, capsys):
    url, _ = api
    code, _, err = run(capsys, "pools", "set", "default", "--junk-bytes", "1", "--url", url, *READ)
    assert (code, err) == (1, f"rdbroker: {NEEDS_ADMIN}\n")
    code, _, err = run(capsys, "pools", "set", "nope", "--junk-bytes", "1", "--url", url, *ADMIN)
    assert (code, err) == (1, "rdbroker: 404 Not found: unknown pool 'nope'\n")


NOT_REGISTERED = "404 Server not found: no server is registered at 10.9.9.9:3389"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["servers", "list"], "401 Authentication required: send Authorization: Bearer <token>"),
        (
            ["servers", "drain", "10.0.0.11:3389", *READ],
            "403 Admin token required: this change needs the admin token",
        ),
        (["servers", "enable", "10.9.9.9:3389", *ADMIN], NOT_REGISTERED),
        (["sessions", "end", "nope", *ADMIN], "404 Session not found: no session nope"),
        (["servers", "list", "--pool", "x", *READ], "404 Pool not found: no pool named x"),
    ],
)
def test_api_errors_are_one_line_and_exit_1(api, capsys, monkeypatch, argv, message):
    url, _ = api
    monkeypatch.delenv("RDBROKER_TOKEN", raising=False)
    code, out, err = run(capsys, *argv, "--url", url)
    assert (code, out, err) == (1, "", f"rdbroker: {message}\n")


def test_unreachable_broker_is_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = run(capsys, "servers", "list", "--url", url)
    assert (code, out) == (1, "")
    assert err.startswith(f"rdbroker: cannot reach the broker at {url}: ")
    assert err.count("\n") == 1


def test_a_non_json_error_answer_is_one_line(api):
    url, _ = api
    with pytest.raises(ApiError, match=r"^502 Bad Gateway$"), ApiClient(url) as client:
        client.request("GET", "/broken")


def test_bad_url_and_bad_command_lines(capsys):
    code, _, err = run(capsys, "servers", "list", "--url", "ftp://x")
    assert (code, err) == (1, "rdbroker: the API URL must start with http:// or https://, got 'ftp://x'\n")
    code, _, err = run(capsys, "servers")
    assert code == 2
    assert err == "rdbroker servers: error: the following arguments are required: VERB\n"
    code, _, err = run(capsys, "sessions", "list", "--state", "bogus")
    assert code == 2
    assert "invalid choice: 'bogus'" in err
    code, _, err = run(capsys, "servers", "set", "a:1", "--weight", "-3")
    assert code == 2
    assert err == "rdbroker servers set: error: argument --weight: must not be negative: -3\n"


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "sessions", "--help")
    assert code == 0
    assert "lookup" in out


def test_a_stale_result_from_another_day_shows_the_date() -> None:
    row = {"health": "unknown", "stale": True, "probed_at": "2026-11-27T09:41:12Z"}
    assert tables.health(row) == "unknown (last result 2026-11-27 09:41:12)"
    assert tables.health({**row, "stale": False, "health": "up"}) == "up"
