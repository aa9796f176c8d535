"""The audit trail outside REST, on a real PostgreSQL: the gRPC admin calls, `rdbroker apply`, a change
whose transaction fails (its record goes with it), and the records' own retention."""

from __future__ import annotations

import getpass
import socket
from typing import Any

import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from rdbroker_broker import callers
from rdbroker_broker import domain as d
from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.farm import apply_farm
from rdbroker_broker.probing import ProbeService
from rdbroker_broker.rpc.servicer import BrokerServicer
from rdbroker_broker.service import BrokerService
from rdbroker_broker.store import Store
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import Clock, farm, seed, server, settings_for
from tests.integration.broker.test_apply import FARM, apply_async
from tests.support.audit import audit_lines, audit_rows, fields

A, B = "10.0.0.1:3389", "10.0.0.2:3389"
SPIFFE_ADMIN = callers.Caller("spiffe://corp.example/rdbroker/admin", "ipv4:10.0.0.7:51234", callers.ADMIN)
TOKEN_ADMIN = callers.Caller("token:admin", "ipv4:127.0.0.1:40000", callers.ADMIN)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class CallContext:
    """What the servicer uses of a gRPC call's context: no deadline, and abort."""

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


async def call(method: Any, request: Any, caller: callers.Caller) -> Any:
    """Call a servicer method as the gRPC authorization interceptor leaves it: with the caller set."""
    with callers.use_caller(caller):
        return await method(request, CallContext())


# --- gRPC admin calls ---------------------------------------------------------------------------------


async def test_set_server_state_over_grpc_is_audited(engine, service, caplog):
    await seed(engine, server(A), server(B))
    servicer = BrokerServicer(service, ProbeService(service))
    caplog.clear()
    for state, action, detail in (
        (pb.ADMIN_STATE_DRAINING, "server.drain", "admin_state enabled -> draining"),
        (pb.ADMIN_STATE_MAINTENANCE, "server.maintenance", "admin_state draining -> maintenance"),
        (pb.ADMIN_STATE_ENABLED, "server.enable", "admin_state maintenance -> enabled"),
    ):
        answer = await call(
            servicer.SetServerState, pb.SetServerStateRequest(address=A, admin_state=state), SPIFFE_ADMIN
        )
        assert answer.server.admin_state == state
        line = audit_lines(caplog)[-1]
        assert fields(line) == (action, A, SPIFFE_ADMIN.actor, SPIFFE_ADMIN.client, "ok")
        assert line["detail"] == detail
    rows = await audit_rows(engine, actor=SPIFFE_ADMIN.actor)
    assert [(row["action"], row["target"], row["client"], row["detail"]) for row in rows] == [
        (line["action"], line["target"], line["client"], line["detail"]) for line in audit_lines(caplog)
    ]
    assert len(rows) == 3


async def test_refused_grpc_changes_are_logged_not_stored(engine, service, caplog):
    await seed(engine, server(A))
    servicer = BrokerServicer(service, ProbeService(service))
    caplog.clear()
    with pytest.raises(Aborted) as unknown:
        await call(
            servicer.SetServerState,
            pb.SetServerStateRequest(address="10.9.9.9:3389", admin_state=pb.ADMIN_STATE_DRAINING),
            TOKEN_ADMIN,
        )
    assert unknown.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(Aborted) as invalid:
        await call(servicer.SetServerState, pb.SetServerStateRequest(address=A), TOKEN_ADMIN)
    assert invalid.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Aborted) as no_session:
        await call(servicer.EndSession, pb.EndSessionRequest(session_id="nope"), TOKEN_ADMIN)
    assert no_session.value.code is grpc.StatusCode.NOT_FOUND
    with pytest.raises(Aborted) as empty:
        await call(servicer.EndSession, pb.EndSessionRequest(), TOKEN_ADMIN)
    assert empty.value.code is grpc.StatusCode.INVALID_ARGUMENT
    actor, client = TOKEN_ADMIN.actor, TOKEN_ADMIN.client
    assert [fields(line) for line in audit_lines(caplog)] == [
        ("server.drain", "10.9.9.9:3389", actor, client, "not_found"),
        ("server.state", A, actor, client, "invalid"),
        ("session.end", "nope", actor, client, "not_found"),
        ("session.end", "", actor, client, "invalid"),
    ]
    assert await audit_rows(engine, actor=actor) == []


