"""Who may call which RPC of an rdbroker gRPC server: a server interceptor checking each call's role.

A caller proves a role with a client certificate carrying the URI SAN `spiffe://<trust-domain>/rdbroker/<role>`
(when the server runs mutual TLS), or else with `authorization: Bearer <token>` metadata matching the
token configured for that role. Each method belongs to one role (a table per server; methods not in it
belong to `default_role`), and a role calls only its own methods. grpc.health.v1 stays open to anyone:
kubelet probes carry no credentials.

Missing or unknown credentials are UNAUTHENTICATED, a role outside its methods PERMISSION_DENIED; both
are counted (`rdbroker_grpc_refused_total{reason,method}`) and logged at most once per `LOG_INTERVAL_S`
per reason. With neither TLS nor a token configured the policy is open: every caller may call
everything (allowed on loopback only, `exposure_refusal`).

The identity is handed to `bind` around the servicer method, in the task that runs it, so a contextvar
set there is what the method sees.
"""

from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from rdbroker_common.settings import is_loopback, split_host_port

log = logging.getLogger(__name__)

PROXY, HEALTH, ADMIN = "proxy", "health", "admin"
ROLES = (PROXY, HEALTH, ADMIN)
OPEN_ACTOR = "open"
# Anyone may ask a server whether it serves: kubelet probes present no credentials.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
DEFAULT_TRUST_DOMAIN = "rdbroker.local"
LOG_INTERVAL_S = 10.0
# SPIFFE: a trust domain is lowercase letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")

# Refusal reasons (the metric's `reason` label).
NO_CREDENTIALS, BAD_TOKEN, WRONG_ROLE = "no_credentials", "bad_token", "wrong_role"


def check_trust_domain(value: str) -> str:
    """A SPIFFE trust domain (`corp.example`); raises ValueError naming the setting."""
    text = value.strip()
    if not _TRUST_DOMAIN.fullmatch(text):
        raise ValueError(
            f"grpc_trust_domain {value!r} is not a SPIFFE trust domain "
            "(lowercase letters, digits, '.', '-', '_'; no scheme or path)"
        )
    return text


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call authenticated as: `actor` is "token:<role>", the certificate's SPIFFE ID or "open"."""

    actor: str
    role: str
    client: str  # the peer, as grpc names it ("ipv4:10.0.0.7:51234")


@dataclass(frozen=True)
class Policy:
    """Which role each method needs and how callers prove a role.

    `methods` maps full method names ("/rdbroker.v1.Broker/Route") to roles; any other method needs
    `default_role`. `tokens` maps roles to their bearer tokens: a comma-separated list, so that during a
    rotation the old and the new token both work (empty entries are ignored).
    """

    methods: Mapping[str, str]
    tokens: Mapping[str, str] = field(default_factory=dict, repr=False)  # secrets: never in a log line
    mtls: bool = False
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_role: str = ADMIN
    server: str = "this server"  # for messages: "the broker", "the health replica"
    _accepted: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)  # role -> tokens

    def __post_init__(self) -> None:
        for method, role in self.methods.items():
            if role not in ROLES:
                raise ValueError(f"{method}: unknown role {role!r}")
        split = {
            role: tuple(t.strip() for t in text.split(",") if t.strip()) for role, text in self.tokens.items()
        }
        object.__setattr__(self, "_accepted", {role: tokens for role, tokens in split.items() if tokens})
        for role in self._accepted:
            if role not in ROLES:
                raise ValueError(f"token for unknown role {role!r}")
        object.__setattr__(self, "trust_domain", check_trust_domain(self.trust_domain))

    @property
    def open(self) -> bool:
        """Neither certificates nor tokens: every caller may call everything."""
        return not self.mtls and not self._accepted

    @property
    def token_roles(self) -> frozenset[str]:
        """The roles a bearer token can be had for."""
        return frozenset(self._accepted)

    @property
    def spiffe_prefix(self) -> str:
        return f"spiffe://{self.trust_domain}/rdbroker/"

    def role_for(self, method: str) -> str:
        return self.methods.get(method, self.default_role)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message


