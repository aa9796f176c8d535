"""`routing_sql.prefix_end`: the byte-order range [key, prefix_end(key)) holds exactly the strings
that start with the key, so the routing statement's guard finds every live session a truncated
cookie may stand for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rdbroker_broker.accounts import Rules, probes, resolve
from rdbroker_broker.db import routing_sql
from rdbroker_broker.db.routing_sql import NO_GUARD, placement_guard, prefix_end

text = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=12)


def utf8(s: str) -> bytes:
    return s.encode("utf-8")


@given(key=text, rest=st.text(st.characters(blacklist_categories=["Cs"]), max_size=8))
def test_every_string_starting_with_the_key_is_in_the_range(key: str, rest: str) -> None:
    end = prefix_end(key)
    if end is not None:
        assert utf8(key) <= utf8(key + rest) < utf8(end)


@given(key=text, other=text)
def test_every_string_in_the_range_starts_with_the_key(key: str, other: str) -> None:
    end = prefix_end(key)
    if end is not None and utf8(key) <= utf8(other) < utf8(end):
        assert other.startswith(key)


def test_the_ends_of_the_code_points() -> None:
    assert prefix_end("abc") == "abd"
    assert prefix_end("a\ud7ff") == "a\ue000"
    assert prefix_end("a\U0010ffff") is None
    assert prefix_end("\x7f") == "\x80"


def test_placement_guards() -> None:
    # A complete qualified name with no pool domain: the bare name may hold its session, and so
    # may mstsc's cut of it.
    assert placement_guard(probes(resolve("CORP\\alice"))) == (
        ["corp\\alic", "alice"],
        ["corp\\alic\x01", "alice\x01"],
        [],
        [],
    )
    assert placement_guard(probes(resolve("CORP\\bob"))) == (["bob"], ["bob\x01"], [], [])
    # A bare name: a qualified name's user part may be it, or a qualified cut's (`CORP\\alic`).
    assert placement_guard(probes(resolve("alice"))) == (
        [],
        [],
        ["alice", "a", "al", "ali", "alic"],
        ["alice\x01", "a\x01", "al\x01", "ali\x01", "alic\x01"],
    )
    # Cut by mstsc: longer names starting with it, and bare names starting with its user part.
    assert placement_guard(probes(resolve("CORP\\alic"))) == (
        ["corp\\alic", "alic"],
        ["corp\\alid", "alid"],
        [],
        [],
    )
    assert placement_guard(probes(resolve("abcdefghi"))) == (
        ["abcdefghi"],
        ["abcdefghj"],
        ["abcdefghi"],
        ["abcdefghj"],
    )
    # With a pool domain every complete spelling has one key: only cuts of it are probed.
    rules = Rules.of("CORP", ["corp.example.com"])
    assert placement_guard(probes(resolve("bob", rules), rules)) == NO_GUARD
    assert placement_guard(probes(resolve("CORP\\abc\U0010ffff"))) is None


def test_a_placing_statement_probes_only_the_ranges_a_name_has() -> None:
    # An empty range ('' to '') is no free probe: PostgreSQL walks every live key of the pool.
    for keys in (False, True):
        for names in (False, True):
            for wait in (False, True):
                for statement in routing_sql._PLACING[(keys, names, wait)]:
                    assert ("%(kf)s" in statement) is keys
                    assert ("%(nf)s" in statement) is names
                    assert ("SKIP LOCKED" in statement) is not wait