async def test_end_session_over_grpc_is_audited(engine, service, caplog):
    await seed(engine, server(A))
    placed = await service.route(d.RouteRequest("c1", proxy_id="p1", cookie="CORP\\zoe"))
    servicer = BrokerServicer(service, ProbeService(service))
    caplog.clear()
    request = pb.EndSessionRequest(session_id=placed.session_id)
    answer = await call(servicer.EndSession, request, SPIFFE_ADMIN)
    assert answer.session.state == pb.SESSION_STATE_ENDED
    again = await call(servicer.EndSession, request, SPIFFE_ADMIN)  # already ended: changes nothing
    assert again.session.state == pb.SESSION_STATE_ENDED
    first, second = audit_lines(caplog)
    assert fields(first) == ("session.end", placed.session_id, SPIFFE_ADMIN.actor, SPIFFE_ADMIN.client, "ok")
    assert first["detail"] == f"on {A} (pool default), reason operator"
    assert "zoe" not in str(first)  # the user's name stays out of the log...
    assert fields(second)[-1] == "unchanged"
    [row] = await audit_rows(engine, action="session.end")
    assert (
        row["detail"] == f"on {A} (pool default), reason operator; user CORP\\zoe"
    )  # ...and is in the record


# --- rdbroker apply -------------------------------------------------------------------------------------


async def test_apply_writes_a_record_per_change_line_and_logs_refusals(
    pg_database_url, engine, service, tmp_path, caplog, capsys
):
    actor = f"apply:{getpass.getuser()}@{socket.gethostname()}"
    path = tmp_path / "farm.yaml"
    path.write_text(FARM)
    assert await apply_async(pg_database_url, path, "--dry-run") == 0
    assert audit_lines(caplog) == []  # a dry run changes nothing
    assert await audit_rows(engine) == []
    capsys.readouterr()

    assert await apply_async(pg_database_url, path) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = [
        ("pool.create", "default", actor, "", "ok"),
        ("server.add", A, actor, "", "ok"),
        ("server.add", B, actor, "", "ok"),
    ]
    assert [fields(line) for line in audit_lines(caplog)] == expected
    rows = await audit_rows(engine)
    assert [fields(row) for row in rows] == expected
    assert [row["detail"] for row in rows] == printed  # each record is its plan line

    # A server the file no longer names, holding a session: --prune is refused as a whole.
    path.write_text(FARM.replace("  - address: 10.0.0.2:3389\n", ""))
    with callers.use_caller(TOKEN_ADMIN):
        await service.set_server_state(A, d.AdminState.MAINTENANCE)
    await service.route(d.RouteRequest("c1", cookie="zoe"))
    caplog.clear()
    assert await apply_async(pg_database_url, path, "--prune") == 1
    [refusal] = audit_lines(caplog)
    assert fields(refusal) == ("server.remove", B, actor, "", "refused")
    assert refusal["detail"].startswith(f"server {B} holds 1 live sessions: not deleted")
    assert len(await audit_rows(engine, actor=actor)) == 3

    caplog.clear()
    assert await apply_async(pg_database_url, path, "--prune", "--force") == 0
    done = [("sessions.end", B, actor, "", "ok"), ("server.remove", B, actor, "", "ok")]
    assert [fields(line) for line in audit_lines(caplog)] == done
    assert [fields(row) for row in (await audit_rows(engine, actor=actor))[3:]] == done


async def test_apply_as_a_library_names_the_caller_it_runs_as(engine, caplog):
    """`rdbroker up` and the tests apply farms in-process: the actor is `apply:` unless a caller is set."""
    with callers.use_caller(TOKEN_ADMIN):
        await apply_farm(engine, farm(server(A)))
    await apply_farm(engine, farm(server(A), server(B)))
    assert [(line["action"], line["actor"]) for line in audit_lines(caplog)] == [
        ("pool.create", "token:admin"),
        ("server.add", "token:admin"),
        ("server.add", f"apply:{getpass.getuser()}@{socket.gethostname()}"),
    ]


