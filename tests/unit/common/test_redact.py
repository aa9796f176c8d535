"""Passwords out of printed text: every URL form, libpq key=value strings, messages quoting them, and the
log formatters' safety net over messages, exception text and fields."""

from __future__ import annotations

import json
import logging
import sys
from urllib.parse import quote

import pytest

from rdbroker_common import logs, redact

SECRET = "S3cretPw"


@pytest.fixture(autouse=True)
def _no_hidden_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hide` is process-wide: each test starts with none and leaves none behind."""
    monkeypatch.setattr(redact, "_hidden", ())


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        (
            f"postgresql+psycopg://postgres:{SECRET}@127.0.0.1:5432/db",
            "postgresql+psycopg://postgres:***@127.0.0.1:5432/db",
        ),
        (f"postgresql://postgres@h/db?password={SECRET}", "postgresql://postgres@h/db?password=***"),
        (
            f"postgresql://postgres@h/db?sslmode=disable&password={SECRET}&connect_timeout=2",
            "postgresql://postgres@h/db?sslmode=disable&password=***&connect_timeout=2",
        ),
        (f"postgresql://u@h/db?sslpassword={SECRET}", "postgresql://u@h/db?sslpassword=***"),
        (
            f"postgresql://u@h/db?pass%77ord={SECRET}",
            "postgresql://u@h/db?pass%77ord=***",
        ),  # libpq decodes keys
        (f"postgresql://u@h/db?PASSWORD={SECRET}", "postgresql://u@h/db?PASSWORD=***"),
        (f"postgresql://u:{quote('S3cr@t/P:w', safe='')}@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:S3cr@t@h/db", "postgresql://u:***@h/db"),  # an unencoded @ in the password
        (
            f"postgresql://u:{SECRET}@h1:5432,h2:5432/db?target_session_attrs=read-write",
            "postgresql://u:***@h1:5432,h2:5432/db?target_session_attrs=read-write",
        ),
        (f"host=127.0.0.1 password={SECRET} dbname=x", "host=127.0.0.1 password=*** dbname=x"),
        (f"host=h password = '{SECRET} with \\' spaces' port=5432", "host=h password = *** port=5432"),
        (f'password="{SECRET}" x', "password=*** x"),
        (f"PGPASSWORD={SECRET} psql", "PGPASSWORD=*** psql"),
        (
            f'missing "=" after "postgresql://u:{SECRET}@h/db" in connection info string',
            'missing "=" after "postgresql://u:***@h/db" in connection info string',
        ),
        (
            f"cannot migrate postgresql://u@h/db?password={SECRET}: connection refused",
            "cannot migrate postgresql://u@h/db?password=***: connection refused",
        ),
        (str({"host": "h", "password": SECRET}), "{'host': 'h', 'password': '***'}"),
        (json.dumps({"password": SECRET}), '{"password": "***"}'),
    ],
)
def test_every_form_of_password_is_hidden(text: str, redacted: str) -> None:
    assert redact.redact(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://postgres@127.0.0.1:5432/db",
        "postgresql://user@host:5432/db?application_name=a@b",
        "sqlite+aiosqlite:///rdbroker.db",
        'FATAL:  password authentication failed for user "postgres"',
        "GET /v1/users/corp%5Clee/sessions",
        "dns:///brokers.rdbroker.svc:50051",
        "connection ended: client_closed",
    ],
)
def test_text_without_a_password_is_unchanged(text: str) -> None:
    assert redact.redact(text) == text


def test_a_hidden_secret_is_masked_anywhere_as_is_and_encoded() -> None:
    """What a driver may print without its URL: the password as libpq decoded it."""
    redact.hide_url_secrets("postgresql://u:S3cr%40t-Pw@h/db?sslpassword=Key%2FPass9")
    text = "auth with S3cr@t-Pw failed; S3cr%40t-Pw; key Key/Pass9, Key%2FPass9"
    assert redact.redact(text) == "auth with *** failed; ***; key ***, ***"
    assert redact.suspicious("plain S3cr@t-Pw")


def test_short_secrets_are_not_masked_everywhere() -> None:
    redact.hide("abc")
    assert redact.redact("abc abc") == "abc abc"


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    return logging.getLogger("t").makeRecord("t", logging.ERROR, "f.py", 1, msg, args, None, extra=extra)


def _raised(message: str) -> logging.LogRecord:
    try:
        raise RuntimeError(message)
    except RuntimeError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
        return record


def test_the_json_formatter_redacts_message_exception_and_fields() -> None:
    formatter = logs.JsonFormatter()
    url = f"postgresql://postgres:{SECRET}@127.0.0.1/db?sslpassword={SECRET}2"
    lines = [
        formatter.format(_record("broker listening on %s", url)),
        formatter.format(_record("x", database=url, nested={"urls": [url, (url,)], "password": SECRET})),
        formatter.format(_record("x", password=SECRET, ts="mine")),  # the slow path's layout
        formatter.format(_raised(f"could not connect with password={SECRET}")),
    ]
    for line in lines:
        assert SECRET not in line
        json.loads(line)  # still one JSON object
    assert (
        json.loads(lines[0])["msg"]
        == "broker listening on postgresql://postgres:***@127.0.0.1/db?sslpassword=***"
    )
    second = json.loads(lines[1])
    hidden = "postgresql://postgres:***@127.0.0.1/db?sslpassword=***"
    assert second["database"] == hidden
    assert second["nested"] == {"urls": [hidden, [hidden]], "password": "***"}
    assert json.loads(lines[2])["password"] == "***"
    assert "password=***" in json.loads(lines[3])["exc"]


def test_the_json_formatter_masks_hidden_secrets_that_json_escapes() -> None:
    odd = 'pa"ss\\wörd\n1'
    redact.hide(odd)
    line = logs.JsonFormatter().format(_record("said %s", odd))
    assert json.loads(line)["msg"] == "said ***"


def test_the_text_formatter_redacts_message_and_exception() -> None:
    formatter = logs.TextFormatter()
    line = formatter.format(_raised(f"dsn postgresql://u:{SECRET}@h/db"))
    assert SECRET not in line
    assert "RuntimeError: dsn postgresql://u:***@h/db" in line
    assert formatter.format(_record("plain")).endswith("t: plain")
