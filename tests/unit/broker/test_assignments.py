"""Assignment rules (`assignments.py`): the farm file's `assignments:` read with line numbers, and the
first rule matching a connection's account or client network picking its pool."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from rdbroker_broker import assignments as a
from rdbroker_broker import domain as d
from rdbroker_broker.farm import FarmError, load_farm

FARM = """\
pools:
  - name: default
    default: true
  - name: finance
    domain: CORP
  - name: Lab
    placement: depth
servers:
  - address: 10.0.0.1:3389
  - address: 10.0.0.2:3389
    pool: finance
  - address: 10.0.0.3:3389
    pool: lab
    max_sessions: 20
assignments:
  - match: {user: 'CORP\\fin-*'}
    pool: finance
  - match: {network: 10.20.0.0/16}
    pool: lab
  - match: {user: 'ops-??', network: '2001:db8::/32'}
    pool: Lab
"""


def rules_of(text: str = FARM) -> a.RuleSet:
    farm = load_farm(text)
    return a.RuleSet.of(farm.assignments, farm.pools)


def pool_for(rules: a.RuleSet, user: str, client: str = "") -> str:
    return rules.match(user, a.client_ip(client)).pool


def test_the_farm_file_declares_rules_in_order_with_the_pools_own_names():
    farm = load_farm(FARM)
    assert farm.assignments == [
        a.Rule(pool="finance", user="CORP\\fin-*"),
        a.Rule(pool="Lab", network="10.20.0.0/16"),
        a.Rule(pool="Lab", user="ops-??", network="2001:db8::/32"),
    ]
    assert [p.placement for p in farm.pools] == [d.Placement.BREADTH, d.Placement.BREADTH, d.Placement.DEPTH]
    assert load_farm("servers: []\n").assignments == []


@pytest.mark.parametrize(
    ("user", "client", "pool"),
    [
        ("CORP\\fin-alice", "", "finance"),
        ("corp\\FIN-bob", "", "finance"),  # case-insensitive, as account keys are
        ("fin-carol", "", "finance"),  # a bare name: CORP\\fin-carol in pool finance (its domain)
        ("fin-dave@CORP", "", ""),  # no UPN suffix configured: its own realm's account
        ("CORP\\fin-", "", "finance"),  # mstsc's 9-character cut of CORP\\fin-anything
        ("CORP\\fina", "", ""),  # a cut that is not fin-*
        ("OTHER\\fin-x", "", ""),
        ("bob", "10.20.3.4:50123", "Lab"),
        ("bob", "10.21.0.1:50123", ""),
        ("CORP\\fin-eve", "10.20.3.4:50123", "finance"),  # the first rule that matches wins
        ("", "10.20.3.4:50123", "Lab"),  # no user name: network rules still match
        ("", "", ""),
        ("ops-01", "[2001:db8::7]:3389", "Lab"),  # both parts of a rule must match
        ("ops-01", "2001:db8::7:3389", "Lab"),  # the proxy's unbracketed IPv6 peer
        ("ops-001", "[2001:db8::7]:3389", ""),
        ("ops-01", "", ""),
        ("bob", "::ffff:10.20.0.9:50123", "Lab"),  # IPv4 through a dual-stack listener
    ],
)
def test_the_first_matching_rule_picks_the_pool(user, client, pool):
    assert pool_for(rules_of(), user, client) == pool


def test_a_match_says_which_rule_and_the_key_it_matched():
    match = rules_of().match("fin-carol", None)
    assert (match.position, match.key, match.rule) == (1, "corp\\fin-carol", a.Rule("finance", "CORP\\fin-*"))
    assert match.rule is not None
    assert match.rule.describe() == "user CORP\\fin-*"
    assert a.Rule("x", "u*", "10.0.0.0/8").describe() == "user u* and network 10.0.0.0/8"
    assert rules_of().match("nobody", None) == a.Match()


@pytest.mark.parametrize(
    ("glob", "key", "matches"),
    [
        ("CORP\\fin-*", "corp\\fin-", True),
        ("*", "", True),
        ("a?c", "abc", True),
        ("a?c", "ac", False),
        ("a.c", "abc", False),  # regex characters are literal
        ("a[b]c", "abc", False),
        ("a[b]c", "a[b]c", True),
        ("*\\bob", "corp\\bob", True),
        ("Jürgen*", "jürgen.x", True),
    ],
)
def test_globs(glob, key, matches):
    assert bool(a.compile_glob(glob).fullmatch(key)) is matches


@pytest.mark.parametrize(
    ("address", "ip"),
    [
        ("10.0.0.7:50123", "10.0.0.7"),
        ("10.0.0.7", "10.0.0.7"),
        ("[2001:db8::7]:50123", "2001:db8::7"),
        ("2001:db8::7:50123", "2001:db8::7"),
        ("::1", "::1"),
        ("[::ffff:10.1.2.3]:1", "10.1.2.3"),
        ("", None),
        ("host.example:3389", None),
        ("garbage", None),
    ],
)
def test_client_addresses(address, ip):
    found = a.client_ip(address)
    assert found == (ipaddress.ip_address(ip) if ip else None)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            "  - match: {network: 10.20.0.0/33}\n    pool: lab\n",
            "farm.yaml:6: assignments[0].match.network: ",
        ),
        (
            "  - match: {network: 10.20.1.0/16}\n    pool: lab\n",
            "has host bits set: the network is 10.20.0.0/16",
        ),
        ("  - match: {network: lab-net}\n    pool: lab\n", "'lab-net' is not a network in CIDR notation"),
        (
            "  - match: {user: 'x*'}\n    pool: nowhere\n",
            "farm.yaml:7: assignments[0].pool: unknown pool 'nowhere'",
        ),
        ("  - match: {}\n    pool: lab\n", "farm.yaml:6: assignments[0].match: matches nothing"),
        ("  - pool: lab\n", "assignments[0].match: required"),
        ("  - match: {user: 'x*'}\n", "assignments[0].pool: required"),
        ("  - match: {user: ''}\n    pool: lab\n", "assignments[0].match.user: expected an account glob"),
        ("  - match: {user: [a]}\n    pool: lab\n", "assignments[0].match.user: expected an account glob"),
        ("  - match: {group: admins}\n    pool: lab\n", "assignments[0].match.group: unknown field"),
        ("  - match: CORP\\x\n    pool: lab\n", "assignments[0].match: expected a mapping"),
        ("  - {match: {user: 'a*'}, pool: lab, weight: 3}\n", "assignments[0].weight: unknown field"),
    ],
)
def test_bad_rules_are_refused_at_their_line(rules, expected):
    text = "pools:\n  - name: default\n  - name: lab\n    default: true\nassignments:\n" + rules
    with pytest.raises(FarmError) as info:
        load_farm(text)
    assert expected in str(info.value)


def test_assignments_must_be_a_list():
    with pytest.raises(FarmError, match=r"farm\.yaml:1: assignments: expected a list of rules"):
        load_farm("assignments: {user: x}\n")


def test_depth_needs_a_limit_on_each_of_its_servers():
    text = """\
