"""The pure routing rules of DESIGN §4, without a database."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rdbroker_broker import accounts
from rdbroker_broker import domain as d
from rdbroker_broker.errors import InvalidInput


def srv(address: str, **kw) -> d.Server:
    return d.Server(address=address, pool="default", **kw)


def best(servers, exclude=()) -> d.Server:
    chosen = d.choose_server(servers, exclude)
    assert chosen is not None
    return chosen


def test_users_compare_case_insensitively():
    assert d.user_key("CORP\\Alice") == d.user_key("corp\\alice")


def test_identity_prefers_cookie_then_blob_and_strips_padding():
    assert d.identity_from(d.RouteRequest("c", cookie="FTBCO\\A70  "), 256) == "FTBCO\\A70"
    blob = d.RouteRequest("c", preconnection_blob=b"vm-guid-1\x00")
    assert d.identity_from(blob, 256) == "vm-guid-1"
    assert d.identity_from(d.RouteRequest("c"), 256) == ""


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (d.RouteRequest("c", cookie="x" * 300), "cookie"),
        (d.RouteRequest("c", cookie="bob\r\nX-Evil: 1"), "cookie"),
        (d.RouteRequest("c", cookie="a\x00b"), "cookie"),
        (d.RouteRequest("c", preconnection_blob=b"\xff\xfe"), "preconnection_blob"),
    ],
)
def test_bad_identity_is_invalid_input(request_, field):
    with pytest.raises(InvalidInput, match=field):
        d.identity_from(request_, 256)


def test_non_ascii_user_is_accepted():
    assert d.identity_from(d.RouteRequest("c", cookie="Jürgen"), 256) == "Jürgen"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (d.RouteRequest(""), "connection_id"),
        (d.RouteRequest("c" * 200), "connection_id"),
        (d.RouteRequest("c", routing_token="1" * 200), "routing_token"),
        (d.RouteRequest("c", routing_token="1.2\x01"), "routing_token"),
        (d.RouteRequest("c", pool="p\n"), "pool"),
        (d.RouteRequest("c", attempt=1000), "attempt"),
    ],
)
def test_bad_request_fields(request_, field):
    with pytest.raises(InvalidInput, match=field):
        d.validate_route_request(request_)


def test_lowest_effective_load_wins_and_weight_divides():
    servers = [srv("a", load=40), srv("b", load=30), srv("c", load=50, weight=200)]
    assert best(servers).address == "c"  # 50/200 < 30/100


def test_placements_since_report_count_against_a_server():
    idle = srv("a", load=0, max_sessions=10)
    busy = srv("b", load=25, max_sessions=10)
    assert best([idle, busy]).address == "a"
    # three placements on the idle one since its last report: 30 > 25
    stormed = srv("a", load=0, max_sessions=10, placements_since_report=3)
    assert best([stormed, busy]).address == "b"


def test_logon_storm_spreads_when_placements_are_counted():
    servers = {name: srv(name, load=0, max_sessions=50) for name in "abcd"}
    chosen = []
    for _ in range(40):
        top = best(servers.values())
        chosen.append(top.address)
        servers[top.address] = srv(
            top.address, load=0, max_sessions=50, placements_since_report=top.placements_since_report + 1
        )
    assert {chosen.count(name) for name in "abcd"} == {10}


def test_without_reports_the_sessions_holding_capacity_are_the_load():
    assert best([srv("a", held_sessions=5), srv("b", held_sessions=2)]).address == "b"
    # Closed unconfirmed claims are live (they keep affinity) but hold no capacity.
    assert (
        best([srv("a", live_sessions=9, held_sessions=1), srv("b", live_sessions=2, held_sessions=2)]).address
        == "a"
    )


def test_a_limit_counts_sessions_holding_capacity_not_closed_claims():
    assert d.takes_new_sessions(srv("x", max_sessions=3, live_sessions=50, held_sessions=2))
    assert not d.takes_new_sessions(srv("x", max_sessions=3, live_sessions=3, held_sessions=3))
    assert d.effective_load(srv("x", max_sessions=4, live_sessions=40, held_sessions=1)) == 25 / 100


@pytest.mark.parametrize(
    "server",
    [
        srv("x", admin_state=d.AdminState.DRAINING),
        srv("x", admin_state=d.AdminState.MAINTENANCE),
        srv("x", health=d.Health.DOWN),
        srv("x", agent_state=d.AgentState.DOWN),
        srv("x", agent_state=d.AgentState.DRAIN),
        srv("x", agent_state=d.AgentState.MAINT),
        srv("x", load=100),
        srv("x", max_sessions=2, live_sessions=2, held_sessions=2),
        srv("x", weight=0),
    ],
)
def test_servers_that_take_no_new_sessions(server):
    assert not d.takes_new_sessions(server)
    assert d.choose_server([server]) is None


def test_unknown_health_and_up_are_routable():
    assert d.takes_new_sessions(srv("x"))
    assert d.takes_new_sessions(srv("x", health=d.Health.UP, load=99, max_sessions=3, held_sessions=2))


def test_reconnects_go_to_draining_but_not_down_or_maintenance():
    assert d.takes_reconnects(srv("x", admin_state=d.AdminState.DRAINING))
    assert d.takes_reconnects(srv("x", load=100, max_sessions=1, held_sessions=1))
    assert not d.takes_reconnects(srv("x", admin_state=d.AdminState.MAINTENANCE))
    assert not d.takes_reconnects(srv("x", health=d.Health.DOWN))
    assert not d.takes_reconnects(srv("x", agent_state=d.AgentState.MAINT))


def test_excluded_servers_are_skipped():
    assert best([srv("a"), srv("b", held_sessions=3)], exclude=["a"]).address == "b"


@pytest.mark.parametrize(
    ("cookie", "user", "match"),
    [
        ("FTBCO\\A70", "FTBCO\\A7006799", True),
        ("ftbco\\a70", "FTBCO\\A7006799", True),
        ("AWAKECODI", "AWAKECODING\\bob", True),
        ("alice", "CORP\\alice", True),
        ("ALICE", "alice", True),
        ("CORP\\al  ", "CORP\\al", True),
        ("bob", "CORP\\alice", False),
        ("", "alice", False),
        ("CORP\\ali", "CORP\\bob", False),
    ],
)
def test_cookie_matches_full_user(cookie, user, match):
    matches = bool(cookie.strip()) and accounts.compatible(accounts.resolve(cookie), accounts.resolve(user))
    assert matches is match


def test_routing_token_address_forms():
    assert d.routing_token_address("") is None
    assert d.routing_token_address("3640205228.15629.0000") == "172.31.249.216:3389"
    assert d.routing_token_address(" 83886090.15629.0000 ") == "10.0.0.5:3389"
    assert d.routing_token_address("vendor-opaque-value") is None  # tolerated, never an address


# DESIGN §3: values that are not Microsoft's form are another product's opaque values.
@pytest.mark.parametrize(
    "token",
    ["192.168.1.10", "123.456.abc", "10.0.0.5", "123", "1.2", "12.x.0", "1.2.3.4", "-1.2.0", "1e3.2.0"],
)
def test_tokens_not_of_the_ms_shape_are_opaque(token):
    assert d.routing_token_address(token) is None


# Microsoft's shape, numbers out of range (a zero address or port is no address either).
@pytest.mark.parametrize(
    "token", ["0.15629.0000", "99999999999.15629.0000", "4294967296.15629.0000", "1.70000.0", "1.0.0"]
)
def test_ms_shaped_tokens_out_of_range_are_malformed(token):
    with pytest.raises(InvalidInput, match="routing token"):
        d.routing_token_address(token)


def test_a_cookie_that_casefolds_past_the_column_is_refused():
    request = d.RouteRequest(connection_id="c1", cookie="ß" * 200)
    with pytest.raises(InvalidInput, match="case-folded"):
        d.identity_from(request, d.MAX_USER_CHARS)
    assert d.identity_from(d.RouteRequest(connection_id="c1", cookie="ß" * 128), d.MAX_USER_CHARS)


def test_a_preconnection_blob_that_casefolds_past_the_column_is_refused():
    request = d.RouteRequest(connection_id="c1", preconnection_blob=("ß" * 200).encode())
    with pytest.raises(InvalidInput, match="preconnection_blob"):
        d.identity_from(request, d.MAX_USER_CHARS)


def test_client_address_fits_its_column():
    d.validate_route_request(d.RouteRequest(connection_id="c1", client_address="a" * d.MAX_ADDRESS_CHARS))
    with pytest.raises(InvalidInput, match="client_address"):
        d.validate_route_request(d.RouteRequest(connection_id="c1", client_address="a" * 256))


def test_a_stale_result_reads_as_none():
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    down = srv("a", health=d.Health.DOWN, agent_state=d.AgentState.DRAIN, load=100, fresh_until=now)
    assert not d.takes_new_sessions(down)
    assert not d.takes_reconnects(down)
    seen = d.as_seen_at(down, now)  # fresh_until is the first instant it no longer counts
    assert (seen.health, seen.agent_state, seen.load) == (d.Health.UNKNOWN, d.AgentState.NONE, -1)
    assert d.takes_new_sessions(seen)
    assert d.takes_reconnects(seen)
    assert d.as_seen_at(down, now - timedelta(microseconds=1)) == down
    assert d.as_seen_at(srv("b", health=d.Health.DOWN), now).health is d.Health.DOWN  # never aged


def test_stale_after_and_logon_lag_come_from_the_pool():
    from datetime import timedelta

    assert d.stale_after(d.Pool("p", stale_after_ms=1500), 2000, 10_000) == timedelta(milliseconds=1500)
    assert d.stale_after(d.Pool("p"), 2000, 10_000) == timedelta(seconds=16)  # 3 intervals + lease
    assert d.stale_after(d.Pool("p", probe_interval_ms=500), 2000, 10_000) == timedelta(seconds=11.5)
    assert d.stale_after(None, 2000, 600) == timedelta(seconds=6.6)
    assert d.logon_lag(d.Pool("p")) == timedelta(seconds=30)
    assert d.logon_lag(d.Pool("p", logon_lag_s=5.5)) == timedelta(seconds=5.5)


JUNK = {
    "learnt_from": "route",
    "confirmed": False,
    "origin_connection_id": "c1",
    "connection_id": "c1",
    "bytes_from_server": 2047,
}


def test_a_claim_closed_by_its_own_connection_with_fewer_than_junk_bytes_is_junk():
    assert d.is_junk_claim(d.Pool("p"), **JUNK)
    assert d.is_junk_claim(d.Pool("p"), **(JUNK | {"bytes_from_server": 0}))


@pytest.mark.parametrize(
    ("pool", "change"),
    [
        (d.Pool("p"), {"bytes_from_server": 2048}),  # the threshold itself carried a logon's start
        (d.Pool("p", junk_bytes=0), {"bytes_from_server": 0}),  # 0 turns the rule off
        (d.Pool("p"), {"confirmed": True}),  # the server's agent listed the user there
        (d.Pool("p"), {"learnt_from": "agent"}),  # the agent's own session, never a claim
        (d.Pool("p"), {"connection_id": "c2"}),  # a later connection came back to the claim
        (d.Pool("p"), {"origin_connection_id": None}),
    ],
)
def test_what_is_not_junk(pool, change):
    assert not d.is_junk_claim(pool, **(JUNK | change))


# --- placement modes -------------------------------------------------------------------------------

BREADTH, DEPTH = d.Placement.BREADTH, d.Placement.DEPTH


def _fill_one_by_one(servers: dict[str, d.Server], placement: d.Placement, users: int) -> list[str]:
    """Place `users` new users one after the other, each counted on its server as the database's
    trigger counts it (a session holding capacity, a placement since the last report)."""
    chosen = []
    for _ in range(users):
        top = d.choose_server(servers.values(), placement=placement)
        if top is None:
            chosen.append("-")
            continue
        chosen.append(top.address)
        servers[top.address] = replace(
            top, held_sessions=top.held_sessions + 1, placements_since_report=top.placements_since_report + 1
        )
    return chosen


def test_depth_fills_one_server_to_its_limit_before_opening_the_next():
    farm = {name: srv(name, max_sessions=3) for name in "abc"}
    assert _fill_one_by_one(dict(farm), DEPTH, 10) == list("aaabbbccc-")
    assert _fill_one_by_one(dict(farm), BREADTH, 10) == list("abcabcabc-")


def test_depth_fills_with_load_reports_counting_placements_since_them():
    # Agent loads: each placement adds 100/max_sessions until the next report shows it.
    farm = {name: srv(name, load=10, max_sessions=4) for name in "ab"}
    assert _fill_one_by_one(dict(farm), DEPTH, 9) == list("aaaabbbb-")
    assert _fill_one_by_one(dict(farm), BREADTH, 4) == list("abab")


def test_depth_takes_the_fullest_server_by_its_own_limit():
    half = srv("a", max_sessions=10, held_sessions=5)  # 50
    most = srv("b", max_sessions=4, held_sessions=3)  # 75
    empty = srv("c", max_sessions=2)
    assert d.choose_server([half, most, empty], placement=DEPTH) == most
    assert d.choose_server([half, most, empty], placement=BREADTH) == empty


def test_weight_divides_the_load_in_both_modes():
    # Weight is relative capacity: a heavier server at the same load is less busy, in either mode.
    heavy = srv("a", load=60, max_sessions=10, weight=200)  # 0.3
    light = srv("b", load=40, max_sessions=10)  # 0.4
    assert d.choose_server([heavy, light], placement=DEPTH) == light
    assert d.choose_server([heavy, light], placement=BREADTH) == heavy


def test_depth_opens_idle_servers_in_address_order_and_fills_each_to_its_limit():
    farm = {
        "a": srv("a", max_sessions=2, weight=50),
        "b": srv("b", max_sessions=2, weight=200),
        "c": srv("c", max_sessions=2, weight=100),
        "d": srv("d", max_sessions=2, weight=0),  # weight 0 takes no new sessions, in either mode
    }
    assert _fill_one_by_one(dict(farm), DEPTH, 7) == list("aabbcc-")
    # Breadth by weight: b (weight 200) takes two users for a's one.
    assert _fill_one_by_one(dict(farm), BREADTH, 7) == list("abcbca-")
    assert d.choose_server([farm["d"]], placement=DEPTH) is None


def test_equal_loads_go_by_sessions_holding_capacity_then_address():
    # Equal load figures: depth takes the server holding more sessions, breadth the one holding fewer.
    a = srv("a", load=20, max_sessions=10, held_sessions=1)
    b = srv("b", load=20, max_sessions=10, held_sessions=2)
    assert d.choose_server([a, b], placement=DEPTH) == b
    assert d.choose_server([a, b], placement=BREADTH) == a
    assert d.choose_server([a, replace(b, held_sessions=1)], placement=DEPTH) == a


@pytest.mark.parametrize(
    "unavailable",
    [
        srv("full", max_sessions=3, held_sessions=3),
        srv("full", max_sessions=3, held_sessions=2, load=100),
        srv("full", max_sessions=3, held_sessions=2, admin_state=d.AdminState.DRAINING),
        srv("full", max_sessions=3, held_sessions=2, health=d.Health.DOWN),
        srv("full", max_sessions=3, held_sessions=2, agent_state=d.AgentState.DRAIN),
    ],
)
def test_depth_passes_over_servers_that_take_no_new_sessions(unavailable):
    open_ = srv("open", max_sessions=3, held_sessions=1)
    idle = srv("idle", max_sessions=3)
    assert d.choose_server([unavailable, idle, open_], placement=DEPTH) == open_
    assert [s.address for s in d.rank_for_new_session([unavailable, idle, open_], ["open"], DEPTH)] == [
        "idle"
    ]


def test_depth_needs_a_limit_on_every_server():
    limited = [srv("a", max_sessions=5), srv("b", max_sessions=1)]
    assert d.placement_problems(DEPTH, limited) == []
    assert d.placement_problems(BREADTH, [srv("a")]) == []
    (problem,) = d.placement_problems(DEPTH, [*limited, srv("c"), srv("b2")])
    assert "b2, c have none" in problem
    assert "max_sessions" in problem
