"""rest/headers.py on a bare Starlette app, and the vendored Swagger UI files against the sums recorded
in rest/apidocs/README.md (they are swagger-ui-dist's, unmodified)."""

from __future__ import annotations

import hashlib
import re

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from rdbroker_broker.rest.app import API_DOCS
from rdbroker_broker.rest.headers import HEADERS, SecurityHeaders


async def own_policy(request: object) -> PlainTextResponse:
    return PlainTextResponse("x", headers={"Content-Security-Policy": "default-src 'none'"})


async def plain(request: object) -> PlainTextResponse:
    return PlainTextResponse("x", headers={"X-Other": "kept"})


async def test_a_response_keeps_a_header_it_sets_and_gets_the_others():
    app = SecurityHeaders(Starlette(routes=[Route("/own", own_policy), Route("/plain", plain)]))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        own = await client.get("/own")
        other = await client.get("/plain")
    # A route may tighten its own policy; it is not overwritten nor sent twice.
    assert own.headers.get_list("content-security-policy") == ["default-src 'none'"]
    assert own.headers["x-frame-options"] == "DENY"
    assert other.headers["x-other"] == "kept"
    for name, value in HEADERS:
        assert other.headers.get_list(name.decode()) == [value.decode()]


def test_the_vendored_swagger_ui_files_are_the_recorded_ones():
    readme = (API_DOCS / "README.md").read_text(encoding="utf-8")
    recorded = dict(re.findall(r"^\| (\S+) \| ([0-9a-f]{64}) \|$", readme, flags=re.MULTILINE))
    vendored = {p.name for p in (API_DOCS / "assets").iterdir()} - {"init.js"}
    assert set(recorded) == vendored
    for name, digest in recorded.items():
        assert hashlib.sha256((API_DOCS / "assets" / name).read_bytes()).hexdigest() == digest, name
