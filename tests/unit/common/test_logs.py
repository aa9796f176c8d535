"""Exact log lines: the formatters are tuned for speed, and these goldens pin what they must still print."""

from __future__ import annotations

import datetime
import decimal
import enum
import http
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from rdbroker_common import logs

CREATED = 1795784671.123456  # 2026-11-27T13:04:31.123456Z
HEAD = (
    '{"ts": "2026-11-27T13:04:31.123+00:00", "level": "INFO", "logger": "rdbroker_proxy.connection", '
    '"msg": "connection ended: client_closed"'
)
_log = logging.getLogger("rdbroker_proxy.connection")


def _record(
    *,
    extra: dict[str, Any] | None = None,
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None] | None = None,
    created: float = CREATED,
    level: int = logging.INFO,
) -> logging.LogRecord:
    record = _log.makeRecord(
        _log.name, level, "/x/c.py", 363, "connection ended: %s", ("client_closed",), exc_info, extra=extra
    )
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def _json(record: logging.LogRecord) -> str:
    return logs.JsonFormatter().format(record)


def test_json_line_with_extras_keeps_their_order_and_types() -> None:
    record = _record(
        extra={
            "client": "10.1.2.3:51234",
            "pool": "bureaux-é",
            "identity": "sha256:0123456789abcdef",
            "bytes_from_client": 123,
            "duration_ms": 0,
            "session_id": None,
            "spliced": True,
            "ratio": 0.5,
            "tags": ["a", 1, ("t",)],
            "nested": {"k": "v", 1: False},
            "_hidden": "underscore fields are private",
            "quote": 'a"b\\c\n\x00',
            "": "empty key",
        }
    )
    assert _json(record) == (
        HEAD + ', "client": "10.1.2.3:51234", "pool": "bureaux-é", "identity": "sha256:0123456789abcdef", '
        '"bytes_from_client": 123, "duration_ms": 0, "session_id": null, "spliced": true, "ratio": 0.5, '
        '"tags": ["a", 1, ["t"]], "nested": {"k": "v", "1": false}, "quote": "a\\"b\\\\c\\n\\u0000", '
        '"": "empty key"}'
    )


def test_json_line_without_extras() -> None:
    assert _json(_record()) == HEAD + "}"


def test_extras_named_like_our_fields_replace_the_value_in_place() -> None:
    record = _record(extra={"client": "c", "ts": "mine", "logger": 7, "exc": "not an exception"})
    assert _json(record) == (
        '{"ts": "mine", "level": "INFO", "logger": 7, "msg": "connection ended: client_closed", '
        '"client": "c", "exc": "not an exception"}'
    )


def test_attributes_set_after_creation_count_as_extras_but_formatter_fields_do_not() -> None:
    record = _record(extra={"client": "c"})
    logging.Formatter("%(asctime)s %(message)s").format(record)  # sets message and asctime
    record.late = 1
    record.stack_info = "Stack (most recent call last):\n  somewhere"
    assert _json(record) == HEAD + ', "client": "c", "late": 1}'


class _Colour(enum.StrEnum):
    RED = "red"


class _Opaque:
    def __str__(self) -> str:
        return "<opaque é>"


def test_values_json_cannot_encode_are_written_as_their_str() -> None:
    record = _record(
        extra={
            "obj": _Opaque(),
            "raw": b"\x01ab",
            "amount": decimal.Decimal("1.10"),
            "when": datetime.datetime(2026, 11, 27, 13, 4, 31, tzinfo=datetime.UTC),
            "inside": [_Opaque(), {"k": frozenset()}],
            "nan": math.nan,
            "inf": -math.inf,
            "big": 10**30,
            "int_enum": http.HTTPStatus.OK,
            "str_enum": _Colour.RED,
        }
    )
    assert _json(record) == (
        HEAD + ', "obj": "<opaque é>", "raw": "b\'\\\\x01ab\'", "amount": "1.10", '
        '"when": "2026-11-27 13:04:31+00:00", "inside": ["<opaque é>", {"k": "frozenset()"}], '
        '"nan": NaN, "inf": -Infinity, "big": 1000000000000000000000000000000, '
        '"int_enum": 200, "str_enum": "red"}'
    )


