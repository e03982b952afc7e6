"""An interactive DTLS chat client: type a line to send it, see the room's lines as they come.

    python examples/chat_client.py 127.0.0.1 4433 --certs certs
    python examples/chat_client.py 127.0.0.1 4433 --ca certs/ca.pem --cert me.pem --key me.key
    python examples/chat_client.py 127.0.0.1 4433 --psk alice:00112233445566778899aabbccddeeff

In the room, ``/who`` lists the members and ``/quit`` leaves. End of input
(Ctrl-D) or Ctrl-C closes the session properly (close_notify) and exits with
status 0. If the handshake fails, one line on stderr says why, and the status is 1.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from trio_dtls_server import (
    CloseReason,
    ConfigError,
    DTLSClientConfig,
    DTLSError,
    DTLSSession,
    SessionClosed,
    connect_dtls,
)

PROG = "chat_client"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="An interactive DTLS chat client.")
    parser.add_argument("host", help="the chat server's address or name")
    parser.add_argument("port", type=int, help="its UDP port")
    parser.add_argument(
        "--certs",
        metavar="DIR",
        type=Path,
        help="a directory made by `trio-dtls-server gen-certs`: trust ca.pem, "
        "present client.pem/client.key",
    )
    parser.add_argument("--ca", metavar="PEM", help="trust server certificates from this CA")
    parser.add_argument("--cert", metavar="PEM", help="client certificate (your name is its CN)")
    parser.add_argument("--key", metavar="PEM", help="client private key")
    parser.add_argument(
        "--psk",
        metavar="IDENTITY:HEXKEY",
        help="authenticate with a pre-shared key instead (your name is the identity)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="at end of input, keep showing the room for S seconds before leaving "
        "(for piped input; default: 0)",
    )
    parser.add_argument(
        "--handshake-timeout", type=float, default=10.0, metavar="S", help="default: 10"
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> DTLSClientConfig:
    config = DTLSClientConfig(handshake_timeout=args.handshake_timeout)
    ca, cert, key = args.ca, args.cert, args.key
    if args.certs is not None:
        ca = ca or args.certs / "ca.pem"
        if args.psk is None:
            cert = cert or args.certs / "client.pem"
            key = key or args.certs / "client.key"
    if ca is not None:
        config.load_verify_locations(ca)
    if cert is not None:
        config.load_cert_chain(cert, key)
    if args.psk is not None:
        identity, colon, hexkey = args.psk.rpartition(":")
        if not colon:
            raise ConfigError("--psk", f"expected IDENTITY:HEXKEY, not {args.psk!r}")
        config.set_psk(identity, hexkey)
    return config


async def show_incoming(session: DTLSSession, done: trio.CancelScope) -> None:
    """Print each line from the room; when the server ends the session, stop everything."""
    async for datagram in session:
        print(datagram.decode(errors="replace"), flush=True)
    done.cancel()


async def send_input(session: DTLSSession, wait: float) -> None:
    """Send each line of stdin; return at end of input (after ``wait`` seconds)."""
    while True:
        # stdin is read in a thread, so the event loop keeps printing meanwhile.
        # abandon_on_cancel: a thread blocked in readline() cannot be interrupted,
        # and must not keep Ctrl-C or the end of the session waiting.
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text:
            continue  # DTLS has no empty datagrams, and the room ignores empty lines
        try:
            await session.send(text.encode())
        except SessionClosed:
            return  # the server ended the session; chat() says so
        except ValueError as exc:  # longer than one datagram can carry
            print(f"! not sent: {exc}", file=sys.stderr)
    await trio.sleep(wait)


async def watch_signals(done: trio.CancelScope) -> None:
    # Ctrl-C and SIGTERM end the program the same way end of input does, so the
    # server is told (close_notify) instead of finding out by the idle timeout.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            done.cancel()
            return


async def chat(args: argparse.Namespace, config: DTLSClientConfig) -> int:
    session: DTLSSession | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_signals, nursery.cancel_scope)
        try:
            session = await connect_dtls(args.host, args.port, config)
        except (DTLSError, OSError) as exc:
            print(f"{PROG}: cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
            nursery.cancel_scope.cancel()  # stop watching for signals
            return 1
        try:
            nursery.start_soon(show_incoming, session, nursery.cancel_scope)
            await send_input(session, args.wait)
            nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await session.aclose()  # close_notify, if the session is still open
    if session is not None and session.close_reason is not CloseReason.LOCAL_CLOSE:
        print(f"* the session has ended: {session.close_reason}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    return trio.run(chat, args, config)


if __name__ == "__main__":
    sys.exit(main())