def authenticate(
    policy: Policy, metadata: Iterable[tuple[str, Any]], auth: Mapping[str, Any], peer: str
) -> Identity:
    """The caller's identity: its certificate's role, else its bearer token. Raises Refused."""
    seen = ""
    if policy.mtls:
        role, seen = _certificate_role(policy, auth)
        if role:
            return Identity(actor=seen, role=role, client=peer)
    token = _bearer(metadata)
    if token is not None:
        role = _token_role(policy, token)
        if role:
            return Identity(actor=f"token:{role}", role=role, client=peer)
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            BAD_TOKEN,
            f"the bearer token matches no role of {policy.server}: send the token it has for your role "
            "(RDBROKER_BROKER_TOKEN or --broker-token-file on the caller)",
        )
    raise Refused(grpc.StatusCode.UNAUTHENTICATED, NO_CREDENTIALS, _missing(policy, seen))


def authorize(policy: Policy, identity: Identity, method: str) -> None:
    """Raises Refused (PERMISSION_DENIED) unless `identity`'s role may call `method`."""
    needed = policy.role_for(method)
    if identity.role != needed:
        name = method.rsplit("/", 1)[-1]
        raise Refused(
            grpc.StatusCode.PERMISSION_DENIED,
            WRONG_ROLE,
            f"{identity.actor} (role {identity.role}) may not call {name}: it needs the {needed} role "
            f"({_how(policy, needed)})",
        )


def _missing(policy: Policy, seen: str) -> str:
    ways = []
    if policy.mtls:
        ways.append(f"a client certificate with the URI SAN {policy.spiffe_prefix}<role>")
    if policy.token_roles:
        ways.append("`authorization: Bearer <token>` metadata (RDBROKER_BROKER_TOKEN or --broker-token-file)")
    got = f" (the certificate names {seen})" if seen else ""
    return f"{policy.server} needs credentials{got}: {' or '.join(ways)}"


def _how(policy: Policy, role: str) -> str:
    ways = []
    if policy.mtls:
        ways.append(f"a certificate for {policy.spiffe_prefix}{role}")
    if role in policy.token_roles:
        ways.append(f"the {role} token")
    return " or ".join(ways) or f"no credential for {role} is configured"


def _certificate_role(policy: Policy, auth: Mapping[str, Any]) -> tuple[str, str]:
    """(role, SPIFFE ID) from the peer certificate's URI SANs; role "" when none names one of ours.

    grpc lists every URI SAN under `peer_uri` (`peer_spiffe_id` only when there is exactly one). A
    certificate naming several rdbroker roles names none: SPIFFE allows one ID per certificate.
    """
    ids = [_text(u) for u in auth.get("peer_uri", ()) if _text(u).startswith("spiffe://")]
    prefix = policy.spiffe_prefix
    ours = [i for i in ids if i.startswith(prefix) and i[len(prefix) :] in ROLES]
    if len(ours) == 1:
        return ours[0][len(prefix) :], ours[0]
    return "", ", ".join(ids)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bearer(metadata: Iterable[tuple[str, Any]]) -> str | None:
    """The token of the first `authorization` entry ("" for a malformed one), None when there is none."""
    for key, value in metadata:
        if key == "authorization":
            scheme, _, token = _text(value).strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _token_role(policy: Policy, token: str) -> str:
    """The role whose token this is, "" for none. Every configured token is compared, in constant time."""
    given = token.encode()
    found = ""
    for role, accepted in policy._accepted.items():
        for expected in accepted:
            if hmac.compare_digest(given, expected.encode()):
                found = role
    return found


# --- counting and logging refusals -----------------------------------------------------------------

_meter = metrics.get_meter("rdbroker_common")
_refused: dict[tuple[str, str], int] = {}
_logged: dict[str, tuple[float, int]] = {}  # reason -> (last logged at, refusals since)
_log_lock = threading.Lock()


def _observe(_options: CallbackOptions) -> Iterable[Observation]:
    return [
        Observation(count, {"reason": reason, "method": method})
        for (reason, method), count in _refused.copy().items()
    ]


_meter.create_observable_counter(
    "rdbroker_grpc_refused",
    callbacks=[_observe],
    description="gRPC calls refused for their credentials, by reason (no_credentials/bad_token/wrong_role) "
    "and method",
)


