"""The replica's work: claim a share of the servers from the broker, probe each, report the results.

One claim loop renews this replica's leases every lease/3 and starts or stops one probe loop per held
server; a report loop sends the results in batches. Probing stops when the lease lapses (the broker
could not be reached to renew it), so a server is never probed by two replicas for long: the broker
hands an expired lease to another replica, and this one has stopped by then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from opentelemetry import trace

from rdbroker_common.bearer import Tokens
from rdbroker_health import metrics
from rdbroker_health.config import HealthSettings
from rdbroker_health.errors import BrokerError
from rdbroker_health.hysteresis import Health, Hysteresis
from rdbroker_health.probes import http as http_probe
from rdbroker_health.probes import rdp
from rdbroker_health.probes.rdp import RdpProbe
from rdbroker_health.rpc import convert
from rdbroker_health.rpc.broker_client import Broker
from rdbroker_proto.v1 import broker_pb2

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("rdbroker.health")


@dataclass
class Target:
    """A held server with the pool's probe settings (the replica's defaults where the pool has none)."""

    address: str
    pool: str
    agent_url: str
    sessions_url: str
    interval_s: float
    timeout_s: float
    rise: int
    fall: int
    sessions_interval_s: float

    @classmethod
    def from_wire(cls, wire: broker_pb2.ProbeTarget, settings: HealthSettings) -> Target:
        return cls(
            address=wire.address,
            pool=wire.pool,
            agent_url=wire.agent_url,
            sessions_url=wire.sessions_url,
            interval_s=wire.interval_ms / 1000 if wire.interval_ms else settings.probe_interval_s,
            timeout_s=wire.timeout_ms / 1000 if wire.timeout_ms else settings.probe_timeout_s,
            rise=wire.rise or settings.rise,
            fall=wire.fall or settings.fall,
            sessions_interval_s=(
                wire.sessions_interval_ms / 1000
                if wire.sessions_interval_ms
                else settings.sessions_interval_s
            ),
        )

    def update(self, other: Target) -> None:
        """Take a newer copy's settings in place: the server's probe loop reads them each round."""
        for item in dataclasses.fields(self):
            setattr(self, item.name, getattr(other, item.name))


class Scheduler:
    def __init__(
        self,
        settings: HealthSettings,
        broker: Broker,
        replica_id: str,
        http: httpx.AsyncClient,
        *,
        probe_rdp: RdpProbe = rdp.probe_rdp,
        rng: random.Random | None = None,
        agent_tokens: Tokens | None = None,
    ) -> None:
        self.settings = settings
        self.agent_tokens = agent_tokens
        self.broker = broker
        self.replica_id = replica_id
        self.http = http
        self.probe_rdp = probe_rdp
        self.rng = rng or random.Random()
        self.lease_s = settings.lease_ms / 1000
        self._lease_until = 0.0  # monotonic time our leases run out, as far as we know
        self._targets: dict[str, Target] = {}
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._health: dict[str, Hysteresis] = {}  # state per held server, read by the metrics
        self._pending: dict[str, broker_pb2.ProbeResult] = {}  # latest result per server, not yet sent
        self._have_pending = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._claim_failing = False
        self._report_failing = False
        self._refusing_urls: set[str] = set()  # agent URLs that refused our token when last asked

    def agent_urls(self) -> set[str]:
        """The agent and session-list URLs of the held servers: the broker's, so the token may go there."""
        return {url for t in self._targets.values() for url in (t.agent_url, t.sessions_url) if url}

    def _authorization(self) -> str | None:
        return self.agent_tokens.header() if self.agent_tokens is not None else None

    def _note_refusal(self, target: Target, url: str, refused: bool, detail: str) -> None:
        """Warn once when an agent URL starts refusing our token; tell when it accepts it again."""
        extra = {"server": target.address, "pool": target.pool}
        if refused and url not in self._refusing_urls:
            self._refusing_urls.add(url)
            log.warning("agent of %s at %s: %s", target.address, url, detail, extra=extra)
        elif not refused and url in self._refusing_urls:
            self._refusing_urls.discard(url)
            log.info("agent of %s at %s answers us again", target.address, url, extra=extra)

    @property
    def held(self) -> set[str]:
        """Addresses this replica probes now."""
        return set(self._loops)

    def server_states(self) -> dict[str, bool]:
        """Held servers whose state is known: True up, False down (the `rdbroker_server_up` gauge)."""
        return {
            address: hysteresis.state is Health.UP
            for address, hysteresis in self._health.items()
            if hysteresis.state is not Health.UNKNOWN
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Claim, probe and report until `stop` is set; then stop every loop and send what is left."""
        metrics.publish_server_states(self.server_states)
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                claim = tg.create_task(self._claim_loop(), name="claim")
                report = tg.create_task(self._report_loop(), name="report")
                await stop.wait()
                for task in [claim, report, *self._loops.values()]:
                    task.cancel()
        finally:
            metrics.withdraw_server_states(self.server_states)
            self._loops.clear()
            self._health.clear()
        self._tg = None
        await self._flush()
        if self._pending:
            log.warning("%d probe results not delivered at shutdown", len(self._pending))
            metrics.report_drops.add(len(self._pending))

    # Claims ----------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while True:
            sent = time.monotonic()
            try:
                wire_targets = await self.broker.claim(self.replica_id, self.settings.lease_ms)
            except BrokerError as exc:
                # Warn once per outage, not every lease/3.
                log.log(logging.DEBUG if self._claim_failing else logging.WARNING, "claiming failed: %s", exc)
                self._claim_failing = True
                if self._loops and time.monotonic() >= self._lease_until:
                    log.warning("leases lapsed; stopping %d probe loops", len(self._loops))
                    self._reconcile([])
            else:
                if self._claim_failing:
                    log.info("claiming works again")
                    self._claim_failing = False
                self._lease_until = sent + self.lease_s
                self._reconcile([Target.from_wire(t, self.settings) for t in wire_targets], wire_targets)
            await asyncio.sleep(max(0.0, sent + self.lease_s / 3 - time.monotonic()))

    def _reconcile(self, targets: list[Target], wire: list[broker_pb2.ProbeTarget] | None = None) -> None:
        """Start loops for newly held servers, stop those no longer held, update the others' settings."""
        assert self._tg is not None
        wanted = {t.address: t for t in targets}
        for address in set(self._loops) - set(wanted):
            self._stop_loop(address, "no longer held")
        states = {w.address: convert.health_from_wire(w.health) for w in wire or []}
        for address, target in wanted.items():
            if address in self._loops:
                self._targets[address].update(target)
                hysteresis = self._health[address]
                down = states.get(address) is Health.DOWN
                if down and hysteresis.state is not Health.DOWN and hysteresis.last_failed:
                    # The broker's own probe found it dead (a proxy could not reach it); our last
                    # probe failed too: resume from DOWN, so it takes `rise` good probes to come back.
                    log.info("%s: the broker recorded it down; resuming from there", address)
                    hysteresis.resume(Health.DOWN)
                continue
            self._targets[address] = target
            state = states.get(address, Health.UNKNOWN)
            log.info("probing %s (pool %r, starting %s)", address, target.pool, state.value)
            hysteresis = Hysteresis(state, target.rise, target.fall)
            self._health[address] = hysteresis
            self._loops[address] = self._tg.create_task(
                self._server_loop(target, hysteresis), name=f"probe {address}"
            )

    def _stop_loop(self, address: str, why: str) -> None:
        task = self._loops.pop(address, None)
        target = self._targets.pop(address, None)
        self._health.pop(address, None)
        if target is not None:
            self._refusing_urls -= {target.agent_url, target.sessions_url}
        if task is not None:
            log.info("stopped probing %s: %s", address, why)
            task.cancel()

    # Probing ---------------------------------------------------------------------------------

    async def _server_loop(self, target: Target, hysteresis: Hysteresis) -> None:
        """The server's probes and, at their own interval, its session list: a slow or hanging
        session source never delays a probe, nor a probe a session list."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._probe_loop(target, hysteresis))
            tg.create_task(self._sessions_loop(target))

    async def _probe_loop(self, target: Target, hysteresis: Hysteresis) -> None:
        # A short random offset so loops claimed together do not probe in step.
        await asyncio.sleep(self.rng.uniform(0, target.interval_s * self.settings.probe_jitter))
        while True:
            started = time.monotonic()
            if started < self._lease_until:
                hysteresis.rise, hysteresis.fall = target.rise, target.fall
                try:
                    await self._probe_once(target, hysteresis)
                except Exception:  # a bug must not stop the other servers' probes
                    log.exception("probe round for %s failed", target.address)
            jitter = self.rng.uniform(-self.settings.probe_jitter, self.settings.probe_jitter)
            await asyncio.sleep(max(0.0, started + target.interval_s * (1 + jitter) - time.monotonic()))

    async def _sessions_loop(self, target: Target) -> None:
        """Read the session list every `sessions_interval_s` (the target's, read each round): a
        logoff on the server reaches the broker within about one interval."""
        await asyncio.sleep(self.rng.uniform(0, target.sessions_interval_s * self.settings.probe_jitter))
        while True:
            started = time.monotonic()
            if target.sessions_url and started < self._lease_until:
                try:
                    await self._report_sessions(target)
                except Exception:  # a bug must not stop this server's probes
                    log.exception("session list round for %s failed", target.address)
            await asyncio.sleep(max(0.0, started + target.sessions_interval_s - time.monotonic()))

    async def _probe_once(self, target: Target, hysteresis: Hysteresis) -> None:
        attributes = {"server.address": target.address, "rdbroker.pool": target.pool}
        with _tracer.start_as_current_span("probe", attributes=attributes) as span:
            await self._probe_traced(target, hysteresis, span)

    async def _probe_traced(self, target: Target, hysteresis: Hysteresis, span: trace.Span) -> None:
        probed_at = datetime.now(UTC)
        async with asyncio.TaskGroup() as tg:
            rdp_task = tg.create_task(self.probe_rdp(target.address, target.timeout_s))
            agent_task = (
                tg.create_task(
                    http_probe.probe_agent(
                        self.http, target.agent_url, target.timeout_s, self._authorization()
                    )
                )
                if target.agent_url
                else None
            )
        rdp_result = rdp_task.result()
        agent = agent_task.result() if agent_task is not None else None
        transition = hysteresis.observe(rdp_result.ok)
        span.set_attribute("rdbroker.probe.rdp_ok", rdp_result.ok)
        span.set_attribute("rdbroker.server.health", hysteresis.state.value)
        if agent is not None:
            span.set_attribute("rdbroker.probe.agent_ok", agent.ok)
        if not rdp_result.ok:
            span.set_status(trace.Status(trace.StatusCode.ERROR, rdp_result.detail[:200]))
        server = {"server": target.address}
        metrics.probe_results.add(1, {**server, "probe": "rdp", "outcome": _outcome(rdp_result.ok)})
        if agent is not None:
            outcome = "refused" if agent.refused else _outcome(agent.ok)
            metrics.probe_results.add(1, {**server, "probe": "agent", "outcome": outcome})
            self._note_refusal(target, target.agent_url, agent.refused, agent.detail)
        if transition is not None:
            log.log(
                logging.WARNING if transition.after is Health.DOWN else logging.INFO,
                "server %s is %s (was %s): %s",
                target.address,
                transition.after.value.upper(),
                transition.before.value,
                rdp_result.detail,
                extra={"server": target.address, "pool": target.pool},
            )
        if agent is not None and not agent.ok:
            log.debug("agent of %s failed: %s", target.address, agent.detail)
        self._pending[target.address] = convert.probe_result(
            target.address, hysteresis.state, rdp_result, agent, probed_at
        )
        self._have_pending.set()

    async def _report_sessions(self, target: Target) -> None:
        # Taken before asking: anything that changed after this moment, the list may not show.
        listed_at = datetime.now(UTC)
        result = await http_probe.fetch_sessions(
            self.http, target.sessions_url, target.timeout_s, self._authorization()
        )
        self._note_refusal(target, target.sessions_url, result.refused, result.detail)
        if not result.ok:
            # A refusal is warned about once (_note_refusal), not at every list.
            level = logging.DEBUG if result.refused else logging.WARNING
            log.log(level, "session list of %s not reported: %s", target.address, result.detail)
            return
        try:
            answer = await self.broker.report_sessions(
                self.replica_id,
                target.address,
                convert.reported_sessions(result.sessions),
                result.omits_disconnected,
                listed_at,
            )
        except BrokerError as exc:
            log.warning("reporting the session list of %s failed: %s", target.address, exc)
            return
        if answer.ended or answer.recorded or answer.linked:
            log.info(
                "sessions of %s reconciled: %d ended, %d recorded, %d linked",
                target.address,
                answer.ended,
                answer.recorded,
                answer.linked,
            )

    # Reports ---------------------------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            await self._have_pending.wait()
            await asyncio.sleep(self.settings.report_batch_s)  # gather a batch
            if not await self._flush():
                await asyncio.sleep(self.lease_s / 3)  # the broker is away: retry at the claims' pace

    async def _flush(self) -> bool:
        """Send the pending results; on failure keep them (newer results replace older) for next time."""
        batch, self._pending = self._pending, {}
        self._have_pending.clear()
        if not batch:
            return True
        try:
            rejected = await self.broker.report_results(self.replica_id, list(batch.values()))
        except (BrokerError, asyncio.CancelledError) as exc:
            if not isinstance(exc, asyncio.CancelledError):
                level = logging.DEBUG if self._report_failing else logging.WARNING
                log.log(level, "reporting %d probe results failed: %s", len(batch), exc)
                self._report_failing = True
            replaced = [address for address in batch if address in self._pending]
            metrics.report_drops.add(len(replaced))
            for address, result in batch.items():
                self._pending.setdefault(address, result)
            self._have_pending.set()
            if isinstance(exc, asyncio.CancelledError):
                raise  # stopping: run() sends what is kept once more
            return False
        if self._report_failing:
            log.info("reporting works again")
            self._report_failing = False
        metrics.report_drops.add(len(rejected))
        for address in rejected:
            self._stop_loop(address, "the broker says this replica holds no lease on it")
        return True


def _outcome(ok: bool) -> str:
    return "ok" if ok else "fail"
