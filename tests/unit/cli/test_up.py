"""`rdbroker up` / `demo`: the farm from the command line, argument errors, the banner."""

from __future__ import annotations

import io

import pytest

from rdbroker_cli import components, farm, up
from rdbroker_cli.__main__ import main as rdbroker


def test_servers_make_one_default_pool():
    assert farm.from_servers(["10.0.0.11", "10.0.0.12:3390", "[2001:db8::1]:3389"]) == {
        "pools": [{"name": "default", "default": True}],
        "servers": [
            {"address": "10.0.0.11:3389", "pool": "default"},
            {"address": "10.0.0.12:3390", "pool": "default"},
            {"address": "[2001:db8::1]:3389", "pool": "default"},
        ],
    }


@pytest.mark.parametrize(
    ("servers", "message"),
    [
        (["10.0.0.11:3389", "10.0.0.11"], "--server 10.0.0.11:3389 is given twice"),
        (["10.0.0.11:99999"], "bad --server '10.0.0.11:99999': bad port in '10.0.0.11:99999'"),
        (["10.0.0.11:0"], "bad --server '10.0.0.11:0': port 0"),
        ([":3389"], "bad --server ':3389': missing host in ':3389'"),
    ],
)
def test_bad_servers_are_refused(servers, message):
    with pytest.raises(farm.FarmError) as caught:
        farm.from_servers(servers)
    assert str(caught.value) == message


