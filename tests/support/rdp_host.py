"""A terminal-server stand-in for the fault tests that can say which server it is.

`python -m tests.support.rdp_host --listen 127.0.0.1:PORT` answers the first TPKT (the Connection
Request, as a real server would) with a Connection Confirm (RDP_NEG_RSP), then echoes every byte, except
that a client whose first bytes after the Confirm are `WHO?\\n` gets `SERVER 127.0.0.1:PORT` back,
padded with spaces to a logon's worth of bytes (LOGON_BYTES, so the broker keeps the session: fewer
than the pool's junk_bytes would end it as junk), then `\\n`. That answer is the ground truth of where
a connection through the proxies really landed; health probes send nothing after the Confirm, so they
never see it. It needs no rdbroker code, so it starts fast and a
SIGKILL of it is a terminal server dying. One line per accepted connection goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

CONFIRM = bytes.fromhex("030000130ed000001234000200080000000000")  # NEG_RSP, selected protocol RDP
WHO = b"WHO?\n"
LOGON_BYTES = 6308  # from the server, a full logon to an idle xrdp desktop (docs/broker.md)
FIRST_PACKET_TIMEOUT_S = 10.0


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def who_answer(name: str) -> bytes:
    line = f"SERVER {name}".encode()
    return line.ljust(LOGON_BYTES - len(CONFIRM) - 1) + b"\n"


async def serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
    try:
        async with asyncio.timeout(FIRST_PACKET_TIMEOUT_S):
            header = await reader.readexactly(4)
            length = int.from_bytes(header[2:4], "big")
            if header[0] != 3 or not 11 <= length <= 4096:
                return
            body = await reader.readexactly(length - 4)
        cookie = b""
        if b"mstshash=" in body:
            cookie = body.split(b"mstshash=", 1)[1].split(b"\r\n", 1)[0]
        say(f"accepted cookie={cookie.decode(errors='replace')}")
        writer.write(CONFIRM)
        await writer.drain()
        first = await reader.read(len(WHO))
        writer.write(who_answer(name) if first == WHO else first)
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def main_async(host: str, port: int) -> None:
    name = f"{host}:{port}"
    server = await asyncio.start_server(lambda r, w: serve_client(r, w, name), host, port, backlog=512)
    say(f"listening {name}")
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rdp_host")
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    asyncio.run(main_async(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
