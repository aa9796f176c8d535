"""Claimed probe targets carry their pool's probe settings, else the broker's RDBROKER_PROBE_* values."""

from __future__ import annotations

from rdbroker_broker import domain as d
from rdbroker_proto.v1 import broker_pb2 as pb
from tests.integration.broker.conftest import seed, server

FAST = d.Pool("fast", True, 3600.0, probe_interval_ms=500, probe_timeout_ms=400, probe_rise=1, probe_fall=5)
HALF = d.Pool("half", False, 3600.0, probe_fall=2)  # only fall set: the rest from the broker
POOLS = (FAST, HALF)


def settings_of(target) -> tuple[int, int, int, int]:
    return (target.interval_ms, target.timeout_ms, target.rise, target.fall)


async def test_targets_carry_the_pool_settings_else_the_brokers(probes, service, engine):
    await seed(engine, server("10.0.5.1:3389", "fast"), server("10.0.5.2:3389", "half"), pools=POOLS)
    broker = service.settings
    targets = {t.address: t for t in await probes.claim_targets("r1", 60_000)}
    assert settings_of(targets["10.0.5.1:3389"]) == (500, 400, 1, 5)
    assert settings_of(targets["10.0.5.2:3389"]) == (
        broker.probe_interval_ms,
        broker.probe_timeout_ms,
        broker.probe_rise,
        2,
    )


async def test_reapplying_changed_probe_settings_updates_the_pool(probes, engine):
    await seed(engine, server("10.0.5.1:3389", "fast"), pools=POOLS)
    slower = d.Pool(
        "fast", True, 3600.0, probe_interval_ms=5000, probe_timeout_ms=400, probe_rise=1, probe_fall=5
    )
    await seed(engine, server("10.0.5.1:3389", "fast"), pools=(slower, HALF))
    [target] = await probes.claim_targets("r1", 60_000)
    assert settings_of(target) == (5000, 400, 1, 5)


async def test_claim_answer_on_the_wire(broker, engine):
    await seed(engine, server("10.0.5.1:3389", "fast"), pools=POOLS)
    answer = await broker.stub.ClaimProbeTargets(
        pb.ClaimProbeTargetsRequest(replica_id="r1", lease_ms=60_000)
    )
    [target] = answer.targets
    assert settings_of(target) == (500, 400, 1, 5)
