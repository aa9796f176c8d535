"""bench/proxy_bench.py: its flags and its table, on made-up figures (nothing is measured here)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.support.bench_script import loaded


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    yield from loaded("proxy_bench.py")


def test_defaults_are_the_issues_layout(bench: ModuleType) -> None:
    args = bench.parse_args([])
    assert (args.concurrency, args.streams, args.backends) == (64, 8, 4)
    assert (args.idle, args.sticky_users, args.sticky_rounds) == (5000, 1000, 3)
    assert args.targets == ["direct", "haproxy", "up", "up-pg", "proxy", "proxy+db"]
    assert not args.no_pin


def test_quick_scales_down_but_an_explicit_flag_wins(bench: ModuleType) -> None:
    quick = bench.parse_args(["--quick"])
    assert quick.idle == bench.QUICK["idle"] < 5000
    assert quick.setups == bench.QUICK["setups"] < 3000
    assert quick.concurrency == 64  # the layout stays; only the amounts shrink
    assert bench.parse_args(["--quick", "--idle", "777"]).idle == 777
    assert bench.parse_args(["--quick", "--setups=123"]).setups == 123


def test_targets_are_checked(bench: ModuleType) -> None:
    assert bench.parse_args(["--targets", "haproxy, up"]).targets == ["haproxy", "up"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--targets", "haproxy,nginx"])


def test_table_prints_every_row_with_ratios_to_haproxy(bench: ModuleType) -> None:
    f = bench.Figures
    figures = {
        "haproxy": f(
            setups=[4000.0, 6000.0, 5000.0],
            p50=[10.0],
            p99=[18.0],
            alone_p50=[0.26],
            alone_p99=[2.4],
            errors=[0.0],
            cpu=[166.0],
            bulk=[200.0],
            held=[5000.0],
            held_failed=[0.0],
            rss=[3.2 * 1024],
            split=[0.0],
            sticky_errors=[0.0],
        ),
        "up": f(
            setups=[500.0],
            p50=[907.0],
            p99=[1047.0],
            alone_p50=[16.8],
            alone_p99=[31.8],
            errors=[3.0],
            cpu=[12225.0],
            behind={"PostgreSQL": [1500.0]},
            bulk=[400.0],
            held=[1124.0],
            held_failed=[3876.0],
            rss=[36 * 1024],
            split=[2.0],
            sticky_errors=[1.0],
        ),
        "direct": f(setups=[20000.0], bulk=[1000.0]),
    }
    text = bench.table(figures, concurrency=64, streams=8, idle=5000, users=1000)
    lines = text.splitlines()
    assert lines[0] == "| | HAProxy | `up` (embedded SQLite) | direct |"
    assert lines[1] == "|---|---|---|---|"
    cells = [line.removeprefix("| ").removesuffix(" |").split(" | ") for line in lines[2:]]
    rows = {row[0]: row[1:] for row in cells}
    assert all(len(row) == 3 for row in rows.values())
    assert rows["setups/s (ratio to HAProxy)"] == ["5,000", "500 (0.10x)", "20,000 (4.00x)"]
    assert rows["setup p50 / p99 at 64 concurrent"][:2] == ["10.0 / 18.0 ms", "907 / 1,047 ms"]
    assert rows["one client alone, p50 / p99"][:2] == ["0.26 / 2.40 ms", "16.8 / 31.8 ms"]
    assert (
        rows["CPU per connection (process under test; + what serves it)"][1]
        == "12,225 µs (+ PostgreSQL 1,500)"
    )
    assert rows["bulk MiB/s each way, 8 streams"][1] == "400 (2.00x)"
    assert rows["5,000 idle connections held"][:2] == ["5,000", "1,124 (**3,876 failed**)"]
    assert rows["RSS per idle connection"][:2] == ["3.2 KiB", "36.0 KiB"]
    assert rows["stickiness: of 1,000 users, on more than one server"][:2] == ["0", "2 (1 errors)"]
    assert rows["RSS per idle connection"][2] == "-"  # not measured for direct


def test_table_without_haproxy_has_no_ratios(bench: ModuleType) -> None:
    text = bench.table(
        {"up": bench.Figures(setups=[70.0], bulk=[525.0])}, concurrency=64, streams=8, idle=10, users=10
    )
    assert "x)" not in text
    assert "| setups/s | 70.0 |" in text
