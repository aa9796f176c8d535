"""Web hardening (docs/security.md, "Web pages and the REST API"): every page the broker serves loads only
the broker's own files, and every answer (pages, static files, API bodies, problems, the RequestGuard's
refusals, a bug's 500) carries the Content-Security-Policy, nosniff, Referrer-Policy and X-Frame-Options.
tests/e2e/test_dashboard.py checks the same pages in Chromium under that policy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from rdbroker_broker.rest.app import API_DOCS, DASHBOARD, create_app
from rdbroker_broker.service import BrokerService
from tests.integration.rest.conftest import ADMIN, READ, SERVERS, settings_for
from tests.integration.rest.test_auth import NO_TOKENS, client_for

BASE = "http://127.0.0.1:8080"
PAGES = ("/", "/dashboard/index.html", "/docs")
# FastAPI's own pages, each with inline script or a CDN: the broker serves none of them.
NOT_SERVED = ("/redoc", "/docs/oauth2-redirect", "/dashboard/", "/docs/assets/")
# Elements whose URL attribute the browser loads (or submits to) by itself.
LOADED = {
    "script": "src",
    "link": "href",
    "img": "src",
    "iframe": "src",
    "frame": "src",
    "embed": "src",
    "object": "data",
    "source": "src",
    "audio": "src",
    "video": "src",
    "track": "src",
    "input": "src",
    "form": "action",
}
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".html": "text/html"}


class Page(HTMLParser):
    """What an HTML page would make a browser load, and anything in it a strict CSP would block."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, str]] = []  # (tag, url)
        self.inline: list[str] = []
        self._script_without_src = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag in LOADED and values.get(LOADED[tag]):
            self.loads.append((tag, values[LOADED[tag]]))
        if tag in ("style", "base", "meta") and (tag != "meta" or "http-equiv" in values):
            self.inline.append(f"<{tag}>")
        self.inline += [f"{tag} {name}=" for name in values if name == "style" or name.startswith("on")]
        self.inline += [f"{tag} {name}=javascript:" for name, v in values.items() if "javascript:" in v]
        self._script_without_src = tag == "script" and "src" not in values

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script_without_src = False

    def handle_data(self, data: str) -> None:
        if self._script_without_src and data.strip():
            self.inline.append(f"inline <script>: {data.strip()[:60]}")


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    return page


def same_origin(url: str) -> bool:
    parts = urlsplit(urljoin(BASE + "/", url))
    return (parts.scheme, parts.netloc) == ("http", "127.0.0.1:8080")


def csp(response: httpx.Response) -> dict[str, list[str]]:
    [policy] = response.headers.get_list("content-security-policy")
    directives = [d.split() for d in policy.split(";") if d.strip()]
    return {d[0]: d[1:] for d in directives}


def assert_hardened(response: httpx.Response) -> None:
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    policy = csp(response)
    assert policy["default-src"] == ["'self'"], where
    assert policy["frame-ancestors"] == ["'none'"], where
    assert policy["object-src"] == ["'none'"], where
    assert policy["base-uri"] == ["'none'"], where
    assert policy["img-src"] == ["'self'", "data:"], where
    # Scripts and styles fall back to default-src 'self': nothing inline, nothing evaluated.
    assert not {"script-src", "script-src-elem", "style-src", "connect-src"} & set(policy), where
    assert not any("unsafe" in source or "*" in source for v in policy.values() for source in v), where
    for name, value in (
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
    ):
        assert response.headers.get_list(name) == [value], (where, name)


def static_files(folder: Path, prefix: str) -> Iterator[str]:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            yield f"{prefix}/{path.name}"


@pytest.fixture
async def anonymous(service: BrokerService):
    async with client_for(service, None, BASE) as client:
        yield client


async def test_each_page_loads_only_the_brokers_own_files(anonymous):
    for path in PAGES:
        answer = await anonymous.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["content-type"].startswith("text/html"), path
        assert_hardened(answer)
        page = parse(answer.text)
        assert page.inline == [], path
        assert {tag for tag, _ in page.loads} >= {"script", "link"}, path
        for tag, url in page.loads:
            # The one exception: the dashboard's empty favicon, `data:,` (allowed by img-src).
            if url.startswith("data:"):
                assert (tag, url) == ("link", "data:,"), path
                continue
            assert same_origin(url), (path, tag, url)
            loaded = await anonymous.get(url)
            assert loaded.status_code == 200, (path, url)
            assert loaded.headers["content-type"].startswith(MEDIA_TYPES[Path(url).suffix]), (path, url)
            assert_hardened(loaded)


async def test_the_docs_page_starts_swagger_ui_from_a_file_not_inline(anonymous):
    page = parse((await anonymous.get("/docs")).text)
    scripts = [url for tag, url in page.loads if tag == "script"]
    assert scripts == ["/docs/assets/swagger-ui-bundle.js", "/docs/assets/init.js"]
    init = (await anonymous.get("/docs/assets/init.js")).text
    assert "SwaggerUIBundle(" in init
    assert "validatorUrl: null" in init  # the default badge is an image from validator.swagger.io


