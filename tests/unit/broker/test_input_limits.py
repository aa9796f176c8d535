"""The broker's input limits equal the sizes of the columns the values are stored in (no drift)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import String

from rdbroker_broker import domain as d
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.db.tables import connections, proxies, servers, sessions
from rdbroker_broker.service import common


def chars(column) -> int:
    assert isinstance(column.type, String)
    return column.type.length


def test_domain_limits_equal_their_columns():
    users = {chars(sessions.c.user), chars(sessions.c.user_key), chars(connections.c.user)}
    addresses = {chars(sessions.c.client_address), chars(connections.c.client_address)}
    addresses.add(chars(servers.c.address))
    ids = {chars(sessions.c.origin_connection_id), chars(proxies.c.proxy_id)}  # Route's ids
    assert users == {d.MAX_USER_CHARS}
    assert addresses == {d.MAX_ADDRESS_CHARS}
    assert ids == {d.MAX_CONNECTION_ID_CHARS}
    assert chars(sessions.c.pool) == d.MAX_POOL_CHARS


def test_report_limits_come_from_the_columns():
    assert common.CONNECTION_ID_CHARS == chars(connections.c.connection_id) == 128
    assert common.PROXY_ID_CHARS == chars(proxies.c.proxy_id) == 128


def test_max_cookie_chars_is_capped_at_the_user_column():
    assert BrokerSettings(max_cookie_chars=d.MAX_USER_CHARS).max_cookie_chars == 256
    with pytest.raises(ValidationError, match="max_cookie_chars"):
        BrokerSettings(max_cookie_chars=d.MAX_USER_CHARS + 1)


def test_the_failover_probe_timeout_is_bounded(monkeypatch: pytest.MonkeyPatch):
    assert BrokerSettings().failover_probe_timeout_ms == 1000
    monkeypatch.setenv("RDBROKER_FAILOVER_PROBE_TIMEOUT_MS", "250")
    assert BrokerSettings().failover_probe_timeout_ms == 250
    for bad in (0, 49, 10_001):
        with pytest.raises(ValidationError, match="failover_probe_timeout_ms"):
            BrokerSettings(failover_probe_timeout_ms=bad)
