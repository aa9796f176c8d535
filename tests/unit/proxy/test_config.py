"""Settings: flags, RDBROKER_* environment variables and defaults, validated."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rdbroker_proxy.config import ProxySettings, parse_args
from rdbroker_rdp import MAX_FIRST_PACKET


def test_defaults_follow_the_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RDBROKER_LISTEN", "RDBROKER_BROKER", "RDBROKER_POOL", "RDBROKER_GRPC_LISTEN"):
        monkeypatch.delenv(var, raising=False)
    s = parse_args([])
    assert s.listen == "0.0.0.0:3389"
    assert s.broker_addresses == ["127.0.0.1:50051"]
    assert s.pool == ""
    assert s.grpc_listen == "127.0.0.1:50053"
    assert s.first_packet_timeout_s == 5.0
    assert s.max_first_packet == MAX_FIRST_PACKET
    assert s.idle_timeout_s == 0.0
    assert s.log_identity == "hash"


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RDBROKER_POOL", "from-env")
    monkeypatch.setenv("RDBROKER_FIRST_PACKET_TIMEOUT_S", "2.5")
    s = parse_args(["--pool", "from-flag", "--broker", "10.0.0.1:1, 10.0.0.2:2", "--idle-timeout-s", "30"])
    assert s.pool == "from-flag"
    assert s.first_packet_timeout_s == 2.5
    assert s.broker_addresses == ["10.0.0.1:1", "10.0.0.2:2"]
    assert s.idle_timeout_s == 30.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("listen", "nohost"),
        ("broker", " , "),
        ("broker", "a:1,b:notaport"),
        ("first_packet_timeout_s", "0"),
        ("max_first_packet", str(MAX_FIRST_PACKET + 1)),
        ("max_connections", "0"),
        ("max_routing_per_client", "-1"),
        ("max_routing_per_client", "100001"),
        ("max_routing_per_client", "twenty"),
        ("max_routing", "-1"),
        ("max_routing", "100001"),
        ("route_queue_timeout_s", "0"),
        ("route_queue_timeout_s", "301"),
        ("log_identity", "plain"),
    ],
)
def test_bad_values_are_refused(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        ProxySettings.model_validate({field: value})


def test_unknown_flag_exits() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag", "1"])
