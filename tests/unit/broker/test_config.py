"""Settings: flags win over RDBROKER_* environment variables, which win over defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rdbroker_broker.__main__ import broker_settings
from rdbroker_broker.config import DEFAULT_DATABASE_URL


def test_defaults(monkeypatch):
    for name in ("RDBROKER_DATABASE_URL", "RDBROKER_GRPC_LISTEN", "RDBROKER_HTTP_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    settings = broker_settings([])
    assert settings.database_url_text == DEFAULT_DATABASE_URL
    assert (settings.grpc_listen, settings.http_listen) == ("127.0.0.1:50051", "127.0.0.1:8080")
    assert settings.proxy_silence_s == 15.0
    assert not settings.migrate


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("RDBROKER_DATABASE_URL", "postgresql://env/db")
    monkeypatch.setenv("RDBROKER_GRPC_LISTEN", "127.0.0.1:1111")
    monkeypatch.setenv("RDBROKER_HEARTBEAT_INTERVAL_S", "2")
    settings = broker_settings(["--grpc-listen", "127.0.0.1:2222", "--migrate"])
    assert settings.database_url_text == "postgresql://env/db"
    assert settings.grpc_listen == "127.0.0.1:2222"
    assert settings.heartbeat_interval_s == 2.0
    assert settings.migrate


@pytest.mark.parametrize(
    "argv", [["--grpc-listen", "nohost"], ["--http-listen", "h:99999"], ["--pending-timeout-s", "-1"]]
)
def test_bad_values_are_refused(argv):
    with pytest.raises(ValidationError):
        broker_settings(argv)


def test_the_database_password_is_not_shown(monkeypatch):
    settings = broker_settings(["--database-url", "postgresql://u:hunter2@h/db"])
    assert "hunter2" not in repr(settings)