def test_farm_file_errors(tmp_path):
    with pytest.raises(farm.FarmError, match=r"cannot read the farm file .*missing.yaml"):
        farm.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [\n  - name: x\n")
    with pytest.raises(farm.FarmError, match=r"is not valid YAML \(line \d+\)"):
        farm.load(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(farm.FarmError, match="must be a mapping with `pools` and `servers`"):
        farm.load(bad)
    bad.write_text("servers: 3\n")
    with pytest.raises(farm.FarmError, match="`servers` must be a list"):
        farm.load(bad)


def test_farm_file_is_read(tmp_path):
    path = tmp_path / "farm.yaml"
    path.write_text(
        "pools:\n  - name: default\n    default: true\n  - name: Sales\n"
        "servers:\n  - address: 10.0.0.11:3389\n    pool: default\n"
        "  - address: 10.0.0.12:3389\n    pool: Sales\n"
    )
    loaded = farm.load(path)
    assert [s["address"] for s in loaded["servers"]] == ["10.0.0.11:3389", "10.0.0.12:3389"]
    assert farm.summary(loaded) == "2 servers in 2 pools"
    assert farm.summary(farm.from_servers(["a:1"])) == "1 server in pool default"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up"], "rdbroker up: error: one of the arguments --server -f/--farm is required\n"),
        (
            ["up", "--server", "a:1", "-f", "farm.yaml"],
            "rdbroker up: error: argument -f/--farm: not allowed with argument --server\n",
        ),
        (["up", "--server", "a:1", "a:1"], "rdbroker up: error: unrecognized arguments: a:1\n"),
        (
            ["up", "--server", "a:1", "--listen", "nope"],
            "rdbroker up: bad --listen: missing port in 'nope'\n",
        ),
        (["up", "--server", "a:1", "--server", "a:1"], "rdbroker up: --server a:1 is given twice\n"),
        (["up", "-f", "/nonexistent/farm.yaml"], None),
        (["demo", "--fake-servers", "0"], "rdbroker demo: --fake-servers must be 1..20\n"),
        (["demo", "--http-listen", "x:y"], "rdbroker demo: bad --http-listen: bad port in 'x:y'\n"),
    ],
)
def test_command_line_errors_are_one_line_and_exit_2(capsys, argv, message):
    assert rdbroker(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    if message is None:
        assert err.startswith("rdbroker up: cannot read the farm file /nonexistent/farm.yaml")
    else:
        assert err == message


def test_banner_says_where_everything_listens():
    where = up.Listening(
        rdp="0.0.0.0:3389",
        http="127.0.0.1:8080",
        grpc="127.0.0.1:50051",
        database="sqlite+aiosqlite:///rdbroker.db",
        farm="2 servers in pool default",
    )
    out = io.StringIO()
    up.banner(where, out)
    text = out.getvalue()
    assert "RDP clients connect to  0.0.0.0:3389\n" in text
    assert (
        "REST API                http://127.0.0.1:8080/v1   (OpenAPI: http://127.0.0.1:8080/docs)\n" in text
    )
    assert "dashboard               http://127.0.0.1:8080/\n" in text
    assert text.endswith("Stop with Ctrl-C.\n")
    where.fake_servers = ["127.0.0.1:4001"]
    out = io.StringIO()
    up.banner(where, out, demo=True)
    assert "rdbroker demo-connect alice --to 127.0.0.1:3389 --url http://127.0.0.1:8080\n" in out.getvalue()


def test_help_lists_the_new_commands(capsys):
    assert rdbroker(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("up", "demo", "demo-connect", "servers", "sessions", "pools"):
        assert f"\n  {command} " in out


class _NoTelemetry:
    def shutdown(self) -> None:
        pass


def test_an_open_api_off_loopback_is_refused_before_anything_starts(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(up, "_start_logging", lambda config: _NoTelemetry())
    monkeypatch.delenv("RDBROKER_API_READ_TOKEN", raising=False)
    monkeypatch.delenv("RDBROKER_API_ADMIN_TOKEN", raising=False)
    database = f"sqlite+aiosqlite:///{tmp_path / 'up.db'}"
    argv = ["up", "--server", "10.0.0.1", "--http-listen", "0.0.0.0:8080", "--database-url", database]
    assert rdbroker(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "rdbroker: invalid settings: http_listen 0.0.0.0:8080 is not a loopback address and no API token is "
        "set: set RDBROKER_API_ADMIN_TOKEN (and RDBROKER_API_READ_TOKEN), or listen on 127.0.0.1\n"
    )
    assert not (tmp_path / "up.db").exists()


def _up_argv(database: str, *servers: str) -> list[str]:
    argv = ["up", "--database-url", database, "--listen", "127.0.0.1:0"]
    argv += ["--http-listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]
    for server in servers:
        argv += ["--server", server]
    return argv


async def _servers_in(database: str) -> list[str]:
    from rdbroker_broker.db.engine import make_engine
    from rdbroker_broker.db.repositories import ServerRepository

    engine = make_engine(database)
    try:
        async with engine.connect() as conn:
            return sorted(s.address for s in await ServerRepository(conn).list())
    finally:
        await engine.dispose()


def test_up_on_a_database_holding_other_servers_needs_replace_farm(capsys, monkeypatch, tmp_path):
    import asyncio

    monkeypatch.setattr(up, "_start_logging", lambda config: _NoTelemetry())
    database = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    existing = farm.from_servers(["10.0.0.1:3389", "10.0.0.2:3389"])
    settings = components.broker_settings(components.UpConfig(database_url=database))
    asyncio.run(components.apply_farm(settings, existing, "--server"))

    # The command line names only one of them: refused before anything starts, nothing deleted.
    assert rdbroker(_up_argv(database, "10.0.0.1:3389")) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "holds servers the command line does not name (10.0.0.2:3389)" in err
    assert "--replace-farm" in err
    assert asyncio.run(_servers_in(database)) == ["10.0.0.1:3389", "10.0.0.2:3389"]

    # Naming every server is fine (nothing would be removed), and --replace-farm removes the others.
    assert asyncio.run(components.apply_farm(settings, existing, "--server")) == []
    smaller = farm.from_servers(["10.0.0.1:3389"])
    asyncio.run(components.apply_farm(settings, smaller, "--server", replace=True))
    assert asyncio.run(_servers_in(database)) == ["10.0.0.1:3389"]


def test_replace_farm_is_a_flag_of_up():
    args = up.build_parser(demo=False).parse_args(["--server", "10.0.0.1", "--replace-farm"])
    assert up.config_from(args).replace_farm is True
    args = up.build_parser(demo=False).parse_args(["--server", "10.0.0.1"])
    assert up.config_from(args).replace_farm is False


def test_up_gives_each_component_its_own_random_grpc_token(monkeypatch):
    for role in ("PROXY", "HEALTH", "ADMIN"):
        monkeypatch.delenv(f"RDBROKER_GRPC_{role}_TOKEN", raising=False)
    config = components.UpConfig(database_url="sqlite+aiosqlite:///unused.db")
    first, second = components.broker_settings(config), components.broker_settings(config)
    tokens = set(first.grpc_tokens.values())
    assert set(first.grpc_tokens) == {"proxy", "health", "admin"}
    assert len(tokens) == 3  # one per role
    assert all(len(token) >= 40 for token in tokens)
    assert tokens.isdisjoint(second.grpc_tokens.values())  # made up per run
    proxy = components.proxy_settings(config, first)
    health = components.health_settings(config, first)
    assert proxy.broker_token.get_secret_value() == first.grpc_tokens["proxy"]
    assert health.broker_token.get_secret_value() == first.grpc_tokens["health"]
    assert health.grpc_admin_token.get_secret_value() == first.grpc_tokens["admin"]

    # A token the environment gives is kept (an operator may call admin RPCs with it); of a rotation's
    # list the proxy sends the first.
    monkeypatch.setenv("RDBROKER_GRPC_ADMIN_TOKEN", "operator-admin-token")
    monkeypatch.setenv("RDBROKER_GRPC_PROXY_TOKEN", "new-proxy-token,old-proxy-token")
    given = components.broker_settings(config)
    assert given.grpc_tokens["admin"] == "operator-admin-token"
    assert given.grpc_tokens["proxy"] == "new-proxy-token,old-proxy-token"
    assert given.grpc_tokens["health"] not in tokens
    assert components.proxy_settings(config, given).broker_token.get_secret_value() == "new-proxy-token"


async def test_up_routes_with_its_tokens_and_refuses_callers_without_one(monkeypatch, tmp_path):
    import asyncio

    import grpc

    from rdbroker_proto.v1 import broker_pb2 as pb
    from rdbroker_proto.v1 import broker_pb2_grpc
    from rdbroker_rdp import build_connection_request
    from tests.unit.proxy.support import close, handshake

    for role in ("PROXY", "HEALTH", "ADMIN"):
        monkeypatch.delenv(f"RDBROKER_GRPC_{role}_TOKEN", raising=False)
    config = components.UpConfig(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        grpc_listen="127.0.0.1:0",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'demo.db'}",
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    seen: list[up.Listening] = []

    def on_ready(where: up.Listening) -> None:
        seen.append(where)
        ready.set()

    task = asyncio.get_running_loop().create_task(up.run_demo(config, 1, stop, on_ready))
    try:
        async with asyncio.timeout(30):
            await ready.wait()
        where = seen[0]
        rdp_port = int(where.rdp.rsplit(":", 1)[1])
        _, writer, _ = await handshake(rdp_port, build_connection_request(cookie="alice"))  # routed
        await close(writer)
        async with grpc.aio.insecure_channel(where.grpc) as channel:
            stub = broker_pb2_grpc.BrokerStub(channel)
            for rpc, request in (
                (stub.ListServers, pb.ListServersRequest()),
                (stub.Route, pb.RouteRequest(connection_id="c", cookie="mallory")),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:  # another local user, say
                    await rpc(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def test_up_on_sqlite_keeps_its_log_hash_key_beside_the_database(monkeypatch, tmp_path):
    monkeypatch.delenv("RDBROKER_LOG_HASH_KEY", raising=False)
    monkeypatch.delenv("RDBROKER_LOG_HASH_KEY_FILE", raising=False)
    database = tmp_path / "rdbroker.db"
    config = components.UpConfig(database_url=f"sqlite:///{database}")
    broker = components.broker_settings(config)
    proxy = components.log_hash_key_beside(components.proxy_settings(config, broker), broker)
    key_file = tmp_path / "rdbroker.db.loghash-key"
    assert proxy.log_hash_key_file == str(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600
    key = key_file.read_text()
    assert len(key.strip()) == 64
    assert not proxy.log_hasher().ephemeral  # no warning at start, the same hashes after a restart
    again = components.log_hash_key_beside(components.proxy_settings(config, broker), broker)
    assert (again.log_hash_key_file, key_file.read_text()) == (str(key_file), key)

    # A key the environment gives wins; PostgreSQL keeps no file.
    monkeypatch.setenv("RDBROKER_LOG_HASH_KEY", "an-operator-key-of-the-deployment")
    given = components.log_hash_key_beside(components.proxy_settings(config, broker), broker)
    assert given.log_hash_key_file == ""
    monkeypatch.delenv("RDBROKER_LOG_HASH_KEY")
    pg = components.UpConfig(database_url="postgresql://postgres@127.0.0.1:5432/x")
    pg_broker = components.broker_settings(pg)
    assert (
        components.log_hash_key_beside(components.proxy_settings(pg, pg_broker), pg_broker).log_hash_key_file
        == ""
    )
