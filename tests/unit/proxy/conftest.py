"""The proxy runs on uvloop in production and on asyncio's own loop where uvloop is missing: the
tests that exercise the data path run on both."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

BOTH_LOOPS = {"test_proxy", "test_bulk", "test_hygiene", "test_failover"}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    module = getattr(item, "module", None)
    if module is None or module.__name__.rpartition(".")[2] not in BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
