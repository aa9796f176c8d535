"""bench/logon_bench.py: its flags, its reading of xrdp's log and its table, on made-up logons (nothing is
measured here, and no xrdp runs)."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.bench_script import loaded


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    yield from loaded("logon_bench.py")


def test_defaults_are_the_issues_eight_logons_three_ways(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert args.logons == 8
    assert args.ways == ["direct", "haproxy", "rdbroker"]
    assert bench.parse_args(["--logons", "3", "--ways", "rdbroker, direct"]).ways == ["rdbroker", "direct"]
    assert bench.parse_args(["--ways", "haproxy,proxy"]).ways == ["haproxy", "proxy"]  # not by default


@pytest.mark.parametrize("argv", [["--ways", "direct,nginx"], ["--ways", ","], ["--logons", "0"]])
def test_bad_flags_are_refused(bench: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def test_the_steps_are_the_logons_own_connection_not_a_health_probe(bench: ModuleType) -> None:
    log = [
        (0.10, "[INFO ] Socket 11: AF_INET connection received from 127.0.0.1 port 5000"),  # a probe
        (0.11, "[INFO ] Security protocol: configured [SSL|RDP], requested [SSL|HYBRID], selected [SSL]"),
        (0.40, "[INFO ] Socket 11: AF_INET connection received from 127.0.0.1 port 6000"),
        (0.42, "[INFO ] Security protocol: configured [SSL|RDP], requested [SSL|HYBRID|RDP], selected [SSL]"),
        (0.90, "[INFO ] TLS connection established from 127.0.0.1 port 6000: TLSv1.3 with cipher X"),
        (1.30, "[INFO ] login successful for user rdlb1 on display 10"),
        (1.31, "[INFO ] xrdp_wm_log_msg: login successful for user rdlb1 on display 10"),
        (1.50, "[INFO ] VNC connection complete, connected ok"),
        (1.55, "[INFO ] connected ok"),
    ]
    steps = bench.logon_steps(log)
    assert steps == {"accepted": 0.40, "confirm": 0.42, "tls": 0.90, "login": 1.30, "desktop": 1.55}
    assert list(steps) == ["accepted", "confirm", "tls", "login", "desktop"]
    assert bench.logon_steps([]) == {}


def test_log_tail_gives_whole_new_lines_only(bench: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "xrdp.log"
    path.write_text("old line\n")
    tail = bench.LogTail(path)
    assert tail.lines() == []
    with path.open("a") as f:
        f.write("first\nsecond, half")
    assert tail.lines() == ["first"]
    with path.open("a") as f:
        f.write(" done\n")
    assert tail.lines() == ["second, half done"]
    assert bench.LogTail(tmp_path / "absent.log").lines() == []


def test_table_gives_medians_p90_differences_steps_and_failures(bench: ModuleType) -> None:
    logon = bench.Logon
    steps = {"accepted": 0.4, "confirm": 0.41, "tls": 0.7, "login": 1.0, "desktop": 1.2}
    logons = [logon("direct", "fresh", s, steps) for s in (1.0, 1.2, 1.4)]
    logons += [logon("direct", "reconnect", s, steps) for s in (0.9, 1.1)]
    logons += [logon("rdbroker", "fresh", s, {**steps, "tls": 1.0}) for s in (1.5, 1.6, 1.7)]
    logons += [
        logon("rdbroker", "reconnect", 1.4, steps, "", {"to_server": [1e-4, 3e-4], "to_client": [2e-3]})
    ]
    logons += [logon("rdbroker", "reconnect", math.nan, {}, "no desktop within 40.0 s")]
    text = bench.table(logons, ["direct", "haproxy", "rdbroker"])
    lines = text.splitlines()
    assert lines[0] == "| | direct | HAProxy | `rdbroker up` (embedded SQLite) |"
    assert lines[1] == "|---|---|---|---|"
    cells = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in lines[2:]]
    rows = {row[0]: row[1:] for row in cells}
    assert all(len(row) == 3 for row in rows.values())
    fresh = "fresh logon (sesman creates the session)"
    assert rows[f"{fresh}: median / p90"] == ["1.20 s / 1.36 s (n=3)", "-", "1.60 s / 1.68 s (n=3)"]
    assert rows[f"{fresh}: median minus direct's"] == ["-", "-", "+0.40 s"]
    assert rows["reconnect: median / p90"] == ["1.00 s / 1.08 s (n=2)", "-", "1.40 s / 1.40 s (n=1)"]
    assert rows["reconnect: median minus direct's"] == ["-", "-", "+0.40 s"]
    tls = "xrdp logs TLS up (after the client's MCS Connect Initial), median after client start (both kinds)"
    assert rows[tls] == ["0.70 s", "-", "1.00 s"]
    assert rows["failed logons"] == ["0", "0", "1 (no desktop within 40.0 s)"]
    assert rows["relay delay per segment, client to server: median / p90 (--hops)"] == [
        "-",
        "-",
        "200 / 280 µs (n=2)",
    ]
    assert rows["relay delay of the Connection Confirm, median (--hops)"] == ["-", "-", "2,000 µs"]


def test_table_without_direct_has_no_differences(bench: ModuleType) -> None:
    text = bench.table([bench.Logon("haproxy", "fresh", 1.5, {})], ["haproxy"])
    assert "minus direct" not in text
    assert "| fresh logon (sesman creates the session): median / p90 | 1.50 s / 1.50 s (n=1) |" in text


# -- bench/lo_capture.py: reading segments and a relay's delays from made-up captures ------------------


@pytest.fixture(scope="module")
def capture() -> Iterator[ModuleType]:
    yield from loaded("lo_capture.py")


def frame(src: int, dst: int, seq: int, flags: int, payload: bytes = b"", protocol: int = 6) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", src, dst, seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, protocol, 0, b"\x7f\0\0\1", b"\x7f\0\0\1"
    )
    return b"\0" * 14 + ip + tcp


def test_parse_reads_ports_flags_sequence_and_payload_length(capture: ModuleType) -> None:
    segment = capture.parse(frame(5000, 3389, 1234, 0x18, b"hello"), 1.5)
    assert segment == capture.Segment(1.5, 5000, 3389, 0x18, 1234, 5)
    assert capture.parse(frame(5000, 3389, 1, 0x18, b"x", protocol=17), 1.0) is None  # UDP
    assert capture.parse(b"\0" * 20, 1.0) is None  # too short


def test_relay_delays_follow_bytes_through_coalescing_and_retransmits(capture: ModuleType) -> None:
    s = capture.Segment
    syn, ack, psh = 0x02, 0x10, 0x18
    client, relay, leg, server = 5000, 7000, 6000, 3389
    segments = [
        s(0.000, client, relay, syn, 100, 0),
        s(0.000, relay, client, syn | ack, 900, 0),
        s(0.001, leg, server, syn, 200, 0),
        s(0.001, server, leg, syn | ack, 800, 0),
        s(0.010, client, relay, psh, 101, 10),  # two segments in...
        s(0.011, client, relay, psh, 111, 5),
        s(0.011, client, relay, psh, 111, 5),  # (a retransmit counts once)
        s(0.0115, leg, server, psh, 201, 15),  # ...one out, coalesced
        s(0.020, server, leg, psh, 801, 4),
        s(0.0202, relay, client, psh, 901, 4),
        s(0.030, 5001, server, syn, 300, 0),  # a health probe's connection: few bytes
        s(0.030, 5001, server, psh, 301, 2),
    ]
    delays = capture.relayed(segments, relay, server)
    assert [round(d, 6) for d in delays["to_server"]] == [0.0015, 0.0005]
    assert [round(d, 6) for d in delays["to_client"]] == [0.0002]
    assert capture.relayed(segments[:2], relay, server) == {}  # no server-side connection seen
