"""Logging set-up, done once in each `__main__`: JSON lines (with the trace id when there is one) or text.

The JSON formatter runs once per proxied connection, so it is written for speed; its output is exactly
that of `json.dumps({"ts", "level", "logger", "msg", **extras, "trace_id", "span_id", "exc"},
default=str, ensure_ascii=False)` (tests/unit/common/test_logs.py pins it).

Both formatters are the safety net of `redact`: a finished line that may hold a password (a database
URL in a message, an exception's text or a field; `redact.suspicious`) is formatted again from
redacted parts. Values of fields named like a password (`password`, `sslpassword`, ...) are masked too.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from rdbroker_common import redact

# Attributes every LogRecord has; anything else came in through `extra=` and is logged as a field.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
# Fields we write ourselves: an extra of the same name takes over our field's place, which only the
# dict-building slow path gets right.
_OURS = frozenset({"ts", "level", "logger", "msg", "trace_id", "span_id", "exc"})
_PLAN_CACHE_MAX = 256  # attribute layouts seen; one or a few per log call site
_encode_str = json.encoder.encode_basestring  # the C escaper json.dumps uses with ensure_ascii=False


class JsonFormatter(logging.Formatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encode = json.JSONEncoder(default=str, ensure_ascii=False).encode
        # A record's attribute names, in order -> its extras with their '"name": ', or None when an
        # extra reuses one of our field names. Deciding that once per layout skips ~20 standard
        # attributes per record.
        self._plans: dict[tuple[str, ...], tuple[tuple[str, str], ...] | None] = {}
        self._second: tuple[float, str] = (math.nan, "")  # last whole second and its "YYYY-MM-DDTHH:MM:SS."
        self._span: tuple[SpanContext | None, str] = (None, "")  # last span context and its two fields

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        layout = tuple(fields)
        try:
            plan = self._plans[layout]
        except KeyError:
            plan = self._plan(layout)
        if plan is None:
            return self._checked(self._format_slowly(record), record)
        value = self._value
        parts = [
            f'{{"ts": "{self._timestamp(record.created)}", "level": {value(record.levelname)}, '
            f'"logger": {value(record.name)}, "msg": {value(record.getMessage())}'
        ]
        for key, prefix in plan:
            field = fields[key]
            kind = type(field)
            if kind is str:
                parts.append(prefix + _encode_str(field))
            elif kind is int:
                parts.append(prefix + int.__repr__(field))
            else:
                parts.append(prefix + value(field))
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            last, ids = self._span
            if span is not last:
                ids = f'"trace_id": "{span.trace_id:032x}", "span_id": "{span.span_id:016x}"'
                self._span = (span, ids)
            parts.append(ids)
        if record.exc_info:
            parts.append('"exc": ' + value(self.formatException(record.exc_info)))
        return self._checked(", ".join(parts) + "}", record)

    def _checked(self, line: str, record: logging.LogRecord) -> str:
        # One check of the finished line; the rare line that may hold a secret is built again.
        return self._format_slowly(record, scrub=_scrubbed) if redact.suspicious(line) else line

    def _plan(self, layout: tuple[str, ...]) -> tuple[tuple[str, str], ...] | None:
        extras = [key for key in layout if key not in _STANDARD and not key.startswith("_")]
        plan = None if _OURS.intersection(extras) else tuple((key, f"{_encode_str(key)}: ") for key in extras)
        if len(self._plans) < _PLAN_CACHE_MAX:
            self._plans[layout] = plan
        return plan

    def _value(self, value: Any) -> str:
        """What json.dumps writes for `value` inside the line; the common types without the encoder."""
        kind = type(value)
        if kind is str:
            return _encode_str(value)
        if kind is int:
            return int.__repr__(value)
        if value is None:
            return "null"
        return self._encode(value)

    def _timestamp(self, created: float) -> str:
        """`datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")`; date and time of day
        are formatted once a second, not once a record."""
        # The same split and rounding (half to even, in microseconds) as datetime.fromtimestamp.
        fraction, whole = math.modf(created)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            whole += 1
            micros -= 1_000_000
        elif micros < 0:
            whole -= 1
            micros += 1_000_000
        second, text = self._second
        if whole != second:
            text = datetime.fromtimestamp(whole, UTC).isoformat(timespec="seconds")[:-6] + "."
            self._second = (whole, text)
        return f"{text}{micros // 1000:03d}+00:00"

    def _format_slowly(self, record: logging.LogRecord, scrub: Callable[[Any], Any] = lambda v: v) -> str:
        """The reference: a dict in the final key order, for records whose extras reuse our field names,
        and (with `scrub`) for lines that may hold a secret."""
        out: dict[str, Any] = {
            "ts": self._timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = redact.MASK if redact.is_secret_key(key) else scrub(value)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
            out["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            out["exc"] = scrub(self.formatException(record.exc_info))
        return self._encode(out)


def _scrubbed(value: Any) -> Any:
    """`value` as the JSON encoder would print it, every string redacted. Only called on values that
    were encoded once already, so there is no cycle to guard against."""
    if isinstance(value, str):
        return redact.redact(value)
    if isinstance(value, int | float) or value is None:  # bool and the int enums too, as json prints them
        return value
    if isinstance(value, dict):
        return {
            (redact.redact(k) if isinstance(k, str) else k): (
                redact.MASK if isinstance(k, str) and redact.is_secret_key(k) else _scrubbed(v)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_scrubbed(item) for item in value]
    return redact.redact(str(value))  # what `default=str` prints


class TextFormatter(logging.Formatter):
    """`%(asctime)s %(levelname)s %(name)s: %(message)s` (and the traceback), redacted when it may hold a
    secret."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return redact.redact(line) if redact.suspicious(line) else line


def configure(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we are debugging.
    for noisy in ("uvicorn.access", "sqlalchemy.engine", "alembic"):
        logging.getLogger(noisy).setLevel("WARNING" if level != "DEBUG" else level)