def test_unencodable_structures_still_raise() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        _json(_record(extra={"loop": loop}))
    with pytest.raises(TypeError, match="keys must be"):
        _json(_record(extra={"bad_key": {(1, 2): "tuple key"}}))


# Compiled under a fake file name so the traceback has neither a real path nor source lines.
_RAISER = compile(
    "def boom():\n"
    "    raise ValueError('bad é')\n"
    "def caught():\n"
    "    try:\n"
    "        try:\n"
    "            boom()\n"
    "        except ValueError as exc:\n"
    "            raise RuntimeError('wrapped') from exc\n"
    "    except RuntimeError:\n"
    "        return sys.exc_info()\n",
    "<golden>",
    "exec",
)


def test_json_line_with_an_exception() -> None:
    namespace: dict[str, Any] = {"sys": sys}
    exec(_RAISER, namespace)
    record = _record(extra={"client": "c"}, exc_info=namespace["caught"](), level=logging.ERROR)
    assert _json(record) == (
        HEAD.replace('"INFO"', '"ERROR"') + ', "client": "c", "exc": "Traceback (most recent call last):\\n'
        '  File \\"<golden>\\", line 6, in caught\\n  File \\"<golden>\\", line 2, in boom\\n'
        "ValueError: bad é\\n\\nThe above exception was the direct cause of the following exception:\\n\\n"
        'Traceback (most recent call last):\\n  File \\"<golden>\\", line 8, in caught\\n'
        'RuntimeError: wrapped"}'
    )


def test_json_line_with_an_exception_without_traceback() -> None:
    record = _record(exc_info=(KeyError, KeyError("k"), None))
    assert _json(record) == HEAD + ', "exc": "KeyError: \'k\'"}'


