"""Migrations run from empty to head on PostgreSQL and SQLite, and head matches the tables."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from rdbroker_broker.__main__ import migrate_main
from rdbroker_broker.db import migrate
from rdbroker_broker.db.engine import make_engine
from rdbroker_broker.db.tables import metadata


async def assert_at_head_and_matching(url: str) -> None:
    engine = make_engine(url)
    try:
        assert await migrate.current_revision(engine) is None
        await migrate.upgrade(engine)
        await migrate.upgrade(engine)  # idempotent
        assert await migrate.current_revision(engine) == migrate.head_revision()
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), metadata))
        assert diff == []
    finally:
        await engine.dispose()


async def test_postgresql_empty_to_head(pg_database_url):
    await assert_at_head_and_matching(pg_database_url)


async def test_sqlite_empty_to_head(tmp_path):
    await assert_at_head_and_matching(f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}")


def test_migrate_command(pg_database_url, capsys):
    assert migrate_main(["--database-url", pg_database_url]) == 0
    assert "database at revision" in capsys.readouterr().out


def test_migrate_command_reports_an_unreachable_database(capsys):
    assert migrate_main(["--database-url", "postgresql://postgres@127.0.0.1:1/nope?connect_timeout=2"]) == 1
    assert "cannot migrate" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["mysql://x/y", "nonsense"])
def test_unsupported_urls_are_refused(url, capsys):
    assert migrate_main(["--database-url", url]) == 1
    assert "unsupported database URL" in capsys.readouterr().err


async def test_multi_host_dsn_finds_the_primary(pg_server_url, pg_database_url):
    # The first host refuses connections; libpq moves on to the next one.
    name = pg_database_url.rsplit("/", 1)[1]
    hostport = pg_server_url.split("@", 1)[1]
    url = f"postgresql://postgres@127.0.0.1:1,{hostport}/{name}?target_session_attrs=read-write&connect_timeout=2"
    engine = make_engine(url)
    try:
        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


async def test_broker_on_an_unmigrated_postgresql_refuses_to_start(pg_database_url):
    from rdbroker_broker.app import StartupError, serve
    from tests.integration.broker.conftest import settings_for

    with pytest.raises(StartupError, match="rdbroker migrate"):
        await serve(settings_for(pg_database_url, migrate=False))


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
async def test_live_counters_are_backfilled_from_existing_sessions(dialect, pg_database_url, tmp_path):
    from datetime import UTC, datetime

    from sqlalchemy import text

    url = pg_database_url if dialect == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    engine = make_engine(url)
    now = datetime.now(UTC)
    try:
        await migrate.upgrade(engine, "0001")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO pools (name, name_key, is_default, disconnect_timeout_s,"
                    " created_at, updated_at) "
                    "VALUES ('default', 'default', true, 60, :now, :now)"
                ),
                {"now": now},
            )
            await conn.execute(
                text(
                    "INSERT INTO servers (address, pool, weight, max_sessions, admin_state, health,"
                    " health_detail,"
                    " agent_state, agent_detail, load, placements_since_report, agent_url, sessions_url,"
                    " created_at, updated_at) VALUES ('a:1', 'default', 100, 0, 'enabled', 'unknown', '',"
                    " 'none', '', -1, 0, '', '', :now, :now)"
                ),
                {"now": now},
            )
            for i, state in enumerate(["active", "disconnected", "ended"]):
                await conn.execute(
                    text(
                        'INSERT INTO sessions (id, pool, "user", user_key, server_address, state,'
                        " learnt_from,"
                        " client_address, created_at, updated_at, end_reason) VALUES"
                        " (:id, 'default', :u, :u, 'a:1', :state, 'route', '', :now, :now, '')"
                    ),
                    {"id": f"s{i}", "u": f"u{i}", "state": state, "now": now},
                )
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT live_sessions FROM servers"))).scalar_one() == 2
    finally:
        await engine.dispose()


async def test_statement_and_lock_timeouts_reach_the_server(pg_database_url):
    from sqlalchemy import text

    engine = make_engine(pg_database_url, statement_timeout_ms=1234, lock_timeout_ms=567)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SHOW statement_timeout"))).scalar_one() == "1234ms"
            assert (await conn.execute(text("SHOW lock_timeout"))).scalar_one() == "567ms"
    finally:
        await engine.dispose()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
async def test_held_sessions_count_open_and_confirmed_sessions_only(dialect, pg_database_url, tmp_path):
    """`held_sessions` (capacity) counts pending, active and confirmed disconnected sessions; an
    unconfirmed claim whose connection closed is live but holds nothing."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    url = pg_database_url if dialect == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"
    engine = make_engine(url)
    now = datetime.now(UTC)

    async def counts() -> dict[str, tuple[int, int]]:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT address, live_sessions, held_sessions FROM servers"))
            return {address: (live, held) for address, live, held in rows}

    async def run(sql: str) -> None:
        async with engine.begin() as conn:
            await conn.execute(text(sql), {"now": now})

    try:
        await migrate.upgrade(engine)
        await run(
            "INSERT INTO pools (name, name_key, is_default, disconnect_timeout_s, created_at, updated_at)"
            " VALUES ('default', 'default', true, 60, :now, :now)"
        )
        for address in ("a:1", "b:1"):
            await run(
                "INSERT INTO servers (address, pool, weight, max_sessions, admin_state, health,"
                " health_detail, agent_state, agent_detail, load, placements_since_report, agent_url,"
                f" sessions_url, created_at, updated_at) VALUES ('{address}', 'default', 100, 0,"
                " 'enabled', 'unknown', '', 'none', '', -1, 0, '', '', :now, :now)"
            )
        await run(
            'INSERT INTO sessions (id, pool, "user", user_key, server_address, state, learnt_from,'
            " client_address, created_at, updated_at, end_reason) VALUES"
            " ('s1', 'default', 'u', 'u', 'a:1', 'pending', 'route', '', :now, :now, '')"
        )
        assert (await counts())["a:1"] == (1, 1)
        await run("UPDATE sessions SET state = 'active'")
        assert (await counts())["a:1"] == (1, 1)
        await run("UPDATE sessions SET state = 'disconnected'")
        assert (await counts())["a:1"] == (1, 0)  # a closed claim holds no capacity
        await run("UPDATE sessions SET confirmed = true")
        assert (await counts())["a:1"] == (1, 1)
        await run("UPDATE sessions SET server_address = 'b:1'")
        assert await counts() == {"a:1": (0, 0), "b:1": (1, 1)}
        await run("UPDATE sessions SET state = 'ended'")
        assert await counts() == {"a:1": (0, 0), "b:1": (0, 0)}
        await run("UPDATE sessions SET state = 'active', confirmed = false")
        await run("DELETE FROM sessions")
        assert await counts() == {"a:1": (0, 0), "b:1": (0, 0)}
    finally:
        await engine.dispose()


@pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
async def test_live_sessions_get_their_account_name(dialect, pg_database_url, tmp_path):
    """0006: live sessions recorded before `account_name` was stored get their user part; their keys
    stay (no pool has a domain yet); ended ones are history and stay as they are."""
    from datetime import UTC, datetime

    from sqlalchemy import text

    url = pg_database_url if dialect == "postgresql" else f"sqlite+aiosqlite:///{tmp_path / 'b.db'}"
    engine = make_engine(url)
    now = datetime.now(UTC)
    users = {"s1": ("CORP\\Bob", "active"), "s2": ("Carol@Corp.Example.com", "disconnected"),
             "s3": ("dave", "pending"), "s4": ("CORP\\erin", "ended")}  # fmt: skip
    try:
        await migrate.upgrade(engine, "0005")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO pools (name, name_key, is_default, disconnect_timeout_s, created_at,"
                    " updated_at) VALUES ('default', 'default', true, 60, :now, :now)"
                ),
                {"now": now},
            )
            for sid, (user, state) in users.items():
                await conn.execute(
                    text(
                        'INSERT INTO sessions (id, pool, "user", user_key, server_address, state,'
                        " learnt_from, client_address, created_at, updated_at, end_reason) VALUES"
                        " (:id, 'default', :u, :k, 'a:1', :state, 'route', '', :now, :now, '')"
                    ),
                    {"id": sid, "u": user, "k": user.casefold(), "state": state, "now": now},
                )
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT id, user_key, account_name FROM sessions ORDER BY id"))
            assert [tuple(r) for r in rows] == [
                ("s1", "corp\\bob", "bob"),
                ("s2", "carol@corp.example.com", "carol"),
                ("s3", "dave", "dave"),
                ("s4", "corp\\erin", None),
            ]
    finally:
        await engine.dispose()
