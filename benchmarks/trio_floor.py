"""The floor under one session's echo: plain UDP (no DTLS) on trio, one message in flight.

    python benchmarks/trio_floor.py [--duration 3]

Runs three plain UDP echo servers in turn, each pinned to CPU 0, against the same
blocking Python client on CPU 1 (one datagram in flight, loopback only), and prints
round trips/s and the server's CPU per round trip as JSON:

- ``blocking``: ``recvfrom``/``sendto`` in a loop, no event loop at all;
- ``trio_one_task``: one trio task waits for the socket, reads and replies: the
  shape of this library's server when one session is busy (its handler's task
  reads the socket itself, see trio_dtls_server/_reader.py);
- ``trio_two_tasks``: a reading task hands each datagram to a second task (through
  a ParkingLot) that replies: the shape of a trio server with a dedicated reader
  and one task per peer (bare trio's DTLSEndpoint, or this library with
  ``read_lease=0``).

The one-task figure bounds what a DTLS server on trio can do at one session with
one message in flight, before any DTLS work.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

MODES = ("blocking", "trio_one_task", "trio_two_tasks")


def serve(mode: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    if mode == "blocking":
        while True:
            data, address = sock.recvfrom(2048)
            sock.sendto(data, address)
    sock.setblocking(False)

    async def one_task() -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data, address = sock.recvfrom(2048)
                except BlockingIOError:
                    break
                sock.sendto(data, address)

    async def two_tasks() -> None:
        lot = trio.lowlevel.ParkingLot()
        queue: list[tuple[bytes, Any]] = []

        async def replier() -> None:
            while True:
                while not queue:
                    await lot.park()
                data, address = queue.pop(0)
                sock.sendto(data, address)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(replier)
            while True:
                await trio.lowlevel.wait_readable(sock)
                while True:
                    try:
                        queue.append(sock.recvfrom(2048))
                    except BlockingIOError:
                        break
                    lot.unpark()

    trio.run(one_task if mode == "trio_one_task" else two_tasks)


def ping(port: int, duration: float) -> float:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    message, count, end = b"x" * 100, 0, time.monotonic() + duration
    while time.monotonic() < end:
        sock.send(message)
        sock.recv(2048)
        count += 1
    return count / duration


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--ping", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    if args.ping:
        print(ping(args.ping, args.duration))
        return
    results = {}
    for mode in MODES:
        server = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, __file__, "--serve", mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            cpu0 = cpu_seconds(server.pid)
            done = subprocess.run(
                [
                    "taskset",
                    "-c",
                    "1",
                    sys.executable,
                    __file__,
                    "--ping",
                    str(port),
                    "--duration",
                    str(args.duration),
                ],
                capture_output=True,
                text=True,
                check=True,
                timeout=args.duration + 30,
            )
            cpu = cpu_seconds(server.pid) - cpu0
        finally:
            server.kill()
            server.wait()
        rate = float(done.stdout)
        results[mode] = {
            "round_trips_per_s": round(rate),
            "server_cpu_us_per_round_trip": round(1e6 * cpu / (rate * args.duration), 1),
        }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
