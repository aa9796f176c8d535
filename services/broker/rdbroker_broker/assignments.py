"""Assignment rules: the pool of a connection that names none (docs/broker.md, "Assignments").

The farm file's ordered `assignments:` list. A rule matches on the account (a glob on the account
key, `CORP\\fin-*`) and/or the client's network (`10.20.0.0/16`); with both, both must match. The
first rule that matches picks the pool; when none does, the default pool. A connection whose client
named a pool (a `tsv://` collection) goes there and no rule is read. Nothing here reads the
database: `Cache` is given the function that does.

The account key a glob is matched against is the one the rule's pool stores the user's sessions
under (`accounts.key_of` with that pool's `domain` and `upn_suffixes`), so `fin-alice`,
`CORP\\fin-alice` and `fin-alice@corp.example.com` all match `CORP\\fin-*` in a pool with domain
CORP. Keys are case-insensitive, and so are globs. mstsc's 9-character cut matches as far as it
goes: `CORP\\fin-` matches `CORP\\fin-*`, `CORP\\fina` does not.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from rdbroker_broker import accounts
from rdbroker_broker import domain as d

MAX_RULES = 1000
USER_GLOB_CHARS = 256  # assignments.user_glob
NETWORK_CHARS = 64  # assignments.network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RuleError(ValueError):
    """A rule is malformed; the message says what is expected."""


@dataclass(frozen=True)
class Rule:
    """One assignment rule as the farm file gives it ("" matches anything)."""

    pool: str
    user: str = ""  # a glob on the account key: `*` any characters, `?` one
    network: str = ""  # a network in CIDR notation, as `ipaddress` writes it

    def describe(self) -> str:
        """`user CORP\\fin-* and network 10.20.0.0/16`: what the rule matches."""
        parts = [f"user {self.user}" if self.user else "", f"network {self.network}" if self.network else ""]
        return " and ".join(p for p in parts if p)


def check_user_glob(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RuleError("expected an account glob like 'CORP\\fin-*'")
    glob = value.strip()
    if len(glob) > USER_GLOB_CHARS:
        raise RuleError(f"at most {USER_GLOB_CHARS} characters")
    if any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in glob):
        raise RuleError("contains control characters")
    return glob


def check_network(value: object) -> str:
    """A network in CIDR notation (`10.20.0.0/16`, `2001:db8::/32`; an address alone is its /32 or
    /128), in `ipaddress`'s spelling. Host bits set are refused: `10.20.1.0/16` is a typo for
    something, and which network was meant cannot be told."""
    if not isinstance(value, str) or not value.strip():
        raise RuleError("expected a network like 10.20.0.0/16")
    text = value.strip()
    try:
        network = ipaddress.ip_network(text)
    except ValueError:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise RuleError(
                f"{text!r} is not a network in CIDR notation (like 10.20.0.0/16 or 2001:db8::/32)"
            ) from None
        raise RuleError(f"{text} has host bits set: the network is {loose}") from None
    return str(network)


def compile_glob(glob: str) -> re.Pattern[str]:
    """`*` any characters (a backslash included), `?` one character, everything else literally;
    case-insensitive as account keys are (both casefolded)."""
    parts = [".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in glob.casefold()]
    return re.compile("".join(parts), re.DOTALL)


def client_ip(address: str) -> IpAddress | None:
    """The client's IP address from a Route's `client_address`: `10.0.0.7:50123`, `[2001:db8::7]:50123`,
    the proxy's unbracketed `2001:db8::7:50123` (a trailing port), or an address alone. An IPv4
    address mapped into IPv6 (a dual-stack listener) is its IPv4 address. None when there is none."""
    text = address.strip()
    if not text:
        return None
    if text.startswith("["):
        candidates = [text[1:].split("]", 1)[0]]
    elif ":" in text:
        # `host:port` (IPv4, or IPv6 without brackets: the proxy writes peer[0]:peer[1]), else bare.
        candidates = [text.rsplit(":", 1)[0], text]
    else:
        candidates = [text]
    for candidate in candidates:
        try:
            ip = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ip
    return None


@dataclass(frozen=True)
class Match:
    """What the rules made of a connection: the rule that matched (1-based position; 0 for none) and
    the pool it picked ("" for the default pool)."""

    position: int = 0
    rule: Rule | None = None
    key: str = ""  # the account key the rule's glob was matched against

    @property
    def pool(self) -> str:
        return self.rule.pool if self.rule is not None else ""


@dataclass(frozen=True)
class _Compiled:
    rule: Rule
    user: re.Pattern[str] | None
    network: IpNetwork | None


@dataclass(frozen=True)
class RuleSet:
    """The rules in order, compiled, with the account settings of the pools they name."""

    rules: tuple[Rule, ...] = ()
    pool_rules: dict[str, accounts.Rules] = field(default_factory=dict)
    _compiled: tuple[_Compiled, ...] = ()

    @classmethod
    def of(cls, rules: Sequence[Rule], pools: Iterable[d.Pool]) -> RuleSet:
        compiled = tuple(
            _Compiled(
                rule,
                compile_glob(rule.user) if rule.user else None,
                ipaddress.ip_network(rule.network) if rule.network else None,
            )
            for rule in rules
        )
        by_name = {p.name: accounts.Rules.of(p.domain, p.upn_suffixes) for p in pools}
        return cls(tuple(rules), by_name, compiled)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def match(self, user: str, client: IpAddress | None) -> Match:
        """The first rule matching the user (its account key in the rule's pool) and the client's
        address; a rule on the account never matches a connection without a user name, nor a rule on
        the network one without a client address."""
        keys: dict[str, str] = {}
        for position, each in enumerate(self._compiled, start=1):
            key = ""
            if each.user is not None:
                if not user:
                    continue
                key = keys.get(each.rule.pool, "")
                if not key:
                    rules = self.pool_rules.get(each.rule.pool, accounts.NO_RULES)
                    key = keys[each.rule.pool] = accounts.key_of(user, rules)
                if not each.user.fullmatch(key):
                    continue
            if each.network is not None and (client is None or client not in each.network):
                continue
            return Match(position, each.rule, key)
        return Match()


EMPTY = RuleSet()


class Cache:
    """The rules as a broker last read them from the database, read again by the first call that finds
    them older than `refresh_s` (0: by every call). Every replica reads the same table, so each picks
    the same pool once it has read the rules an `apply` wrote; until then, for about `refresh_s`, the
    ones before. While one call reads them the others go on with the last ones (they do not queue
    behind a read that waits for a database connection); only before the first read do they wait."""

    def __init__(self, load: Callable[[], Awaitable[RuleSet]], refresh_s: float) -> None:
        self._load = load
        self._refresh_s = refresh_s
        self._rules = EMPTY
        self._read_at: float | None = None
        self._reading: asyncio.Future[RuleSet | None] | None = None

    def _fresh(self) -> bool:
        return self._read_at is not None and time.monotonic() - self._read_at < self._refresh_s

    async def rules(self) -> RuleSet:
        if self._fresh():
            return self._rules
        if self._reading is not None:
            if self._read_at is not None:
                return self._rules  # another call is reading them: the last ones meanwhile
            first = await asyncio.shield(self._reading)
            return first if first is not None else await self.rules()  # that read failed: try again
        reading = self._reading = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        rules = None
        try:
            rules = await self._load()
            self._rules, self._read_at = rules, started
        finally:
            self._reading = None
            reading.set_result(rules)  # None: failed (or cancelled), whoever waits reads for themselves
        return rules

    async def pool_for(self, user: str, client_address: str) -> str:
        """The pool the rules pick for a connection that names none ("" for the default pool)."""
        rules = await self.rules()
        if not rules:
            return ""
        return rules.match(user, client_ip(client_address)).pool
