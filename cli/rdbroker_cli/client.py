"""A small synchronous client of the broker's REST API (docs/api.md), for the admin verbs.

Every failure becomes an `ApiError` whose message is one line a person can act on: the broker's
problem+json title and detail, or what went wrong reaching it.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"


class ApiError(Exception):
    """The call failed; `str(error)` is the one line to show. `status` is the HTTP status, 0 if none."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def path_part(value: str) -> str:
    """A server address or user name as one path segment (`10.0.0.1:3389` stays readable)."""
    return quote(value, safe=":@")


def problem_message(response: httpx.Response) -> str:
    """One line from an error answer: `404 Server not found: no server is registered at ...`."""
    title, detail = "", ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        title = str(body.get("title") or "")
        raw_detail = body.get("detail")
        # FastAPI's own errors put a string or a list of field errors in `detail`.
        detail = raw_detail if isinstance(raw_detail, str) else json.dumps(raw_detail) if raw_detail else ""
    if not title:
        title = response.reason_phrase or "error"
    text = f"{response.status_code} {title}"
    if detail and detail != title:
        text += f": {detail}"
    return " ".join(text.split())  # one line, whatever the server put in it


class ApiClient:
    def __init__(self, url: str, token: str = "", timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ApiError(f"the API URL must start with http:// or https://, got {url!r}")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; the decoded JSON answer (None for 204), or ApiError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ApiError(f"the broker at {self.url} did not answer in time ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            raise ApiError(f"cannot reach the broker at {self.url}: {reason}") from exc
        if response.status_code >= 400:
            raise ApiError(problem_message(response), response.status_code)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise ApiError(
                f"the broker at {self.url} answered {response.status_code} with something that is not JSON"
            ) from exc

    # --- the calls the verbs use ---------------------------------------------------------------

    def list_servers(self, pool: str = "") -> list[dict[str, Any]]:
        params = {"pool": pool} if pool else {}
        return _items(self.request("GET", "/v1/servers", params=params), "servers")

    def server_action(self, address: str, action: str) -> dict[str, Any]:
        return _object(self.request("POST", f"/v1/servers/{path_part(address)}/{action}"))

    def start_drain(self, address: str, body: dict[str, Any]) -> dict[str, Any]:
        """A drain until empty; the server with its `drain`."""
        return _object(self.request("POST", f"/v1/servers/{path_part(address)}/drain", json=body))

    def get_drain(self, address: str) -> dict[str, Any]:
        return _object(self.request("GET", f"/v1/servers/{path_part(address)}/drain"))

    def cancel_drain(self, address: str) -> dict[str, Any]:
        return _object(self.request("DELETE", f"/v1/servers/{path_part(address)}/drain"))

    def add_server(self, body: dict[str, Any]) -> dict[str, Any]:
        return _object(self.request("POST", "/v1/servers", json=body))

    def update_server(self, address: str, body: dict[str, Any]) -> dict[str, Any]:
        return _object(self.request("PATCH", f"/v1/servers/{path_part(address)}", json=body))

    def remove_server(self, address: str, force: bool) -> None:
        params = {"force": "true"} if force else {}
        self.request("DELETE", f"/v1/servers/{path_part(address)}", params=params)

    def list_pools(self) -> list[dict[str, Any]]:
        return _items(self.request("GET", "/v1/pools"), "pools")

    def get_pool(self, name: str) -> dict[str, Any]:
        return _object(self.request("GET", f"/v1/pools/{path_part(name)}"))

    def update_pool(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return _object(self.request("PATCH", f"/v1/pools/{path_part(name)}", json=body))

    def lookup_user(self, user: str, pool: str = "", include_ended: bool = False) -> list[dict[str, Any]]:
        params: dict[str, str] = {}
        if pool:
            params["pool"] = pool
        if include_ended:
            params["include_ended"] = "true"
        answer = self.request("GET", f"/v1/users/{path_part(user)}/sessions", params=params)
        return _items(answer, "sessions")

    def list_sessions(self, params: list[tuple[str, str]]) -> dict[str, Any]:
        answer = _object(self.request("GET", "/v1/sessions", params=params))
        _items(answer, "items")
        return answer

    def end_session(self, session_id: str) -> dict[str, Any]:
        return _object(self.request("DELETE", f"/v1/sessions/{path_part(session_id)}"))

    def explain_route(self, user: str, client: str = "", pool: str = "") -> dict[str, Any]:
        params = {"user": user} | ({"client": client} if client else {}) | ({"pool": pool} if pool else {})
        return _object(self.request("GET", "/v1/route/explain", params=params))

    def session_action(self, session_id: str, action: str, text: str | None = None) -> dict[str, Any]:
        """`logoff`, `disconnect` or `message` (with `text`) through the session's server's agent."""
        body = {"text": text} if text is not None else None
        answer = _object(self.request("POST", f"/v1/sessions/{path_part(session_id)}/{action}", json=body))
        _object(answer.get("session"))
        return answer

    def list_audit(self, params: list[tuple[str, str]]) -> dict[str, Any]:
        answer = _object(self.request("GET", "/v1/audit", params=params))
        _items(answer, "items")
        return answer


def _object(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise ApiError("the broker's answer is not a JSON object")
    return answer


def _items(answer: Any, key: str) -> list[dict[str, Any]]:
    items = _object(answer).get(key)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ApiError(f"the broker's answer has no list of {key}")
    return items
