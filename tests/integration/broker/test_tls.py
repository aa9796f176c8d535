"""Mutual TLS on the broker's gRPC port (certificates made with the openssl command)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import grpc
import pytest

from rdbroker_broker.app import serve
from rdbroker_proto.v1 import broker_pb2 as pb
from rdbroker_proto.v1 import broker_pb2_grpc
from tests.integration.broker.conftest import settings_for


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(root: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=rdbroker test CA", cwd=root)  # fmt: skip
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=root)  # fmt: skip
        # The client is a proxy: its role is the URI SAN (rpc/authz.py).
        role = ",URI:spiffe://rdbroker.local/rdbroker/proxy" if name == "client" else ""
        (root / f"{name}.ext").write_text(f"subjectAltName=IP:127.0.0.1,DNS:localhost{role}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=root)  # fmt: skip


async def test_mutual_tls(pg_database_url, engine, tmp_path):
    make_pki(tmp_path)
    settings = settings_for(
        pg_database_url,
        tls_ca=str(tmp_path / "ca.pem"),
        tls_cert=str(tmp_path / "server.pem"),
        tls_key=str(tmp_path / "server.key"),
    )
    ready, stop = asyncio.Event(), asyncio.Event()
    bound: dict[str, int] = {}
    task = asyncio.get_running_loop().create_task(serve(settings, ready, stop, bound))
    try:
        await asyncio.wait_for(ready.wait(), 30)
        target = f"localhost:{bound['grpc']}"
        ca = (tmp_path / "ca.pem").read_bytes()
        good = grpc.ssl_channel_credentials(
            ca, (tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes()
        )
        async with grpc.aio.secure_channel(target, good) as channel:
            answer = await broker_pb2_grpc.BrokerStub(channel).ProxyHeartbeat(
                pb.ProxyHeartbeatRequest(proxy_id="p1"), timeout=10
            )
            assert answer.heartbeat_interval_ms == 5000
        async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await broker_pb2_grpc.BrokerStub(channel).ProxyHeartbeat(
                    pb.ProxyHeartbeatRequest(proxy_id="p1"), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no client certificate: no handshake
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
