"""The RDP probe: Connection Request (NEG_REQ, no cookie) -> Connection Confirm -> close.

A NEG_RSP, a NEG_FAILURE and a bare Confirm all prove the server's RDP stack answers. Nothing else
is sent (no TLS, no logon), so no session is created, and the socket is closed at once so the
server does not count an incomplete connection against its flood protection for long.

The health replicas probe every server with it; the broker probes a server the proxy could not reach
before it moves a user's session off it (failover on the first try).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from rdbroker_common.settings import split_host_port
from rdbroker_rdp import (
    PROTOCOL_HYBRID,
    PROTOCOL_SSL,
    X224Error,
    build_connection_request,
    parse_connection_confirm,
)

REQUESTED_PROTOCOLS = PROTOCOL_SSL | PROTOCOL_HYBRID
# A Connection Confirm is 11 or 19 bytes; anything longer without a complete one is not RDP.
MAX_CONFIRM_BYTES = 256


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    kind: str = ""  # "neg_rsp" | "neg_failure" | "confirm" when ok
    selected_protocol: int = 0
    failure_code: int = 0
    reason: str = ""  # why it failed
    latency_ms: int = 0

    @property
    def detail(self) -> str:
        """One line for operators: what the server answered, or why the probe failed."""
        if not self.ok:
            return self.reason
        if self.kind == "neg_rsp":
            return f"neg_rsp protocol={self.selected_protocol}"
        if self.kind == "neg_failure":
            return f"neg_failure code={self.failure_code}"
        return self.kind


async def probe_rdp(address: str, timeout_s: float) -> ProbeResult:
    """Probe `host:port` within `timeout_s` (connect and answer together). Never raises."""
    started = time.monotonic()
    try:
        host, port = split_host_port(address)
    except ValueError as exc:
        return ProbeResult(ok=False, reason=f"bad address: {exc}")
    writer: asyncio.StreamWriter | None = None
    stage = "connect"
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            stage = "answer"
            writer.write(build_connection_request(requested_protocols=REQUESTED_PROTOCOLS))
            await writer.drain()
            result = await _read_confirm(reader)
    except TimeoutError:
        result = ProbeResult(ok=False, reason=f"timeout waiting for {stage} after {timeout_s:g}s")
    except ConnectionRefusedError:
        result = ProbeResult(ok=False, reason="connection refused")
    except ConnectionResetError:
        result = ProbeResult(ok=False, reason="connection reset")
    except OSError as exc:
        result = ProbeResult(ok=False, reason=f"{stage} failed: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await writer.wait_closed()
    latency_ms = int((time.monotonic() - started) * 1000)
    return ProbeResult(
        ok=result.ok,
        kind=result.kind,
        selected_protocol=result.selected_protocol,
        failure_code=result.failure_code,
        reason=result.reason,
        latency_ms=latency_ms,
    )


async def _read_confirm(reader: asyncio.StreamReader) -> ProbeResult:
    buf = b""
    while True:
        chunk = await reader.read(MAX_CONFIRM_BYTES)
        if not chunk:
            return ProbeResult(
                ok=False, reason="closed before a connection confirm" if not buf else "truncated"
            )
        buf += chunk
        try:
            confirm = parse_connection_confirm(buf)
        except X224Error as exc:
            return ProbeResult(ok=False, reason=f"garbage: {exc}")
        if confirm is not None:
            kind = "confirm" if confirm.kind == "none" else confirm.kind
            return ProbeResult(
                ok=True,
                kind=kind,
                selected_protocol=confirm.selected_protocol,
                failure_code=confirm.failure_code,
            )
        if len(buf) > MAX_CONFIRM_BYTES:
            return ProbeResult(ok=False, reason="garbage: no connection confirm")