async def test_stylesheets_import_nothing_from_another_host(anonymous):
    for path in ("/dashboard/style.css", "/docs/assets/swagger-ui.css"):
        css = (await anonymous.get(path)).text
        assert "@import" not in css, path
        urls = re.findall(r"url\(\s*['\"]?([^'\")]*)", css)
        assert all(url.startswith("data:") or same_origin(url) for url in urls), (path, urls)


async def test_fastapis_own_pages_are_not_served(anonymous):
    for path in NOT_SERVED:
        answer = await anonymous.get(path)
        assert answer.status_code == 404, path
        assert_hardened(answer)


def strings(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from strings(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v, key)
    elif isinstance(node, str):
        yield key, node


async def test_the_openapi_document_points_swagger_ui_at_no_other_host(anonymous):
    answer = await anonymous.get("/openapi.json")
    assert_hardened(answer)
    schema = answer.json()
    # Swagger UI fetches external $refs, calls `servers`, renders descriptions as Markdown (images too)
    # and links externalDocs and info's URLs. Examples and patterns are data, shown as text.
    assert "servers" not in schema
    assert not {"termsOfService", "contact", "license", "x-logo"} & set(schema["info"])
    found = list(strings(schema))
    assert all(v.startswith("#/") for k, v in found if k == "$ref")
    assert not [k for k, _ in found if k == "externalDocs"]
    assert not [v for k, v in found if k in ("description", "summary", "title") and "://" in v]
    assert "://" not in json.dumps(schema["info"])


async def test_every_static_file_is_served_with_the_headers(anonymous):
    files = [*static_files(DASHBOARD, "/dashboard"), *static_files(API_DOCS / "assets", "/docs/assets")]
    assert "/docs/assets/swagger-ui-bundle.js" in files
    for path in files:
        answer = await anonymous.get(path)
        assert answer.status_code == 200, path
        assert_hardened(answer)
        if Path(path).suffix in MEDIA_TYPES:  # nosniff: a script must come as a script, a sheet as CSS
            assert answer.headers["content-type"].startswith(MEDIA_TYPES[Path(path).suffix]), path


@pytest.mark.parametrize(
    ("token", "method", "path", "body", "status"),
    [
        (ADMIN, "GET", "/v1/servers", None, 200),
        (ADMIN, "GET", f"/v1/servers/{SERVERS[0]}", None, 200),
        (ADMIN, "POST", f"/v1/servers/{SERVERS[0]}/drain", None, 200),
        (None, "GET", "/v1/servers", None, 401),
        ("wrong", "POST", f"/v1/servers/{SERVERS[0]}/drain", None, 401),
        (READ, "POST", f"/v1/servers/{SERVERS[0]}/drain", None, 403),
        (ADMIN, "GET", "/v1/nothing", None, 404),
        (ADMIN, "GET", "/v1/servers/10.9.9.9:3389", None, 404),
        (None, "GET", "/dashboard/nothing.js", None, 404),
        (None, "GET", "/docs/assets/nothing.js", None, 404),
        (ADMIN, "PUT", "/v1/servers", None, 405),
        (ADMIN, "POST", "/v1/servers", b"{not json", 422),
        (ADMIN, "POST", "/v1/servers", b'{"address": "no port"}', 422),
        (None, "GET", "/healthz", None, 200),
        (None, "GET", "/readyz", None, 200),
        (None, "HEAD", "/dashboard/app.js", None, 200),
        (None, "HEAD", "/docs/assets/swagger-ui.css", None, 200),
    ],
)
async def test_api_answers_and_problems_carry_the_headers(service, token, method, path, body, status):
    async with client_for(service, token, BASE) as client:
        headers = {"content-type": "application/json"} if body is not None else {}
        answer = await client.request(method, path, content=body, headers=headers)
    assert answer.status_code == status, answer.text
    if status >= 400:
        assert answer.headers["content-type"] == "application/problem+json"
    assert_hardened(answer)


async def test_the_guards_refusals_carry_the_headers(service, pg_database_url):
    open_service = BrokerService(service.store, settings_for(pg_database_url, **NO_TOKENS))
    async with client_for(open_service, None, BASE) as client:
        misdirected = await client.get("/", headers={"Host": "evil.example"})
    assert misdirected.status_code == 421
    assert_hardened(misdirected)
    async with client_for(service, ADMIN, BASE) as client:
        cross = await client.post(
            f"/v1/servers/{SERVERS[0]}/drain", headers={"Origin": "http://evil.example"}
        )
    assert cross.status_code == 403
    assert cross.json()["title"] == "Cross-site request refused"
    assert_hardened(cross)


async def test_a_bugs_500_carries_the_headers(service, monkeypatch):
    # Starlette answers an unhandled exception from its outermost middleware, outside add_middleware's.
    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(service, "pool_summaries", broken)
    transport = httpx.ASGITransport(app=create_app(service), raise_app_exceptions=False)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(transport=transport, base_url=BASE, headers=headers) as client:
        answer = await client.get("/v1/pools")
    assert answer.status_code == 500
    assert_hardened(answer)
