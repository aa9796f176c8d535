"""Account forms: which names are one account (docs/accounts.md has the table of cases).

A user reaches the broker under several spellings of one Windows account: `CORP\\bob` (mstsc),
`bob` (FreeRDP without a domain, typed by hand, Windows' quser, xrdp), `bob@corp.example.com` (a UPN),
in any case, padded with spaces, and cut to 9 characters by mstsc (`CORP\\alic`, `alice@cor`,
`bob@corp.`). With its pool's `domain` and `upn_suffixes`, every complete form resolves to one
canonical key, `corp\\bob`; a cut resolves to the prefix of the keys it may stand for. Without a pool
domain a key is the casefolded name, and a bare name and a qualified one are compared by their user
part (`account_name`). Pure functions: nothing here reads the database.

The ambiguity rule: a name joins a live session only when every live session it is compatible with
(`compatible`) is that one session. A 9-character name is taken as a possible cut (a 9-character
complete name cannot be told from one). Several candidates join none, and are counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# mstsc cuts the mstshash user name to this many characters (domain.TRUNCATED_COOKIE_CHARS).
CUT_CHARS = 9


@dataclass(frozen=True, slots=True)
class Rules:
    """A pool's account settings: the NetBIOS domain of bare names and the UPN suffixes meaning it."""

    domain: str = ""
    upn_suffixes: tuple[str, ...] = ()

    @classmethod
    def of(cls, domain: str, upn_suffixes: Iterable[str]) -> Rules:
        return cls(domain.strip().casefold(), tuple(s.strip().casefold() for s in upn_suffixes if s.strip()))


NO_RULES = Rules()


@dataclass(frozen=True, slots=True)
class Account:
    """What a name says of its account, in a pool's rules."""

    key: str  # the canonical key, or the prefix of the keys it may stand for when `cut`
    name: str  # the user part (sessions.account_name), or its prefix when `name_cut`
    cut: bool = False  # the key is only a prefix (mstsc cut the name)
    name_cut: bool = False  # the user part is only a prefix
    qualified: bool = False  # the name carries a domain or UPN suffix (without a pool domain)

    @property
    def complete(self) -> bool:
        return not self.cut


def looks_cut(name: str) -> bool:
    return len(name.strip()) == CUT_CHARS


def resolve(name: str, rules: Rules = NO_RULES) -> Account:
    """The account `name` names under `rules` (see the module docstring and docs/accounts.md)."""
    text = name.strip()
    folded = text.casefold()
    cut = len(text) == CUT_CHARS
    domain = rules.domain
    prefix, sep, user = folded.rpartition("\\")
    if sep and prefix:
        if domain:
            return Account(f"{prefix}\\{user}", user, cut, cut, True)
        return Account(folded, user, cut, cut, True)
    folded = user  # `\\bob` is bare
    local, at, suffix = folded.rpartition("@")
    if at and local:
        if domain and (suffix in rules.upn_suffixes or (cut and _starts_a_suffix(suffix, rules))):
            # A cut suffix that starts a configured one leaves the user part whole: exact.
            return Account(f"{domain}\\{local}", local, False, False, True)
        # Another realm's UPN: its own account; only its suffix may be cut.
        return Account(folded, local, cut, False, True)
    if domain:
        if cut and f"{domain}\\".startswith(folded):
            # mstsc's cut of `DOMAIN\\user` inside a domain of 9 characters or more: any account.
            return Account(f"{domain}\\", "", True, True, True)
        # A cut bare name may be mstsc's cut of a longer bare name or of a UPN: a prefix.
        return Account(f"{domain}\\{folded}", folded, cut, cut, True)
    return Account(folded, folded, cut, cut, False)


def _starts_a_suffix(part: str, rules: Rules) -> bool:
    return any(s.startswith(part) for s in rules.upn_suffixes)


def key_of(name: str, rules: Rules = NO_RULES) -> str:
    return resolve(name, rules).key


def compatible(a: Account, b: Account, rules: Rules = NO_RULES) -> bool:
    """Whether two names may be one account: equal keys, a cut's key starting the other's, or
    (without a pool domain) a bare name and a qualified one with the same user part (or a cut's
    user part starting the other's)."""
    if a.key == b.key:
        return True
    if a.cut and b.key.startswith(a.key):
        return True
    if b.cut and a.key.startswith(b.key):
        return True
    if rules.domain or a.qualified == b.qualified:
        return False
    return (
        a.name == b.name
        or (a.name_cut and b.name.startswith(a.name))
        or (b.name_cut and a.name.startswith(b.name))
    )


