"""`rdbroker-agent wake-on-lan`: the magic packet, sent to a UDP socket on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest

from rdbroker_agent.__main__ import main
from rdbroker_agent.wake import magic_packet, parse_mac

MAC = bytes.fromhex("0a1b2c3d4e5f")


@pytest.mark.parametrize("text", ["0a:1b:2c:3d:4e:5f", "0A-1B-2C-3D-4E-5F", "0a1b.2c3d.4e5f", "0a1b2c3d4e5f"])
def test_the_usual_spellings_of_a_mac(text: str) -> None:
    assert parse_mac(text) == MAC


@pytest.mark.parametrize("text", ["0a:1b:2c:3d:4e", "0a:1b-2c:3d:4e:5f", "0g:1b:2c:3d:4e:5f", ""])
def test_bad_macs_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a MAC address"):
        parse_mac(text)


def test_the_packet_is_ff_six_times_then_the_mac_sixteen_times() -> None:
    packet = magic_packet(MAC)
    assert len(packet) == 102
    assert packet[:6] == b"\xff" * 6
    assert all(packet[6 + 6 * n : 12 + 6 * n] == MAC for n in range(16))


def test_the_command_sends_it(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(5)
        port = listener.getsockname()[1]
        code = main(
            [
                "wake-on-lan",
                "0a:1b:2c:3d:4e:5f",
                "--broadcast",
                "127.0.0.1",
                "--port",
                str(port),
                "--count",
                "2",
            ]
        )
        assert code == 0
        assert [listener.recv(200) for _ in range(2)] == [magic_packet(MAC)] * 2
    assert "sent 2 magic packets for 0a:1b:2c:3d:4e:5f to 127.0.0.1" in capsys.readouterr().out


def test_a_bad_mac_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wake-on-lan", "server-7"]) == 2
    assert "'server-7' is not a MAC address" in capsys.readouterr().err
