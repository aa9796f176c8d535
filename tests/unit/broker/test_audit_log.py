"""The audit line as it is written: its fields by name in the JSON format and in the text format, one
line whatever the values hold, and written even when the broker logs only warnings."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from rdbroker_broker import audit, callers, errors
from rdbroker_common import logs

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # logs.configure(fmt="text")


@pytest.fixture
def root_at_warning() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Two handlers on the root logger, JSON and text, with the root at WARNING (restored after)."""
    root = logging.getLogger()
    as_json, as_text = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(as_json), logging.StreamHandler(as_text)]
    handlers[0].setFormatter(logs.JsonFormatter())
    handlers[1].setFormatter(logging.Formatter(TEXT_FORMAT))
    level = root.level
    root.setLevel(logging.WARNING)
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield as_json, as_text
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(level)


def test_the_line_names_its_fields_in_json_and_in_text(root_at_warning):
    as_json, as_text = root_at_warning
    caller = callers.Caller("token:admin", "10.0.0.7", callers.ADMIN)
    audit.write_log(
        audit.entry("server.drain", "10.0.0.11:3389", audit.OK, "admin_state enabled -> draining", caller)
    )
    line = json.loads(as_json.getvalue())
    assert {
        key: line[key] for key in ("event", "action", "target", "actor", "client", "outcome", "detail")
    } == {
        "event": "audit",
        "action": "server.drain",
        "target": "10.0.0.11:3389",
        "actor": "token:admin",
        "client": "10.0.0.7",
        "outcome": "ok",
        "detail": "admin_state enabled -> draining",
    }
    assert line["level"] == "INFO"  # written although the root logs only warnings
    text = as_text.getvalue()
    assert text.endswith(
        "INFO rdbroker_broker.audit: audit action=server.drain target=10.0.0.11:3389 actor=token:admin "
        'client=10.0.0.7 outcome=ok detail="admin_state enabled -> draining"\n'
    )


def test_values_that_could_forge_a_field_or_a_line_are_quoted(root_at_warning):
    as_json, as_text = root_at_warning
    forged = "x outcome=ok\nINFO rdbroker_broker.audit: audit action=server.remove"
    caller = callers.Caller("open-api", "", callers.ADMIN)
    audit.refused("session.end", forged, errors.NotFound("unknown session"), caller)
    text = as_text.getvalue()
    assert text.count("\n") == 1  # one line
    assert "target=" + json.dumps(forged) in text
    assert 'client="" outcome=not_found detail="unknown session"' in text
    assert json.loads(as_json.getvalue())["target"] == forged


def test_outcomes_by_error():
    assert [
        audit.outcome_of(exc)
        for exc in (
            errors.NotFound("x"),
            errors.Conflict("x"),
            errors.InvalidInput("x"),
            errors.DatabaseUnavailable("x"),
            RuntimeError("x"),
        )
    ] == [audit.NOT_FOUND, audit.CONFLICT, audit.INVALID, audit.UNAVAILABLE, audit.ERROR]
    # A driver's message may quote SQL and values: only a broker error's message is shown.
    assert audit.failure_detail(RuntimeError("INSERT ... 'secret'")) == "RuntimeError"


def test_entries_take_the_current_caller_and_fit_their_columns():
    with callers.use_caller(
        callers.Caller("spiffe://corp.example/rdbroker/admin", "ipv4:10.0.0.7:5", "admin")
    ):
        entry = audit.entry("a" * 100, "t" * 300, audit.OK, "d" * 2000)
    assert (entry.actor, entry.client) == ("spiffe://corp.example/rdbroker/admin", "ipv4:10.0.0.7:5")
    assert (len(entry.action), len(entry.target), len(entry.detail)) == (64, 255, 1024)
    assert audit.entry("x", "y", audit.OK).actor == "unknown"  # outside any request


def test_the_cuts_are_the_column_sizes():
    from rdbroker_broker.db.tables import audit as table

    sizes = {
        name: table.c[name].type.length
        for name in ("action", "target", "actor", "client", "outcome", "detail")
    }
    assert sizes == {
        "action": audit.ACTION_CHARS,
        "target": audit.TEXT_CHARS,
        "actor": audit.TEXT_CHARS,
        "client": audit.TEXT_CHARS,
        "outcome": audit.OUTCOME_CHARS,
        "detail": audit.DETAIL_CHARS,
    }
