"""Passwords out of anything printed: database URLs, libpq key=value strings, error messages quoting them.

`redact(text)` hides, in any text:
- the password of `scheme://user:password@host...` (up to the last `@` of the URL, so an unencoded `@`
  in the password is hidden too; a URL whose query holds an `@` may lose a little more than its password);
- the value of a `password` or `sslpassword` query parameter (`?password=...`, `&sslpassword=...`, the key
  percent-encoded or not, as libpq decodes it);
- the value of a libpq `password=...` / `password = '...'` pair (and of any `...password=` pair), and
  of a quoted `'password': '...'` item (a dict's repr, JSON);
- every secret given to `hide()` (the database password as parsed, so that a message quoting it without
  its URL is covered), as is and percent-encoded.

The log formatters (`logs.py`) pass every line through `suspicious()` and, only when it answers True,
through `redact`: the common line costs a few substring tests.
"""

from __future__ import annotations

import re
import threading
from json.encoder import encode_basestring
from urllib.parse import quote, unquote

MASK = "***"
SECRET_KEYS = frozenset({"password", "sslpassword"})
# Shorter secrets would mask ordinary words; the patterns above still hide them in their URL or pair.
MIN_HIDDEN_CHARS = 4
MAX_HIDDEN = 64

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"<>]*):[^\s'\"<>]*@")
_USERINFO_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"<>]*:([^\s'\"<>]*)@")
# A value ends before a ":" that ends the URL ("cannot migrate URL: reason"); the secrets given to
# `hide` are masked whole first.
_QUERY_PARAM = re.compile(r"([?&;])([^=&#\s'\"<>]+)=([^&#\s'\"<>]*?)(?=:?(?:[&#\s'\"<>]|$))")
# Any key ending in "password" (sslpassword, PGPASSWORD=...), not one of a URL's query parameters.
_PAIR = re.compile(
    r"""(?<![\w?&;])(\w*password)(\s*=\s*)('(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s'"]*?(?=:?(?:\s|$)))""",
    re.IGNORECASE,
)
# A mapping printed as text (a dict's repr, JSON): 'password': '...', "password": "...".
_QUOTED_ITEM = re.compile(r"""(['"])(\w*password)\1(\s*:\s*)(['"])(?:(?!\4)[^\\]|\\.)*\4""", re.IGNORECASE)
_hidden: tuple[str, ...] = ()
_hidden_lock = threading.Lock()


def hide(secret: str) -> None:
    """Mask `secret` wherever it appears from now on in this process (and its percent-encoded form)."""
    global _hidden
    if len(secret) < MIN_HIDDEN_CHARS:
        return
    # As is, percent-encoded, and as it shows inside a JSON string (the formatter checks the line).
    forms = {secret, quote(secret, safe=""), quote(secret), encode_basestring(secret)[1:-1]}
    with _hidden_lock:
        known = set(_hidden)
        added = [form for form in forms if form not in known]
        if added and len(_hidden) < MAX_HIDDEN:
            # Longest first: a form containing another is masked whole.
            _hidden = tuple(sorted([*_hidden, *added], key=len, reverse=True))


def hide_url_secrets(url: str) -> None:
    """`hide` the passwords a database URL or libpq string carries, as written and as libpq decodes them."""
    found: list[str] = []
    for match in _USERINFO_PASSWORD.finditer(url):
        found.append(match.group(1))
    for match in _QUERY_PARAM.finditer(url):
        if unquote(match.group(2)).strip().lower() in SECRET_KEYS:
            found.append(match.group(3))
    for match in _PAIR.finditer(url):
        value = match.group(3)
        if value[:1] in ("'", '"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1] if value[-1:] == value[:1] else value[1:])
        found.append(value)
    for secret in found:
        hide(secret)
        hide(unquote(secret))


def suspicious(text: str) -> bool:
    """False when `redact(text)` is certainly `text`: what every form contains ("://", a "%" escape,
    "pass" in any case) and the hidden secrets. Plain `in` tests: a regex search costs more than
    formatting the line."""
    if "://" in text or "%" in text or "pass" in text.lower():
        return True
    return bool(_hidden) and any(secret in text for secret in _hidden)


def redact(text: str) -> str:
    """`text` with every password it may hold replaced by `***` (see the module's docstring)."""
    if not suspicious(text):
        return text
    for secret in _hidden:
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1:{MASK}@", text)
    text = _QUERY_PARAM.sub(_query_param, text)
    text = _PAIR.sub(rf"\1\2{MASK}", text)
    return _QUOTED_ITEM.sub(rf"\1\2\1\3\4{MASK}\4", text)


def _query_param(match: re.Match[str]) -> str:
    key = match.group(2)
    if unquote(key).strip().lower() not in SECRET_KEYS:
        return match.group(0)
    return f"{match.group(1)}{key}={MASK}"


def is_secret_key(key: str) -> bool:
    """A field name whose value is a password (for structured log fields): as the key=value form."""
    return key.strip().lower().endswith("password")