def same_account(a: Account, b: Account, rules: Rules = NO_RULES) -> bool:
    """Compatible without a cut on either side: surely one account."""
    return not a.cut and not b.cut and compatible(a, b, rules)


def fuller(current: str, other: str, rules: Rules = NO_RULES) -> str:
    """Of two compatible names, the most complete one (what a joined session is labelled): a
    complete name over a cut, a qualified one over a bare one, then the longer. A bare name that
    completes a qualified cut (`CORP\\alic` and `alice`) takes its domain: `CORP\\alice`."""
    current, other = current.strip(), other.strip()
    a, b = resolve(current, rules), resolve(other, rules)
    if a.cut != b.cut:
        whole, part = (other, current) if a.cut else (current, other)
        domain, sep, _ = part.rpartition("\\")
        if sep and domain and "\\" not in whole and "@" not in whole:
            return f"{domain}\\{whole}"
        return whole
    return (
        other if (b.qualified, len(b.key), len(other)) > (a.qualified, len(a.key), len(current)) else current
    )


@dataclass(frozen=True, slots=True)
class Probes:
    """Where live sessions another form of an account may be stored under are found: ranges of keys
    (sessions.user_key) and of user parts (sessions.account_name), each [from, to) in code-point
    order, as the byte-order indexes serve them. Empty when only the own key can match."""

    key_ranges: tuple[tuple[str, str], ...] = ()
    name_ranges: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.key_ranges or self.name_ranges)


def probes(account: Account, rules: Rules = NO_RULES) -> Probes | None:
    """The ranges to search besides the own key (`compatible` then decides over what they find);
    None when a range cannot be written (a key ending in the last code point)."""
    keys: list[tuple[str, str]] = []
    names: list[tuple[str, str]] = []
    if account.cut:
        end = prefix_end(account.key)
        if end is None:
            return None
        keys.append((account.key, end))
    else:
        # Sessions stored under mstsc's cut of one of this account's spellings.
        for cut_key in sorted(_cut_keys(account, rules)):
            keys.append(_exact(cut_key))
    if not rules.domain and account.name:
        if account.name_cut:
            end = prefix_end(account.name)
            if end is None:
                return None
            span = (account.name, end)
        else:
            span = _exact(account.name)
        if account.qualified:
            keys.append(span)  # a bare name's key is its user part
        else:
            names.append(span)  # a qualified name's user part
            if not account.name_cut:
                # mstsc's cut of `DOMAIN\\user` (of a domain of one character or more) keeps a
                # prefix of the user part: each possible one, exactly.
                top = min(len(account.name) - 1, CUT_CHARS - 2)
                names += [_exact(account.name[:n]) for n in range(1, top + 1)]
    return Probes(tuple(dict.fromkeys(keys)), tuple(dict.fromkeys(names)))


def _exact(key: str) -> tuple[str, str]:
    return key, key + "\x01"  # the key alone: no key holds a control character


def _cut_keys(account: Account, rules: Rules) -> set[str]:
    """The keys mstsc's cuts of this account's spellings resolve to, where they are cuts."""
    forms: list[str] = []
    if rules.domain:
        forms += [f"{rules.domain}\\{account.name}", account.name]
        forms += [f"{account.name}@{s}" for s in rules.upn_suffixes]
    else:
        forms += [account.key, account.name]
    keys = set()
    for form in forms:
        if len(form) > CUT_CHARS:
            cut = resolve(form[:CUT_CHARS], rules)
            if cut.cut and cut.key != account.key:
                keys.add(cut.key)
    return keys


def prefix_end(key: str) -> str | None:
    """The least string above every string starting with `key`, in code-point order; None when
    there is none to write (the key ends in the last code point)."""
    if not key:
        return None
    last = ord(key[-1]) + 1
    if last > 0x10FFFF:
        return None
    if 0xD800 <= last <= 0xDFFF:  # surrogates are not characters: the next one is U+E000
        last = 0xE000
    return key[:-1] + chr(last)