# --- a failed change keeps no record ---------------------------------------------------------------------


async def _sql(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_a_change_failing_at_commit_takes_its_record_with_it(engine, service, caplog):
    await seed(engine, server(A))
    # Fails the transaction at COMMIT, after the change and its record were written (which it checks).
    await _sql(
        engine,
        """CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF EXISTS (SELECT 1 FROM audit WHERE target = NEW.address AND actor = 'token:admin') THEN
            RAISE EXCEPTION 'refused at commit, the record written in this transaction';
          END IF;
          RAISE EXCEPTION 'refused at commit, no record';
        END $$""",
        """CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER UPDATE ON servers
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit()""",
    )
    caplog.clear()
    with (
        callers.use_caller(TOKEN_ADMIN),
        pytest.raises(Exception, match="the record written in this transaction") as failed,
    ):
        await service.set_server_state(A, d.AdminState.MAINTENANCE)
    [line] = audit_lines(caplog)
    assert fields(line) == ("server.maintenance", A, *fields_of(TOKEN_ADMIN), "error")
    assert line["detail"] == type(failed.value).__name__  # the driver's message (SQL, values) stays out
    assert await audit_rows(engine, actor="token:admin") == []
    [kept] = await service.list_servers()
    assert kept.admin_state is d.AdminState.ENABLED


async def test_a_change_whose_record_cannot_be_written_does_not_land(engine, service, caplog):
    await seed(engine, server(A))
    placed = await service.route(d.RouteRequest("c1", cookie="zoe"))
    await _sql(
        engine,
        """CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the audit table refuses rows'; END $$""",
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
    )
    with callers.use_caller(TOKEN_ADMIN):
        with pytest.raises(Exception, match="the audit table refuses rows"):
            await service.end_session(placed.session_id)
        with pytest.raises(Exception, match="the audit table refuses rows"):
            await apply_farm(engine, farm(server(A), server(B)))
    [live] = await service.lookup_user_sessions("zoe")
    assert live.session_id == placed.session_id  # not ended
    assert [s.address for s in await service.list_servers()] == [A]  # nothing of the farm applied
    assert [(line["action"], line["outcome"]) for line in audit_lines(caplog)[-2:]] == [
        ("session.end", "error"),
        ("farm.apply", "error"),
    ]


def fields_of(caller: callers.Caller) -> tuple[str, str]:
    return caller.actor, caller.client


# --- retention --------------------------------------------------------------------------------------------


async def test_records_outlive_the_history_and_are_purged_after_their_own_retention(
    engine, pg_database_url, clock: Clock
):
    assert BrokerSettings().audit_retention_s == 365 * 86400  # the default: a year
    day = 86400
    settings = settings_for(pg_database_url, audit_retention_s=10 * day)
    service = BrokerService(Store(engine), settings, clock)
    await seed(engine, server(A))
    placed = await service.route(d.RouteRequest("c1", cookie="zoe"))
    with callers.use_caller(TOKEN_ADMIN):
        await service.set_server_state(A, d.AdminState.DRAINING)
        await service.end_session(placed.session_id)
    clock.advance(8 * day)  # past the history's 7 days
    with callers.use_caller(TOKEN_ADMIN):
        await service.set_server_state(A, d.AdminState.ENABLED)
    assert (await service.sweep())["purged"] == 2  # zoe's session and its connection
    assert [row["action"] for row in await audit_rows(engine, actor="token:admin")] == [
        "server.drain",
        "session.end",
        "server.enable",
    ]
    clock.advance(3 * day)  # the first two are 11 days old, the last 3
    assert (await service.sweep())["purged"] == 2
    assert [row["action"] for row in await audit_rows(engine, actor="token:admin")] == ["server.enable"]