def test_json_line_with_a_trace_context() -> None:
    context = SpanContext(
        trace_id=0x00C0FFEE0123456789ABCDEF01234567,
        span_id=0x000000000000BEEF,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    record = _record(extra={"client": "c", "trace_id": "from extra"})
    with trace.use_span(NonRecordingSpan(context)):
        line = _json(record)
    assert line == (
        HEAD + ', "client": "c", "trace_id": "00c0ffee0123456789abcdef01234567", '
        '"span_id": "000000000000beef"}'
    )
    with trace.use_span(trace.INVALID_SPAN):
        assert _json(_record()) == HEAD + "}"


@pytest.mark.parametrize(
    ("created", "ts"),
    [
        (0.0, "1970-01-01T00:00:00.000+00:00"),
        (1795784671.0, "2026-11-27T13:04:31.000+00:00"),
        (1795784671.0004999, "2026-11-27T13:04:31.000+00:00"),
        (1795784671.0015, "2026-11-27T13:04:31.001+00:00"),
        (1795784671.9995, "2026-11-27T13:04:31.999+00:00"),
        (1795784671.9999996, "2026-11-27T13:04:32.000+00:00"),  # rounds up into the next second
        (-1.5, "1969-12-31T23:59:58.500+00:00"),
    ],
)
def test_timestamps_are_utc_milliseconds(created: float, ts: str) -> None:
    line = _json(_record(created=created))
    assert line == HEAD.replace("2026-11-27T13:04:31.123+00:00", ts) + "}"


def test_the_same_formatter_prints_each_record_its_own_timestamp() -> None:
    formatter = logs.JsonFormatter()
    lines = [formatter.format(_record(created=c)) for c in (CREATED, CREATED + 0.5, CREATED + 1, CREATED)]
    assert [line[8:37] for line in lines] == [
        "2026-11-27T13:04:31.123+00:00",
        "2026-11-27T13:04:31.623+00:00",
        "2026-11-27T13:04:32.123+00:00",
        "2026-11-27T13:04:31.123+00:00",
    ]


@pytest.fixture
def configured_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """`configure` replaces the root handlers (pytest's own too): put everything back afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    names = ("uvicorn.access", "sqlalchemy.engine", "alembic")
    noisy = {name: logging.getLogger(name).level for name in names}
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        yield root
    finally:
        root.handlers[:], root.level = saved
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)
        monkeypatch.undo()
        time.tzset()


def test_configure_json_installs_the_json_formatter(configured_root: logging.Logger) -> None:
    logs.configure("INFO", "json")
    [handler] = configured_root.handlers
    assert handler.formatter is not None
    assert handler.formatter.format(_record(extra={"client": "c"})) == HEAD + ', "client": "c"}'


def test_text_line(configured_root: logging.Logger) -> None:
    logs.configure("DEBUG", "text")
    [handler] = configured_root.handlers
    assert handler.formatter is not None
    record = _record(extra={"client": "c"}, exc_info=(KeyError, KeyError("k"), None))
    assert handler.formatter.format(record) == (
        "2026-11-27 13:04:31,123 INFO rdbroker_proxy.connection: connection ended: client_closed\n"
        "KeyError: 'k'"
    )


# The formatter as it was before it was tuned: the tuned one must print exactly what this prints.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _reference(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    out: dict[str, Any] = {
        "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "level": record.levelname,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in record.__dict__.items():
        if key not in _STANDARD and not key.startswith("_"):
            out[key] = value
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        out["trace_id"] = format(span.trace_id, "032x")
        out["span_id"] = format(span.span_id, "016x")
    if record.exc_info:
        out["exc"] = formatter.formatException(record.exc_info)
    return json.dumps(out, default=str, ensure_ascii=False)


_leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.binary(max_size=4)
    | st.decimals(allow_nan=False)
    | st.builds(_Opaque)
    | st.sampled_from([http.HTTPStatus.OK, _Colour.RED])
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner)
        | st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=3)
    ),
    max_leaves=6,
)
_names = st.sampled_from(
    ["client", "pool", "ts", "logger", "trace_id", "exc", "_private", 'é"', ""]
) | st.text(max_size=6)
# One formatter for every example, so its caches (layouts, last second, last span) carry across them.
_SHARED = logs.JsonFormatter()


@given(
    extra=st.dictionaries(_names, _values, max_size=6).filter(
        lambda extra: not extra.keys() & (_STANDARD | {"message", "asctime"})
    ),
    created=st.floats(min_value=-1e9, max_value=4e9) | st.sampled_from([CREATED, CREATED + 0.9999996, 0.0]),
    level=st.sampled_from([logging.DEBUG, logging.INFO, logging.ERROR, 5]),
    with_span=st.booleans(),
    with_exc=st.booleans(),
)
def test_any_record_prints_what_the_untuned_formatter_printed(
    extra: dict[str, Any], created: float, level: int, with_span: bool, with_exc: bool
) -> None:
    record = _record(
        extra=extra,
        created=created,
        level=level,
        exc_info=(KeyError, KeyError(extra), None) if with_exc else None,
    )
    context = SpanContext(trace_id=abs(hash(created)) + 1, span_id=level, is_remote=True)
    with trace.use_span(NonRecordingSpan(context) if with_span else trace.INVALID_SPAN):
        assert _SHARED.format(record) == _reference(_SHARED, record)


def test_more_layouts_than_the_formatter_remembers_still_print_right() -> None:
    formatter = logs.JsonFormatter()
    for n in range(600):
        record = _record(extra={f"field{n}": n, "client": "c"}, created=CREATED + n * 0.37)
        assert formatter.format(record) == _reference(formatter, record)
    assert len(formatter._plans) <= logs._PLAN_CACHE_MAX  # generated field names cannot grow it forever
