"""What grpc.aio alone costs per Route call: a server whose handler returns a constant answer.

    .venv/bin/python bench/grpc_floor.py [--calls 8000] [--concurrency 16] [--telemetry] [--authz]

Starts the server in a child process (uvloop, as the broker runs) on 127.0.0.1 and prints calls/s and
the server process's CPU time per call: the floor under the broker's own CPU per route. With
`--telemetry` the server has the broker's tracing interceptor (`rdbroker_common.telemetry`, no exporter);
with `--authz` also its authorization interceptor (`rdbroker_common.rpc_authz`, bearer tokens), and the
client sends the proxy token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import grpc
import psutil
import uvloop

from rdbroker_common import rpc_authz, telemetry
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc


class ConstantBroker(broker_pb2_grpc.BrokerServicer):
    async def Route(self, request: pb.RouteRequest, context: Any) -> pb.RouteResponse:
        return pb.RouteResponse(
            server_address="10.0.0.1:3389",
            session_id="0" * 32,
            reason=pb.ROUTE_REASON_RECONNECT,
            user=request.cookie,
            pool="default",
        )


TOKEN = "bench-proxy-token"


async def serve(port: int, with_telemetry: bool, with_authz: bool) -> None:
    interceptors: list[grpc.aio.ServerInterceptor] = telemetry.server_interceptors() if with_telemetry else []
    if with_authz:
        policy = rpc_authz.Policy(
            {"/rdbroker.v1.Broker/Route": rpc_authz.PROXY}, tokens={rpc_authz.PROXY: TOKEN}
        )
        interceptors.append(rpc_authz.AuthzInterceptor(policy))
    server = grpc.aio.server(interceptors=interceptors or None)
    # Only Route is served: the other methods answer UNIMPLEMENTED, which is all a floor needs.
    broker_pb2_grpc.add_BrokerServicer_to_server(ConstantBroker(), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def measure(
    port: int, process: psutil.Process, calls: int, concurrency: int, label: str, token: bool
) -> None:
    metadata = (("authorization", f"Bearer {TOKEN}"),) if token else ()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = broker_pb2_grpc.BrokerStub(channel)
        await stub.Route(
            pb.RouteRequest(connection_id="warm"), timeout=30, wait_for_ready=True, metadata=metadata
        )
        remaining = list(range(calls))

        async def worker() -> None:
            while remaining:
                n = remaining.pop()
                request = pb.RouteRequest(connection_id=f"c{n}", proxy_id="bench", cookie=f"CORP\\user{n}")
                await stub.Route(request, timeout=30, metadata=metadata)

        times = process.cpu_times()
        cpu_before, start = times.user + times.system, time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for _ in range(concurrency):
                tasks.create_task(worker())
        elapsed = time.perf_counter() - start
        times = process.cpu_times()
        cpu_ms = (times.user + times.system - cpu_before) * 1000 / calls
        sys.stdout.write(
            f"grpc.aio floor{label}: {calls / elapsed:.0f} calls/s, server CPU {cpu_ms:.3f} ms/call, "
            f"{concurrency} concurrent clients, load average {os.getloadavg()[0]:.2f}\n"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--telemetry", action="store_true", help="with the broker's server interceptors")
    parser.add_argument("--authz", action="store_true", help="with the broker's authorization interceptor")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.serve:
        uvloop.run(serve(args.serve, args.telemetry, args.authz))
        return
    port = free_port()
    flags = [f for f, on in (("--telemetry", args.telemetry), ("--authz", args.authz)) if on]
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), *flags])
    label = f" ({', '.join(f.removeprefix('--') for f in flags)})" if flags else ""
    try:
        asyncio.run(measure(port, psutil.Process(child.pid), args.calls, args.concurrency, label, args.authz))
    finally:
        child.terminate()
        child.wait(10)


if __name__ == "__main__":
    main()
