"""Matching directory users (mstsc cookies, maybe truncated) against servers' reported user names."""

from __future__ import annotations

import pytest

from rdbroker_broker import domain as d


@pytest.mark.parametrize(
    ("cookie", "reported"),
    [
        ("CORP\\alice", "alice"),  # quser prints bare names
        ("CORP\\alice", "ALICE"),
        ("CORP\\alic", "alice"),  # mstsc's 9-character cut, bare report
        ("CORP\\alic", "alicewonder"),
        ("CORP\\alic", "CORP\\alice"),  # the DOMAIN\user report forms keep working
        ("corp\\ALIC", "Corp\\Alice"),
        ("CORP\\alice", "CORP\\alice"),
        ("alice", "CORP\\alice"),  # FreeRDP drops the domain
        ("alexandra", "CORP\\alexandrab"),
        ("FTBCO\\A70", "FTBCO\\A7006799"),
    ],
)
def test_matches(cookie: str, reported: str) -> None:
    assert d.cookie_matches(cookie, reported)


@pytest.mark.parametrize(
    ("cookie", "reported"),
    [
        ("CORP\\alice", "OTHER\\alice"),  # two domains, two accounts
        ("CORP\\alic", "OTHER\\alice"),
        ("CORP\\alic", "bob"),
        ("CORP\\al", "alice"),  # 7 characters: a complete name, not a cut
        ("CORP\\alice", "alicex"),
        ("", "alice"),
        ("CORP\\alic", "xalice"),
    ],
)
def test_does_not_match(cookie: str, reported: str) -> None:
    assert not d.cookie_matches(cookie, reported)


def test_a_truncated_cookie_can_match_two_users_the_caller_calls_it_ambiguous() -> None:
    reported = ["annabeth", "annabel", "bob"]
    assert [u for u in reported if d.cookie_matches("CORP\\anna", u)] == ["annabeth", "annabel"]


def test_same_user_needs_a_missing_domain_or_the_same_one() -> None:
    assert d.same_user("CORP\\alice", "alice")
    assert d.same_user("alice", "corp\\ALICE")
    assert not d.same_user("CORP\\alice", "OTHER\\alice")
    assert not d.same_user("CORP\\", "alice")


def test_linked_name_keeps_the_cookies_domain() -> None:
    assert d.linked_user("CORP\\alic", "alice") == "CORP\\alice"
    assert d.linked_user("CORP\\alic", "CORP\\alice") == "CORP\\alice"
    assert d.linked_user("alexandra", "alexandrab") == "alexandrab"
