"""A pool's account, claim and result-age settings in the farm file: read, bounded, each error on its line."""

from __future__ import annotations

import pytest

from rdbroker_broker import domain as d
from rdbroker_broker import pool_settings as ps
from rdbroker_broker.farm import FarmError, load_farm, pool_changes

FULL = """\
pools:
  - name: default
    default: true
    domain: CORP
    upn_suffixes: [Corp.Example.COM, "@corp.example.org."]
    junk_bytes: 2KiB
    confirm_timeout: 2m
    stale_after: 30s
    logon_lag: 45s
    honor_routing_tokens: false
    probe: {interval: 2s, sessions_interval: 5s}
  - name: plain
"""


def test_every_setting_is_read_into_the_pool() -> None:
    full, _ = load_farm(FULL).pools
    assert (full.domain, full.upn_suffixes) == ("CORP", ("corp.example.com", "corp.example.org"))
    assert (full.junk_bytes, full.confirm_timeout_s, full.stale_after_ms, full.logon_lag_s) == (
        2048,
        120.0,
        30_000,
        45.0,
    )
    assert (full.probe_interval_ms, full.sessions_interval_ms) == (2000, 5000)
    assert full.honor_routing_tokens is False


def test_a_pool_without_them_gets_the_defaults() -> None:
    _, plain = load_farm(FULL).pools
    defaults = d.Pool("plain")
    assert (plain.domain, plain.upn_suffixes, plain.junk_bytes, plain.confirm_timeout_s) == (
        "",
        (),
        2048,
        120.0,
    )
    assert (plain.stale_after_ms, plain.logon_lag_s, plain.sessions_interval_ms) == (0, 30.0, 0)
    assert plain.honor_routing_tokens is True
    assert plain == defaults


@pytest.mark.parametrize(
    ("setting", "pool_field", "value"),
    [
        ("junk_bytes: 4096", "junk_bytes", 4096),
        ("junk_bytes: 0", "junk_bytes", 0),  # no connection counts as junk
        ("junk_bytes: 1MiB", "junk_bytes", 1024 * 1024),
        ("junk_bytes: 512 B", "junk_bytes", 512),
        ("confirm_timeout: 90", "confirm_timeout_s", 90.0),
        ("confirm_timeout: 1500ms", "confirm_timeout_s", 1.5),
        ("stale_after: 1m30s", "stale_after_ms", 90_000),
        ("logon_lag: 0s", "logon_lag_s", 0.0),
        ("domain: corp-eu.x_1", "domain", "corp-eu.x_1"),
        ("domain: ABCDEFGHIJKLMNO", "domain", "ABCDEFGHIJKLMNO"),  # 15, the NetBIOS maximum
        ("honor_routing_tokens: true", "honor_routing_tokens", True),
        ("honor_routing_tokens: false", "honor_routing_tokens", False),
        ("honor_routing_tokens: no", "honor_routing_tokens", False),  # YAML 1.1's boolean
    ],
)
def test_values_and_their_spellings(setting: str, pool_field: str, value: object) -> None:
    [pool] = load_farm(f"pools:\n  - name: p\n    {setting}\n").pools
    assert getattr(pool, pool_field) == value


BAD = """\
pools:
  - name: p
    domain: CORP
    {setting}
"""


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("junk_bytes: -1", "pools[0].junk_bytes: expected a number of bytes or a size like 2KiB"),
        ("junk_bytes: 2KB", "pools[0].junk_bytes: expected a number of bytes or a size like 2KiB"),
        ("junk_bytes: 2MiB", "pools[0].junk_bytes: expected 0 bytes to 1MiB"),
        ("junk_bytes: true", "pools[0].junk_bytes: expected a number of bytes"),
        ("confirm_timeout: 0s", "pools[0].confirm_timeout: expected 1s to 1d"),
        ("confirm_timeout: 2d", "pools[0].confirm_timeout: expected 1s to 1d"),
        ("confirm_timeout: soon", "pools[0].confirm_timeout: expected a duration like 30s or 2m"),
        ("stale_after: 500ms", "pools[0].stale_after: expected 1s to 1d, or 0 for three probe intervals"),
        ("logon_lag: 2h", "pools[0].logon_lag: expected 0s to 1h"),
        ("logon_lag: -5", "pools[0].logon_lag: expected a duration"),
        ("upn_suffixes: corp.example.com", "pools[0].upn_suffixes: expected a list of DNS names"),
        ("upn_suffixes: [corp..com]", "pools[0].upn_suffixes: 'corp..com' is not a DNS name"),
        ("upn_suffixes: [-corp.com]", "pools[0].upn_suffixes: '-corp.com' is not a DNS name"),
        ("upn_suffixes: [a.com, A.com]", "pools[0].upn_suffixes: a.com is listed twice"),
        ("upn_suffixes: [12]", "pools[0].upn_suffixes: expected a DNS name"),
        ("honor_routing_tokens: maybe", "pools[0].honor_routing_tokens: expected true or false"),
        ('honor_routing_tokens: "false"', "pools[0].honor_routing_tokens: expected true or false"),
        ("honor_routing_tokens: 0", "pools[0].honor_routing_tokens: expected true or false"),
        ("honour_routing_tokens: false", "pools[0].honour_routing_tokens: unknown field"),
        (
            "probe: {sessions_interval: 50ms}",
            "pools[0].probe.sessions_interval: expected a duration from 100ms",
        ),
        ("probe: {interval: 5s}\n    stale_after: 5s", "pools[0].stale_after: must be longer than the probe"),
    ],
)
def test_bad_values_name_the_line_and_field(setting: str, expected: str) -> None:
    with pytest.raises(FarmError) as caught:
        load_farm(BAD.format(setting=setting))
    line = 5 if setting.startswith("probe:") and "stale_after" in setting else 4
    assert f"farm.yaml:{line}: {expected}" in str(caught.value)


