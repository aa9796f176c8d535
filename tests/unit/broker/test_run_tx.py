"""`Core.run_tx`: which errors run a use case's transaction again, how often, and with no pause."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

import pytest
from sqlalchemy.exc import IntegrityError

from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.database_state import DatabaseState
from rdbroker_broker.errors import Conflict, DatabaseUnavailable, NotFound
from rdbroker_broker.service.core import MAX_TX_ATTEMPTS, Core
from rdbroker_broker.store import Repos, Retryable, Store

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


class FakeStore:
    """A transaction that runs the work and nothing else; counts the transactions begun."""

    def __init__(self) -> None:
        self.database = DatabaseState()
        self.begun = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Repos]:
        self.begun += 1
        yield cast(Repos, None)


class Script:
    """Work that raises the given errors in turn, then answers "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.runs = 0

    async def __call__(self, r: Repos) -> str:
        self.runs += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def core() -> tuple[Core, FakeStore]:
    store = FakeStore()
    return Core(cast(Store, store), BrokerSettings(), clock=lambda: NOW), store


def lost_race() -> Retryable:
    return Retryable("unique violation")


def dead_connection() -> Retryable:
    return Retryable("connection closed", connectivity=True)


def test_five_attempts_is_the_documented_count():
    assert MAX_TX_ATTEMPTS == 5


async def test_a_lost_race_runs_again_and_answers():
    service, store = core()
    work = Script(lost_race(), lost_race())
    assert await service.run_tx(work) == "done"
    assert (work.runs, store.begun) == (3, 3)
    assert service.heard_since == NOW


async def test_races_lost_every_time_give_up_after_five_runs_with_conflict():
    service, store = core()
    work = Script(*(lost_race() for _ in range(10)))
    with pytest.raises(Conflict, match="too many concurrent changes"):
        await service.run_tx(work)
    assert work.runs == store.begun == MAX_TX_ATTEMPTS
    assert service.heard_since is None


async def test_the_last_allowed_run_may_still_succeed():
    service, _ = core()
    work = Script(*(lost_race() for _ in range(MAX_TX_ATTEMPTS - 1)))
    assert await service.run_tx(work) == "done"
    assert work.runs == MAX_TX_ATTEMPTS


@pytest.mark.parametrize(
    "error",
    [
        NotFound("no such session"),
        ValueError("a bug"),
        IntegrityError("INSERT", {}, Exception("unmapped")),
        RuntimeError("a bug"),
    ],
)
async def test_other_errors_are_not_retried(error: BaseException):
    service, _ = core()
    work = Script(error, lost_race())
    with pytest.raises(type(error)) as raised:
        await service.run_tx(work)
    assert raised.value is error
    assert work.runs == 1


async def test_a_dead_connection_is_tried_once_more():
    service, store = core()
    work = Script(dead_connection())
    assert await service.run_tx(work) == "done"
    assert work.runs == 2
    assert store.database.up


async def test_a_dead_connection_found_again_is_the_database_unavailable():
    service, store = core()
    service.heard_since = NOW
    work = Script(dead_connection(), dead_connection(), lost_race())
    with pytest.raises(DatabaseUnavailable) as raised:
        await service.run_tx(work)
    assert isinstance(raised.value.__cause__, Retryable)
    assert work.runs == 2
    assert service.heard_since is None
    assert not store.database.up


async def test_a_dead_connection_after_a_lost_race_is_the_database_unavailable():
    service, _ = core()
    work = Script(lost_race(), dead_connection())
    with pytest.raises(DatabaseUnavailable):
        await service.run_tx(work)
    assert work.runs == 2


async def test_database_unavailable_is_not_retried_and_ends_the_heard_span():
    service, _ = core()
    service.heard_since = NOW
    work = Script(DatabaseUnavailable("down"))
    with pytest.raises(DatabaseUnavailable):
        await service.run_tx(work)
    assert work.runs == 1
    assert service.heard_since is None


async def test_runs_follow_each_other_without_yielding_to_the_loop():
    service, _ = core()
    others_ran: list[Any] = []
    asyncio.get_running_loop().call_soon(others_ran.append, True)
    with pytest.raises(Conflict):
        await service.run_tx(Script(*(lost_race() for _ in range(MAX_TX_ATTEMPTS))))
    assert others_ran == []
