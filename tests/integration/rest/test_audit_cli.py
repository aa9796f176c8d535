"""`rdbroker audit` and the audit lines of a real broker process (uvicorn, text logs, PostgreSQL): the
CLI's changes go through REST, so they are audited as the token that made them, from 127.0.0.1."""

from __future__ import annotations

import getpass
import json
import socket

from tests.integration.rest.conftest import ADMIN, READ, SERVERS, LiveBroker
from tests.integration.rest.test_cli import run

A = SERVERS[0]


def test_the_cli_changes_and_lists_the_trail(live_broker: LiveBroker, capsys, monkeypatch):
    monkeypatch.setenv("RDBROKER_URL", live_broker.url)
    monkeypatch.setenv("RDBROKER_TOKEN", ADMIN)
    assert run(capsys, "servers", "drain", A)[0] == 0
    assert run(capsys, "servers", "set", A, "--weight", "7")[0] == 0
    assert run(capsys, "servers", "maintenance", "10.9.9.9:3389")[0] == 1

    code, out, err = run(capsys, "audit", "--actor", "token:admin")
    assert (code, err) == (0, "")
    rows = [line.split() for line in out.splitlines()]
    assert rows[0] == ["ID", "AT", "ACTOR", "CLIENT", "ACTION", "TARGET", "DETAIL"]
    # ID, date, time, actor, client, action, target, detail...
    assert [row[3:7] for row in rows[1:]] == [
        ["token:admin", "127.0.0.1", "server.update", A],
        ["token:admin", "127.0.0.1", "server.drain", A],
    ]
    assert out.splitlines()[1].endswith("weight 100 -> 7")

    code, out, _ = run(capsys, "audit", "--limit", "1", "--json")
    page = json.loads(out)
    assert (code, [item["action"] for item in page["items"]]) == (0, ["server.update"])
    code, out, _ = run(capsys, "audit", "--limit", "1")
    assert out.splitlines()[-1] == f"older entries: --before {page['next_before']}"
    code, out, _ = run(capsys, "audit", "--before", str(page["next_before"]), "--action", "server.drain")
    assert [line.split()[5] for line in out.splitlines()[1:]] == ["server.drain"]

    # The farm the fixture applied with `rdbroker apply`, as this OS user on this host.
    actor = f"apply:{getpass.getuser()}@{socket.gethostname()}"
    code, out, _ = run(capsys, "audit", "--actor", actor, "--action", "pool.create")
    assert sorted(line.split()[6] for line in out.splitlines()[1:]) == ["Sales", "default"]
    assert run(capsys, "audit", "--actor", "nobody") == (0, "no audit records\n", "")

    code, _, err = run(capsys, "audit", "--token", READ)
    assert (code, err) == (
        1,
        "rdbroker: 403 Admin token required: this read needs the admin token; "
        "the read token reads the directory only\n",
    )

    log = live_broker.log.read_text()
    assert (
        f"audit action=server.drain target={A} actor=token:admin client=127.0.0.1 outcome=ok "
        'detail="admin_state enabled -> draining"' in log
    )
    assert (
        "audit action=server.maintenance target=10.9.9.9:3389 actor=token:admin client=127.0.0.1 "
        "outcome=not_found detail=\"unknown server '10.9.9.9:3389'\"" in log
    )