@pytest.mark.parametrize(
    ("domain", "why"),
    [
        ("ABCDEFGHIJKLMNOP", "at most 15 characters"),  # 16
        ('"CORP\\\\x"', "letters, digits"),
        ("corp@x", "letters, digits"),
        (".corp", "(not first)"),
        ('""', "leave the key out for none"),
        ("[CORP]", "expected a NetBIOS domain name like CORP"),
    ],
)
def test_bad_domains(domain: str, why: str) -> None:
    with pytest.raises(FarmError) as caught:
        load_farm(f"pools:\n  - name: p\n    domain: {domain}\n")
    assert "farm.yaml:3: pools[0].domain: " in str(caught.value)
    assert why in str(caught.value)


def test_upn_suffixes_without_a_domain_is_an_error_on_their_line() -> None:
    with pytest.raises(FarmError) as caught:
        load_farm("pools:\n  - name: p\n    junk_bytes: 100\n    upn_suffixes: [corp.example.com]\n")
    assert str(caught.value) == (
        "farm.yaml:4: pools[0].upn_suffixes: UPN suffixes need the pool's `domain` (the domain they mean)"
    )


def test_every_problem_of_a_pool_is_reported_at_once() -> None:
    with pytest.raises(FarmError) as caught:
        load_farm("pools:\n  - name: p\n    junk_bytes: x\n    logon_lag: x\n    confirm_timeout: x\n")
    assert sorted(line.split(":")[1] for line in str(caught.value).splitlines()) == ["3", "4", "5"]


def test_the_plan_line_names_what_changed() -> None:
    old = d.Pool("default", True)
    new = d.Pool(
        "default",
        True,
        domain="CORP",
        upn_suffixes=("corp.example.com",),
        junk_bytes=4096,
        stale_after_ms=30_000,
        sessions_interval_ms=5000,
        logon_lag_s=0.0,
        honor_routing_tokens=False,
    )
    assert pool_changes(old, new) == (
        "probe.sessions_interval default -> 5s, domain none -> CORP, upn_suffixes [] -> [corp.example.com], "
        "junk_bytes 2KiB -> 4KiB, stale_after default -> 30s, logon_lag 30s -> 0s, "
        "honor_routing_tokens true -> false"
    )
    assert pool_changes(new, new) == ""


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("500ms", 500),
        ("2s", 2000),
        ("1m30s", 90_000),
        ("1h", 3_600_000),
        (0, 0),
        (1.5, 1500),
        ("2s500ms", 2500),
    ],
)
def test_durations(value: object, ms: int) -> None:
    assert ps.parse_duration_ms(value) == ms


@pytest.mark.parametrize("value", ["", "x", "1.5s", "-1s", -1, True, None, float("nan"), "2 m"])
def test_not_durations(value: object) -> None:
    assert ps.parse_duration_ms(value) is None


@pytest.mark.parametrize(("ms", "text"), [(500, "500ms"), (0, "0s"), (90_000, "1m30s"), (86_400_000, "1d")])
def test_durations_are_shown_short(ms: int, text: str) -> None:
    assert ps.format_ms(ms) == text


def test_a_bad_domain_is_one_problem_not_two() -> None:
    with pytest.raises(FarmError) as caught:
        load_farm("pools:\n  - name: p\n    domain: 'C@RP'\n    upn_suffixes: [corp.example.com]\n")
    assert str(caught.value).splitlines() == [
        "farm.yaml:3: pools[0].domain: expected a NetBIOS domain name: letters, digits, '-', '_', '.' "
        "(not first), at most 15 characters (a NetBIOS name's length)"
    ]


def test_stale_after_must_outlast_the_brokers_probe_interval_when_the_pool_sets_none() -> None:
    text = "pools:\n  - name: p\n    stale_after: 2s\n"
    assert load_farm(text).pools[0].stale_after_ms == 2000  # the broker's interval unknown: no rule
    expected = r"farm.yaml:3: pools\[0\]\.stale_after: must be longer than the probe interval \(2s\)"
    with pytest.raises(FarmError, match=expected):
        load_farm(text, default_probe_interval_ms=2000)
    assert load_farm(text, default_probe_interval_ms=1000).pools[0].stale_after_ms == 2000
