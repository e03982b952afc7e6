"""Handshake load with or without session resumption, for benchmarks/run.py.

``dtlsload`` never resumes, so this client does: it keeps ``--concurrency``
handshakes in flight for ``--duration`` seconds, each a new UDP socket (a new
peer), full or resumed from one earlier session, closing each with
close_notify. It prints one JSON object. Only loopback targets are allowed.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import time

import trio

from trio_dtls_server import DTLSClientConfig, connect_dtls


async def main(args: argparse.Namespace) -> dict[str, object]:
    if not ipaddress.ip_address(args.host).is_loopback:
        raise SystemExit("resume_load only targets loopback addresses")
    config = DTLSClientConfig(check_hostname=False, handshake_timeout=5)
    config.load_verify_locations(args.ca)
    first = await connect_dtls(args.host, args.port, config)
    ticket = first.tls_session if args.mode == "resumed" else None
    await first.aclose()
    counts = {"handshakes": 0, "resumed": 0, "failures": 0}
    end = trio.current_time() + args.warmup + args.duration
    start_counting = trio.current_time() + args.warmup

    async def worker() -> None:
        while trio.current_time() < end:
            try:
                session = await connect_dtls(args.host, args.port, config, session=ticket)
            except Exception:
                counts["failures"] += 1
                continue
            if trio.current_time() >= start_counting:
                counts["handshakes"] += 1
                counts["resumed"] += session.session_reused
            await session.aclose()

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(args.concurrency):
            nursery.start_soon(worker)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - wall0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "mode": args.mode,
        "concurrency": args.concurrency,
        "measured_s": args.duration,
        "handshakes_per_s": counts["handshakes"] / args.duration,
        "client_cpu_pct": round(100 * cpu / wall, 1),
        **counts,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--mode", choices=["full", "resumed"], default="full")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    print(json.dumps(trio.run(main, parser.parse_args())))
