"""`accounts`: the table of docs/accounts.md, name by name."""

from __future__ import annotations

import pytest

from rdbroker_broker.accounts import NO_RULES, Rules, compatible, fuller, resolve

CORP = Rules.of("CORP", ["Corp.Example.com"])


@pytest.mark.parametrize(
    ("name", "key", "account_name", "cut"),
    [
        ("CORP\\bob", "corp\\bob", "bob", False),
        ("bob", "corp\\bob", "bob", False),
        ("bob@corp.example.com", "corp\\bob", "bob", False),
        ("  Bob   ", "corp\\bob", "bob", False),
        ("corp\\BOB", "corp\\bob", "bob", False),
        ("alice@cor", "corp\\alice", "alice", False),  # the cut suffix starts the pool's: exact
        ("bob@corp.", "corp\\bob", "bob", False),
        ("CORP\\alic", "corp\\alic", "alic", True),
        ("alexander", "corp\\alexander", "alexander", True),
        ("OTHERDOM\\bob", "otherdom\\bob", "bob", False),  # another domain: another account
        ("bob@other.example.com", "bob@other.example.com", "bob", False),
        ("alice@zzz", "alice@zzz", "alice", True),
        ("CORPORATE", "corp\\corporate", "corporate", True),  # a user starting `corporate`
        ("CORP\\", "corp\\", "", False),  # another realm's cut UPN: its key is a prefix
    ],
)
def test_with_a_pool_domain(name: str, key: str, account_name: str, cut: bool) -> None:
    account = resolve(name, CORP)
    assert (account.key, account.name, account.cut) == (key, account_name, cut)


@pytest.mark.parametrize(
    ("name", "key", "account_name", "cut"),
    [
        ("CORP\\Bob", "corp\\bob", "bob", False),
        ("Bob ", "bob", "bob", False),
        ("bob@corp.example.com", "bob@corp.example.com", "bob", False),
        ("CORP\\alic", "corp\\alic", "alic", True),
    ],
)
def test_without_a_pool_domain_keys_are_the_names(name: str, key: str, account_name: str, cut: bool) -> None:
    account = resolve(name)
    assert (account.key, account.name, account.cut) == (key, account_name, cut)


def test_compatible_forms() -> None:
    def ok(a: str, b: str, rules: Rules = NO_RULES) -> bool:
        return compatible(resolve(a, rules), resolve(b, rules), rules)

    assert ok("CORP\\alic", "alice", CORP)
    assert ok("alice", "CORP\\alic", CORP)
    assert ok("CORP\\alic", "alicia", CORP)  # a cut may be several accounts: the caller counts
    assert not ok("CORP\\bob", "OTHERDOM\\bob", CORP)
    assert not ok("bob", "OTHERDOM\\bob", CORP)  # with a domain, a bare name is that domain's
    assert ok("bob", "OTHERDOM\\bob")  # without one, any domain's (one candidate joins)
    assert ok("alice", "CORP\\alic")
    assert ok("CORP\\alic", "alice")
    assert not ok("CORP\\bob", "OTHERDOM\\bob")
    assert not ok("bob", "bobby")


def test_the_fuller_name_labels_a_joined_session() -> None:
    assert fuller("bob", "CORP\\bob") == "CORP\\bob"
    assert fuller("CORP\\bob", "bob") == "CORP\\bob"
    assert fuller("CORP\\alic", "alice") == "CORP\\alice"  # the cut's domain, the report's user
    assert fuller("alice", "CORP\\alic") == "CORP\\alice"
    assert fuller("CORP\\alic", "CORP\\alice") == "CORP\\alice"
    assert fuller("alice@cor", "alice@corp.example.com", CORP) == "alice@corp.example.com"


def test_the_cut_of_a_long_domain_names_any_account_of_it() -> None:
    rules = Rules.of("AWAKECODING", [])
    cut = resolve("AWAKECODI", rules)
    assert (cut.key, cut.cut) == ("awakecoding\\", True)
    assert compatible(cut, resolve("bob", rules), rules)
    assert compatible(resolve("AWAKECODI"), resolve("AWAKECODING\\bob"))  # without a domain too
