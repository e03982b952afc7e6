"""The smallest complete DTLS server: it sends every datagram back to its sender.

    trio-dtls-server gen-certs certs            # once: CA, server and client certificates
    python examples/echo_server.py certs        # serves on 127.0.0.1:4433; Ctrl-C stops it
    trio-dtls-server client 127.0.0.1 4433 --ca certs/ca.pem \\
        --cert certs/client.pem --key certs/client.key
"""

import signal
import sys
from functools import partial

import trio

from trio_dtls_server import DTLSServerConfig, DTLSSession, serve_dtls


async def echo(session: DTLSSession) -> None:
    async for datagram in session:
        await session.send(datagram)


async def main(certs: str) -> None:
    config = DTLSServerConfig()
    config.load_cert_chain(f"{certs}/server.pem", f"{certs}/server.key")
    config.load_verify_locations(f"{certs}/ca.pem")  # clients need a certificate from this CA
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_dtls, echo, 4433, config=config))
            async for _ in signals:
                # Cancelling serve_dtls shuts it down gracefully: handlers get
                # their grace period, then every peer gets close_notify.
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "certs")
