"""Rise/fall: consecutive outcomes move a server between UP and DOWN, starting from the broker's state."""

from __future__ import annotations

import pytest

from rdbroker_health.hysteresis import Health, Hysteresis, Transition


def run(h: Hysteresis, outcomes: str) -> list[Health]:
    """Feed 'o'k / 'x' failed outcomes; answers the state after each."""
    states = []
    for c in outcomes:
        h.observe(c == "o")
        states.append(h.state)
    return states


def test_up_goes_down_after_fall_failures_in_a_row() -> None:
    h = Hysteresis(Health.UP, rise=2, fall=3)
    assert run(h, "xx") == [Health.UP, Health.UP]
    assert h.observe(False) == Transition(Health.UP, Health.DOWN)


def test_a_success_resets_the_failure_count() -> None:
    h = Hysteresis(Health.UP, rise=2, fall=3)
    assert run(h, "xxoxxoxx")[-1] is Health.UP
    assert run(h, "x")[-1] is Health.DOWN


def test_down_comes_up_after_rise_successes_in_a_row() -> None:
    h = Hysteresis(Health.DOWN, rise=2, fall=3)
    assert run(h, "oxo") == [Health.DOWN, Health.DOWN, Health.DOWN]
    assert h.observe(True) == Transition(Health.DOWN, Health.UP)


def test_unknown_needs_fall_failures_to_go_down_and_one_success_to_be_up() -> None:
    h = Hysteresis(Health.UNKNOWN, rise=2, fall=3)
    assert run(h, "xx") == [Health.UNKNOWN, Health.UNKNOWN]
    assert h.observe(False) == Transition(Health.UNKNOWN, Health.DOWN)
    h = Hysteresis(Health.UNKNOWN, rise=2, fall=3)
    assert h.observe(True) == Transition(Health.UNKNOWN, Health.UP)


def test_no_transition_while_steady() -> None:
    h = Hysteresis(Health.UP, rise=1, fall=1)
    assert h.observe(True) is None
    assert h.observe(False) == Transition(Health.UP, Health.DOWN)
    assert h.observe(False) is None
    assert h.observe(True) == Transition(Health.DOWN, Health.UP)


def test_rise_and_fall_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Hysteresis(Health.UP, rise=0, fall=3)