pools:
  - name: default
    default: true
    placement: depth
servers:
  - address: 10.0.0.1:3389
    max_sessions: 10
  - address: 10.0.0.2:3389
  - address: 10.0.0.3:3389
    max_sessions: 0
"""
    with pytest.raises(FarmError) as info:
        load_farm(text)
    assert str(info.value).splitlines() == [
        "farm.yaml:8: servers[1].max_sessions: pool default places by depth, which fills each server up to "
        "its max_sessions: set one on this server",
        "farm.yaml:10: servers[2].max_sessions: pool default places by depth, which fills each server up to "
        "its max_sessions: set one on this server",
    ]


def test_a_bad_placement_says_what_is_expected():
    with pytest.raises(FarmError, match=r"farm.yaml:3: pools\[0\].placement: expected breadth .* or depth"):
        load_farm("pools:\n  - name: default\n    placement: deep\n")


async def test_the_cache_reads_again_when_old_and_never_queues_behind_a_read():
    reads: list[asyncio.Event] = []
    versions = iter([a.RuleSet.of([a.Rule("lab", network="10.0.0.0/8")], []), a.EMPTY])

    async def load() -> a.RuleSet:
        gate = asyncio.Event()
        reads.append(gate)
        await gate.wait()
        return next(versions)

    cache = a.Cache(load, refresh_s=0)
    # Before the first read, callers wait for it.
    first, second = (asyncio.ensure_future(cache.pool_for("bob", "10.1.2.3:1")) for _ in range(2))
    await asyncio.sleep(0)
    assert len(reads) == 1
    reads[0].set()
    assert (await first, await second) == ("lab", "lab")
    # Old (refresh 0): the next call reads again; a call meanwhile takes the last rules at once.
    reading = asyncio.ensure_future(cache.pool_for("bob", "10.1.2.3:1"))
    await asyncio.sleep(0)
    assert len(reads) == 2
    assert await cache.pool_for("bob", "10.1.2.3:1") == "lab"
    reads[1].set()
    assert await reading == ""


async def test_a_failed_read_fails_its_caller_and_the_next_reads_again():
    calls = 0

    async def load() -> a.RuleSet:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database down")
        return a.EMPTY

    cache = a.Cache(load, refresh_s=60)
    with pytest.raises(ConnectionError):
        await cache.rules()
    assert await cache.pool_for("bob", "") == ""
    assert await cache.pool_for("bob", "") == ""
    assert calls == 2  # fresh for a minute now
