"""A DTLS chat server: each message a member sends goes to everyone else in the room.

Members authenticate with a client certificate (named by its common name) or a
PSK identity (named by the identity). Try it with a development PKI::

    trio-dtls-server gen-certs certs              # once: CA, server and client certificates
    python examples/chat_server.py --certs certs
    python examples/chat_client.py 127.0.0.1 4433 --certs certs   # in a few other terminals

or with pre-shared keys only::

    python examples/chat_server.py --psk alice:00112233445566778899aabbccddeeff
    python examples/chat_client.py 127.0.0.1 4433 --psk alice:00112233445566778899aabbccddeeff

It prints ``listening on HOST:PORT`` once it is ready. Ctrl-C (or SIGTERM)
shuts it down gracefully: every member gets close_notify. The room itself is
``trio_dtls_server.apps.chat.ChatRoom``, the same one ``trio-dtls-server serve
--app chat`` runs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from trio_dtls_server import ConfigError, DTLSServer, DTLSServerConfig, serve_dtls
from trio_dtls_server.apps.chat import ChatRoom

logger = logging.getLogger("chat_server")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A DTLS chat server.",
        epilog="Give --certs DIR, or --cert/--key with --client-ca and/or --psk, or --psk alone.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=4433, help="UDP port; 0: any free one")
    parser.add_argument(
        "--certs",
        metavar="DIR",
        type=Path,
        help="a directory made by `trio-dtls-server gen-certs`: server.pem and server.key "
        "identify the server, members need a certificate signed by ca.pem",
    )
    parser.add_argument("--cert", metavar="PEM", help="server certificate chain")
    parser.add_argument("--key", metavar="PEM", help="server private key")
    parser.add_argument(
        "--client-ca", metavar="PEM", help="require client certificates signed by this CA"
    )
    parser.add_argument(
        "--psk",
        metavar="IDENTITY:HEXKEY",
        action="append",
        default=[],
        help="accept this PSK identity (repeatable); the identity is the member's name",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="a member silent for S seconds is dropped; 0: never (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message",
        type=int,
        default=1024,
        metavar="BYTES",
        help="longest message accepted (default: %(default)s)",
    )
    parser.add_argument(
        "--rate", type=float, default=5.0, help="messages a second per member (default: 5)"
    )
    parser.add_argument(
        "--burst", type=int, default=10, help="messages a member may send at once (default: 10)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every session")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> DTLSServerConfig:
    """The server configuration from the command line; ConfigError if it is unusable."""
    cert, key, client_ca = args.cert, args.key, args.client_ca
    if args.certs is not None:
        cert = cert or args.certs / "server.pem"
        key = key or args.certs / "server.key"
        client_ca = client_ca or args.certs / "ca.pem"
    if cert is None and not args.psk:
        raise ConfigError(
            "credentials",
            "give --certs DIR (make one with `trio-dtls-server gen-certs DIR`), "
            "--cert/--key with --client-ca, or --psk IDENTITY:HEXKEY",
        )
    config = DTLSServerConfig(idle_timeout=args.idle_timeout)
    if cert is not None:
        config.load_cert_chain(cert, key)
    if client_ca is not None:
        config.load_verify_locations(client_ca)
    for item in args.psk:
        identity, colon, hexkey = item.rpartition(":")
        if not colon:
            raise ConfigError("--psk", f"expected IDENTITY:HEXKEY, not {item!r}")
        config.add_psk_identity(identity, hexkey)
    config.validate()
    return config


async def serve(config: DTLSServerConfig, room: ChatRoom, host: str, port: int) -> None:
    # The signals are caught from the start, so that Ctrl-C is always a graceful
    # shutdown (close_notify to every member) rather than a KeyboardInterrupt.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server: DTLSServer = await nursery.start(
                partial(serve_dtls, room.handle, port, config=config, host=host)
            )
            print(f"listening on {server.address[0]}:{server.port}", flush=True)
            async for signum in signals:
                logger.info("%s: shutting down", signal.Signals(signum).name)
                break
            await server.aclose()  # gives handlers their grace, then returns


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        room = ChatRoom(max_message_bytes=args.max_message, rate=args.rate, burst=args.burst)
        config = build_config(args)
    except ValueError as exc:  # ConfigError is a ValueError, and so are ChatRoom's
        print(f"chat_server: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(serve, config, room, args.host, args.port)
    except Exception as exc:
        # Errors come out of trio's nurseries wrapped in exception groups.
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if not isinstance(exc, OSError):
            raise
        # For example: the port is in use, or the address is not this host's.
        print(f"chat_server: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
