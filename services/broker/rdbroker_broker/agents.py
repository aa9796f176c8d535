"""The broker as a client of the servers' agents, for session actions (session_actions.py).

An action goes to `<the server's sessions_url>/<action>`: the rdbroker-agent serves its session list at
`/sessions` and the actions beside it (`POST /sessions/logoff|disconnect|message`, body `{"user": ...,
"text": ...}`). It carries the token and uses the TLS settings the health replicas use for the same
agents (`RDBROKER_AGENT_TOKEN` or `agent_token_file`, `agent_tls_*`: rdbroker_common.agent_http).
Actions are rare, so each has a client of its own; renewed TLS files are looked at before each.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import httpx

from rdbroker_broker.config import BrokerSettings
from rdbroker_broker.errors import AgentFailed, AgentTimeout, Conflict
from rdbroker_common import agent_http
from rdbroker_common.bearer import Tokens
from rdbroker_common.https import TlsContext

log = logging.getLogger(__name__)

MAX_ANSWER = 64 * 1024  # bytes read of an agent's answer
MAX_REASON = 300  # characters of an agent's refusal quoted in ours
TOKEN_HINT = "set RDBROKER_AGENT_TOKEN (or --agent-token-file) on the brokers to the agent's token"


@dataclass(frozen=True)
class AgentAnswer:
    user: str  # as the server knows the user
    sessions: tuple[str, ...]  # the server's ids of the sessions acted on
    detail: str


def action_url(sessions_url: str, action: str, server: str) -> str:
    """`http://host:8088/sessions` -> `http://host:8088/sessions/<action>`; Conflict when the server
    has no usable sessions URL (the message says what to configure)."""
    if not sessions_url:
        raise Conflict(
            f"server {server} has no sessions_url, so no agent to act through: set it to its "
            f"rdbroker-agent's session list (e.g. `rdbroker servers set {server} --sessions-url "
            "http://<server>:8088/sessions` or sessions_url in the farm file)"
        )
    url = httpx.URL(sessions_url)
    if not url.path.rstrip("/").endswith("/sessions"):
        raise Conflict(
            f"server {server}'s sessions_url {sessions_url} is not an rdbroker-agent's /sessions: actions "
            "go to <sessions_url>/<action>, so point it at the agent's http(s)://<server>:8088/sessions"
        )
    return str(url.copy_with(path=url.path.rstrip("/") + f"/{action}", query=None))


class AgentCaller:
    def __init__(self, tokens: Tokens | None, tls: TlsContext | None, timeout_s: float) -> None:
        self.tokens = tokens
        self.tls = tls
        self.timeout_s = timeout_s

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> AgentCaller:
        """ValueError (TokenError is one) when the token or TLS settings cannot be used."""
        tokens = agent_http.agent_tokens(
            settings.agent_token.get_secret_value(), settings.agent_token_file, "--agent-token-file"
        )
        tls = agent_http.agent_tls(
            settings.agent_tls_ca,
            settings.agent_tls_cert,
            settings.agent_tls_key,
            "--agent-tls-ca/--agent-tls-cert/--agent-tls-key",
        )
        return cls(tokens, tls, settings.agent_action_timeout_s)

    async def act(self, url: str, action: str, user: str, text: str = "") -> AgentAnswer:
        """POST the action; AgentFailed (AgentTimeout) saying what the agent answered, or why none came."""
        body: dict[str, str] = {"user": user}
        if action == "message":
            body["text"] = text
        headers = {"Authorization": self.tokens.header()} if self.tokens is not None else {}
        if self.tls is not None:
            self.tls.refresh()
        where = f"the agent at {url}"
        try:
            async with (
                agent_http.agent_client(
                    self.tls.context if self.tls is not None else None, timeout=self.timeout_s
                ) as client,
                client.stream("POST", url, json=body, headers=headers) as response,
            ):
                answer = await _read(response)
        except httpx.TimeoutException as exc:
            raise AgentTimeout(f"{where} did not answer within {self.timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise AgentFailed(f"{where} is unreachable: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise AgentFailed(f"{where} is unreachable: {exc}") from exc
        return _answer(response.status_code, answer, where)


async def _read(response: httpx.Response) -> bytes:
    data = b""
    async for chunk in response.aiter_bytes():
        data += chunk
        if len(data) > MAX_ANSWER:
            break
    return data[:MAX_ANSWER]


def _answer(status: int, data: bytes, where: str) -> AgentAnswer:
    text = data.decode("utf-8", errors="replace").strip()
    if status in (401, 403):
        raise AgentFailed(f"{where} refused our credentials ({status}): {TOKEN_HINT}")
    if status == 404 and text.startswith("not found: try"):
        raise AgentFailed(f"{where} has no such action (404): is it an rdbroker-agent of this version?")
    if status != 200:
        reason = "".join(ch if ch.isprintable() else " " for ch in text)[:MAX_REASON]
        raise AgentFailed(f"{where} answered {status}: {reason or '(no reason given)'}")
    try:
        found = json.loads(text)
        sessions = tuple(str(s) for s in found["sessions"])
        return AgentAnswer(str(found["user"]), sessions, str(found["detail"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise AgentFailed(f"{where} answered 200 without its JSON result ({type(exc).__name__})") from exc