def refused_count(reason: str, method: str) -> int:
    """How many calls to `method` ("rdbroker.v1.Broker/Route") were refused for `reason` (tests, status)."""
    return _refused.get((reason, method), 0)


def record_refusal(refusal: Refused, method: str, peer: str, interval_s: float = LOG_INTERVAL_S) -> None:
    name = method.lstrip("/")
    key = (refusal.reason, name)
    _refused[key] = _refused.get(key, 0) + 1
    now = time.monotonic()
    with _log_lock:
        last, since = _logged.get(refusal.reason, (float("-inf"), 0))
        if now - last < interval_s:
            _logged[refusal.reason] = (last, since + 1)
            return
        _logged[refusal.reason] = (now, 0)
    log.warning(
        "refused %s from %s: %s",
        name,
        peer,
        refusal.message,
        extra={"reason": refusal.reason, "method": name, "peer": peer, "refused_unlogged": since},
    )


# --- the interceptor -------------------------------------------------------------------------------

Bind = Callable[[Identity], AbstractContextManager[object]]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the type stubs only
Continuation: TypeAlias = Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]]


def _no_binding(_identity: Identity) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


class AuthzInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call against `policy`, then runs the servicer method inside `bind(identity)`."""

    def __init__(self, policy: Policy, bind: Bind = _no_binding) -> None:
        self.policy = policy
        self.bind = bind
        # Wrapped handlers per method: grpc hands the same handler object for a method every call.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in OPEN_METHODS:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def check(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
        """The caller's identity if it may call `method`; raises Refused (recorded) otherwise."""
        policy = self.policy
        peer = context.peer()
        if policy.open:
            return Identity(actor=OPEN_ACTOR, role=policy.role_for(method), client=peer)
        try:
            auth = context.auth_context() if policy.mtls else {}
            identity = authenticate(policy, context.invocation_metadata() or (), auth, peer)
            authorize(policy, identity, method)
        except Refused as refusal:
            record_refusal(refusal, method, peer)
            raise
        return identity

    def _wrap(self, method: str, handler: Handler) -> Handler:
        check, bind = self.check, self.bind

        def unary_response(inner: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    identity = check(method, context)
                except Refused as refusal:
                    await context.abort(refusal.code, refusal.message)
                with bind(identity):
                    return await inner(request, context)

            return behavior

        def stream_response(inner: Callable[..., Any]) -> Callable[..., Any]:
            if not inspect.isasyncgenfunction(inner):  # writes with context.write(): a coroutine
                return unary_response(inner)

            async def behavior(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    identity = check(method, context)
                except Refused as refusal:
                    await context.abort(refusal.code, refusal.message)
                with bind(identity):
                    async for response in inner(request, context):
                        yield response

            return behavior

        kinds = {
            "unary_unary": (handler.unary_unary, unary_response, grpc.unary_unary_rpc_method_handler),
            "stream_unary": (handler.stream_unary, unary_response, grpc.stream_unary_rpc_method_handler),
            "unary_stream": (handler.unary_stream, stream_response, grpc.unary_stream_rpc_method_handler),
            "stream_stream": (handler.stream_stream, stream_response, grpc.stream_stream_rpc_method_handler),
        }
        for inner, wrap, make in kinds.values():
            if inner is not None:
                return make(
                    wrap(inner),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler


def exposure_refusal(listen: str, policy: Policy, *, insecure: bool, token_names: str) -> str | None:
    """Why a server may not start open on `listen`, or None: a gRPC port without TLS or tokens serves
    anyone who can reach it, so only loopback may be open unless `--insecure-grpc` says so."""
    if not policy.open or insecure:
        return None
    host = split_host_port(listen)[0]
    if is_loopback(host):
        return None
    return (
        f"{policy.server} would serve gRPC on {listen} to anyone: set {token_names}, or mutual TLS "
        "(--tls-ca/--tls-cert/--tls-key), or listen on 127.0.0.1, or give --insecure-grpc "
        "(RDBROKER_INSECURE_GRPC) to serve it open on purpose"
    )
