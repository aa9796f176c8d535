"""`rdbroker apply`: idempotent, dry-run, and never silently deleting a server with live sessions."""

from __future__ import annotations

import asyncio

from rdbroker_broker import domain as d
from rdbroker_broker.__main__ import apply_main
from tests.integration.broker.conftest import seed, server

FARM = """\
pools:
  - name: default
    default: true
    disconnect_timeout: 1h
servers:
  - address: 10.0.0.1:3389
    max_sessions: 10
  - address: 10.0.0.2:3389
"""


def apply(url: str, path, *flags: str) -> int:
    return apply_main(["--database-url", url, "-f", str(path), *flags])


async def apply_async(url: str, path, *flags: str) -> int:
    # apply_main runs its own event loop, as the CLI does: give it a thread.
    return await asyncio.to_thread(apply, url, path, *flags)


async def test_apply_is_idempotent_and_keeps_runtime_state(
    pg_database_url, engine, service, tmp_path, capsys
):
    farm = tmp_path / "farm.yaml"
    farm.write_text(FARM)
    assert await apply_async(pg_database_url, farm, "--dry-run") == 0
    assert "would create server 10.0.0.1:3389" in capsys.readouterr().out
    assert await service.list_servers() == []

    assert await apply_async(pg_database_url, farm) == 0
    assert "create pool default" in capsys.readouterr().out
    await service.set_server_state("10.0.0.2:3389", d.AdminState.DRAINING)
    assert await apply_async(pg_database_url, farm) == 0
    assert capsys.readouterr().out.strip() == "no changes"
    servers = {s.address: s for s in await service.list_servers()}
    assert servers["10.0.0.1:3389"].max_sessions == 10
    assert servers["10.0.0.2:3389"].admin_state is d.AdminState.DRAINING


async def test_prune_refuses_a_server_with_live_sessions_unless_forced(
    pg_database_url, engine, service, tmp_path, capsys
):
    await seed(engine, server("10.0.0.1:3389"), server("10.0.0.9:3389"))
    await service.set_server_state("10.0.0.1:3389", d.AdminState.DRAINING)
    routed = await service.route(d.RouteRequest("c1", cookie="zoe"))
    assert routed.server_address == "10.0.0.9:3389"
    farm = tmp_path / "farm.yaml"
    farm.write_text(FARM)

    assert await apply_async(pg_database_url, farm) == 0
    assert "keep server 10.0.0.9:3389: not in the file" in capsys.readouterr().out
    assert await apply_async(pg_database_url, farm, "--prune") == 1
    captured = capsys.readouterr()
    assert "server 10.0.0.9:3389 holds 1 live sessions: not deleted" in captured.err
    assert len(await service.list_servers()) == 3  # refused as a whole: nothing applied

    assert await apply_async(pg_database_url, farm, "--prune", "--force") == 0
    out = capsys.readouterr().out
    assert "end 1 live sessions on 10.0.0.9:3389" in out
    assert "delete server 10.0.0.9:3389" in out
    assert {s.address for s in await service.list_servers()} == {"10.0.0.1:3389", "10.0.0.2:3389"}
    [ended] = await service.lookup_user_sessions("zoe", include_ended=True)
    assert ended.end_reason == "server_removed"


def test_apply_reports_file_errors(pg_database_url, tmp_path, capsys):
    farm = tmp_path / "farm.yaml"
    farm.write_text("servers:\n  - address: h1\n    weight: lots\n")
    assert apply(pg_database_url, farm) == 2
    assert "farm.yaml:3: servers[0].weight" in capsys.readouterr().err
    assert apply(pg_database_url, tmp_path / "missing.yaml") == 2


def test_apply_on_embedded_sqlite_migrates_first(tmp_path, capsys):
    farm = tmp_path / "farm.yaml"
    farm.write_text(FARM)
    url = f"sqlite+aiosqlite:///{tmp_path / 'rdbroker.db'}"
    assert apply(url, farm) == 0
    assert apply(url, farm) == 0
    assert capsys.readouterr().out.strip().endswith("no changes")


def test_apply_reports_an_unreachable_database_in_one_line(tmp_path, capsys):
    farm = tmp_path / "farm.yaml"
    farm.write_text(FARM)
    url = "postgresql://postgres:s3cret@127.0.0.1:1/nope?connect_timeout=2"
    assert apply(url, farm) == 1
    err = capsys.readouterr().err
    assert "cannot apply to" in err
    assert "Traceback" not in err
    assert "s3cret" not in err
    assert len(err.strip().splitlines()) == 1, err


SETTINGS_FARM = """\
pools:
  - name: default
    default: true
    disconnect_timeout: 1h
    domain: CORP
    upn_suffixes: [corp.example.com]
    junk_bytes: 4KiB
    confirm_timeout: 5m
    stale_after: 30s
    logon_lag: 10s
    probe: {interval: 2s, sessions_interval: 5s}
servers:
  - address: 10.0.0.1:3389
    max_sessions: 10
  - address: 10.0.0.2:3389
"""


async def test_apply_sets_the_pool_settings_and_names_the_changes(pg_database_url, service, tmp_path, capsys):
    farm = tmp_path / "farm.yaml"
    farm.write_text(FARM)
    assert await apply_async(pg_database_url, farm) == 0
    capsys.readouterr()

    farm.write_text(SETTINGS_FARM)
    assert await apply_async(pg_database_url, farm, "--dry-run") == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "would update pool default (probe.interval default -> 2s, probe.sessions_interval default -> 5s, "
        "domain none -> CORP, upn_suffixes [] -> [corp.example.com], junk_bytes 2KiB -> 4KiB, "
        "confirm_timeout 2m -> 5m, stale_after default -> 30s, logon_lag 30s -> 10s)"
    )
    assert await apply_async(pg_database_url, farm) == 0
    [pool] = await service.list_pools()
    assert (pool.domain, pool.upn_suffixes, pool.junk_bytes, pool.confirm_timeout_s) == (
        "CORP",
        ("corp.example.com",),
        4096,
        300.0,
    )
    assert (pool.stale_after_ms, pool.logon_lag_s, pool.sessions_interval_ms) == (30_000, 10.0, 5000)
    capsys.readouterr()
    assert await apply_async(pg_database_url, farm) == 0
    assert capsys.readouterr().out.strip() == "no changes"

    # The file is the declaration: settings left out go back to their defaults.
    farm.write_text(FARM)
    assert await apply_async(pg_database_url, farm) == 0
    assert "domain CORP -> none" in capsys.readouterr().out
    [pool] = await service.list_pools()
    assert (pool.domain, pool.upn_suffixes, pool.junk_bytes) == ("", (), 2048)
