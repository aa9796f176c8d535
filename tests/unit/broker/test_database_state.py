"""The database's state as the broker's calls find it: one log line per change, errors redacted."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from rdbroker_broker.database_state import DatabaseState, describe
from rdbroker_broker.errors import DatabaseUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


def _unreachable() -> DatabaseUnavailable:
    driver = OSError('connection to server at "db" failed: postgresql://u:S3cretPw@db/x\nHINT: more')
    error = DatabaseUnavailable("the database is unreachable")
    error.__cause__ = driver
    return error


def test_each_change_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rdbroker_broker.database_state")
    clock = Clock()
    state = DatabaseState(clock)
    started = clock.now
    state.succeeded()
    assert (state.up, state.since) == (True, started)
    clock.now += timedelta(seconds=3)
    for _ in range(5):
        state.failed(_unreachable())
    down_at = clock.now
    clock.now += timedelta(seconds=7)
    for _ in range(5):
        state.succeeded()
    assert [r.getMessage() for r in caplog.records] == [
        'the database does not answer: the database is unreachable: connection to server at "db" failed: '
        "postgresql://u:***@db/x",
        "the database answers again (down for 7.0 s)",
    ]
    snapshot = state.snapshot()
    assert (snapshot.up, snapshot.since, snapshot.last_error_at) == (True, clock.now, down_at)
    assert "S3cretPw" not in snapshot.last_error


def test_a_plain_message_is_described_as_is() -> None:
    assert describe("the database did not answer a ping within 5 s") == (
        "the database did not answer a ping within 5 s"
    )
    assert describe(DatabaseUnavailable("the database did not answer in time")) == (
        "the database did not answer in time"
    )
