"""A pool's `probe:` settings in the farm file: parsed, bounded, optional key by key."""

from __future__ import annotations

import pytest

from rdbroker_broker.farm import FarmError, load_farm, parse_probe_ms

FARM = """
pools:
  - name: fast
    default: true
    probe: {{{probe}}}
  - name: plain
servers:
  - address: 10.0.0.1
    pool: fast
"""


def test_probe_settings_are_read_per_pool() -> None:
    farm = load_farm(FARM.format(probe="interval: 500ms, timeout: 2s, rise: 1, fall: 5"))
    fast, plain = farm.pools
    assert (fast.probe_interval_ms, fast.probe_timeout_ms, fast.probe_rise, fast.probe_fall) == (
        500,
        2000,
        1,
        5,
    )
    # a pool without `probe:` keeps 0s: the broker's RDBROKER_PROBE_* values apply
    assert (plain.probe_interval_ms, plain.probe_timeout_ms, plain.probe_rise, plain.probe_fall) == (
        0,
        0,
        0,
        0,
    )


def test_unset_keys_stay_zero() -> None:
    [fast, _] = load_farm(FARM.format(probe="fall: 2")).pools
    assert (fast.probe_interval_ms, fast.probe_timeout_ms, fast.probe_rise, fast.probe_fall) == (0, 0, 0, 2)


def test_a_single_pool_made_default_keeps_its_probe_settings() -> None:
    farm = load_farm("pools:\n  - name: only\n    probe: {interval: 3s}\n")
    assert farm.pools[0].is_default
    assert farm.pools[0].probe_interval_ms == 3000


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ("interval: 50ms", "pools[0].probe.interval: expected a duration from 100ms to 3600s"),
        ("timeout: 2h", "pools[0].probe.timeout: expected a duration from 100ms"),
        ("interval: soon", "pools[0].probe.interval: expected a duration"),
        ("rise: 0", "pools[0].probe.rise: expected an integer from 1 to 100"),
        ("fall: 101", "pools[0].probe.fall: expected an integer from 1 to 100"),
        ("fall: true", "pools[0].probe.fall: expected an integer"),
        ("jitter: 1s", "pools[0].probe.jitter: unknown field"),
    ],
)
def test_bad_probe_settings_name_the_line_and_field(probe: str, expected: str) -> None:
    with pytest.raises(FarmError) as caught:
        load_farm(FARM.format(probe=probe))
    assert "farm.yaml:5: " + expected in str(caught.value)


def test_probe_must_be_a_mapping() -> None:
    with pytest.raises(FarmError, match=r"pools\[0\]\.probe: expected a mapping"):
        load_farm("pools:\n  - name: only\n    probe: 2s\n")


@pytest.mark.parametrize(
    ("value", "ms"), [("500ms", 500), ("2s", 2000), ("1m", 60_000), (2, 2000), (1.5, 1500), ("x", None)]
)
def test_probe_durations(value: object, ms: int | None) -> None:
    assert parse_probe_ms(value) == ms


def test_stale_after_and_logon_lag_are_read_per_pool() -> None:
    text = FARM.format(probe="interval: 500ms, stale_after: 5s").replace(
        "    default: true\n", "    default: true\n    logon_lag: 45s\n"
    )
    fast, plain = load_farm(text).pools
    assert (fast.stale_after_ms, fast.logon_lag_s) == (5000, 45.0)
    # unset: three probe intervals plus the probe lease, and a 30 s logon lag
    assert (plain.stale_after_ms, plain.logon_lag_s) == (0, 30.0)
    [only] = load_farm("pools:\n  - name: only\n    logon_lag: 0\n").pools
    assert only.logon_lag_s == 0.0  # agents whose figures show a logon at once


@pytest.mark.parametrize(
    ("probe", "expected"),
    [
        ("stale_after: 50ms", "pools[0].probe.stale_after: expected a duration from 100ms to 3600s"),
        ("interval: 2s, stale_after: 2s", "pools[0].probe.stale_after: expected longer than probe.interval"),
    ],
)
def test_bad_stale_after_names_the_line_and_field(probe: str, expected: str) -> None:
    with pytest.raises(FarmError) as caught:
        load_farm(FARM.format(probe=probe))
    assert "farm.yaml:5: " + expected in str(caught.value)


@pytest.mark.parametrize("lag", ["2h", "soon", "-5", "true"])
def test_a_bad_logon_lag_names_the_line_and_field(lag: str) -> None:
    with pytest.raises(
        FarmError, match=r"farm.yaml:3: pools\[0\]\.logon_lag: expected a duration from 0s to 3600s"
    ):
        load_farm(f"pools:\n  - name: only\n    logon_lag: {lag}\n")
