"""Matching directory users (mstsc cookies, maybe truncated) against servers' reported user names,
in a pool without a domain (`accounts.compatible`; docs/accounts.md)."""

from __future__ import annotations

import pytest

from rdbroker_broker.accounts import compatible, fuller, resolve, same_account


def matches(cookie: str, reported: str) -> bool:
    return bool(cookie.strip()) and compatible(resolve(cookie), resolve(reported))


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
    assert matches(cookie, reported)


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
    assert not matches(cookie, reported)


def test_a_truncated_cookie_can_match_two_users_the_caller_calls_it_ambiguous() -> None:
    reported = ["annabeth", "annabel", "bob"]
    assert [u for u in reported if matches("CORP\\anna", u)] == ["annabeth", "annabel"]


def test_same_account_needs_a_missing_domain_or_the_same_one() -> None:
    assert same_account(resolve("CORP\\alice"), resolve("alice"))
    assert same_account(resolve("alice"), resolve("corp\\ALICE"))
    assert not same_account(resolve("CORP\\alice"), resolve("OTHER\\alice"))
    assert not same_account(resolve("CORP\\"), resolve("alice"))


def test_linked_name_keeps_the_cookies_domain() -> None:
    assert fuller("CORP\\alic", "alice") == "CORP\\alice"
    assert fuller("CORP\\alic", "CORP\\alice") == "CORP\\alice"
    assert fuller("alexandra", "alexandrab") == "alexandrab"
