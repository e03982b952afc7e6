"""A scripted DTLS chat on loopback: ``python examples/demo.py``.

What it does, in about a second and without touching anything outside a
temporary directory:

1. makes a throwaway PKI: a CA, a server certificate for 127.0.0.1, and client
   certificates for "alice", "bob" and "carol";
2. starts the chat server (:class:`trio_dtls_server.apps.chat.ChatRoom`) in this
   process on 127.0.0.1, on an ephemeral port, requiring client certificates;
3. connects the three clients, each named by its certificate, and plays a short
   conversation: messages, ``/who``, a message that is too long and is refused,
   bob leaving with ``/quit``, alice leaving by closing her session;
4. prints the conversation as each client saw it, and the server's counters;
5. shuts the server down gracefully (carol, still connected, gets close_notify).

Every step is bounded by a timeout and checked; if anything goes wrong the demo
says what, and exits with status 1. ``-v`` shows the server's log.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import trio

from trio_dtls_server import (
    DTLSClientConfig,
    DTLSError,
    DTLSServer,
    DTLSServerConfig,
    DTLSSession,
    connect_dtls,
    serve_dtls,
)

# The library's public API has no certificate maker; this module backs its
# `gen-certs` command and is the quickest way to a throwaway PKI.
from trio_dtls_server._certs import (
    generate_ca,
    issue_certificate,
    write_certificate,
    write_private_key,
)
from trio_dtls_server.apps.chat import ChatRoom

HOST = "127.0.0.1"  # loopback only: the demo never listens on a real network
NAMES = ("alice", "bob", "carol")
MAX_MESSAGE = 200  # small, so the oversized message stays short on screen
STEP_TIMEOUT = 5.0  # seconds any one expected line may take to arrive
TOTAL_TIMEOUT = 15.0  # seconds for the whole demo, shutdown included


class DemoFailure(Exception):
    """A step of the script did not go as expected."""


@dataclass(frozen=True)
class PKI:
    ca: Path
    server: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]]


def make_pki(directory: Path) -> PKI:
    """A CA, a server certificate for loopback and one client certificate per name."""
    ca_cert, ca_key = generate_ca("trio-dtls-server demo CA", days=1)

    def issue(
        name: str, usage: Literal["server", "client"], hosts: Sequence[str] = ()
    ) -> tuple[Path, Path]:
        cert, key = issue_certificate(ca_cert, ca_key, name, hosts=hosts, usage=usage, days=1)
        paths = directory / f"{name}.pem", directory / f"{name}.key"
        write_certificate(paths[0], cert)
        write_private_key(paths[1], key)
        return paths

    write_certificate(directory / "ca.pem", ca_cert)
    return PKI(
        ca=directory / "ca.pem",
        server=issue("server", "server", hosts=[HOST]),
        clients={name: issue(name, "client") for name in NAMES},
    )


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[: limit - 12]}... ({len(text.encode())} bytes)"


class Member:
    """One scripted client: sends its lines, and records everything it sees."""

    def __init__(self, name: str, session: DTLSSession) -> None:
        self.name = name
        self.session = session
        self.received: list[str] = []
        self.transcript: list[str] = []  # "> sent", "< received", "-- what happened"
        self.ended = trio.Event()
        self._news = trio.Event()
        self._cursor = 0  # lines before this one were expected already

    async def listen(self) -> None:
        """Record each line from the server until the session ends."""
        try:
            async for datagram in self.session:
                text = datagram.decode(errors="replace")
                self.received.append(text)
                self.transcript.append(f"< {text}")
                self._news.set()
            reason = self.session.close_reason
            self.transcript.append(f"-- the server ended the session ({reason})")
        except trio.ClosedResourceError:
            pass  # we closed it ourselves (see close)
        finally:
            self.ended.set()
            self._news.set()

    async def say(self, text: str) -> None:
        self.transcript.append(f"> {shorten(text)}")
        await self.session.send(text.encode())

    async def expect(self, line: str) -> None:
        """Wait until ``line`` arrives (after the lines expected before it)."""
        with trio.move_on_after(STEP_TIMEOUT):
            while True:
                try:
                    self._cursor = self.received.index(line, self._cursor) + 1
                    return
                except ValueError:
                    pass
                if self.ended.is_set():
                    break
                self._news = trio.Event()
                await self._news.wait()
        raise DemoFailure(
            f"{self.name} did not receive {line!r} within {STEP_TIMEOUT} s; "
            f"last lines: {self.received[-3:]}"
        )

    async def wait_until_ended(self) -> None:
        with trio.move_on_after(STEP_TIMEOUT):
            await self.ended.wait()
            return
        raise DemoFailure(f"{self.name}'s session did not end within {STEP_TIMEOUT} s")

    async def close(self) -> None:
        self.transcript.append("-- closed the session (close_notify)")
        await self.session.aclose()


async def connect(name: str, pki: PKI, server: DTLSServer, nursery: trio.Nursery) -> Member:
    config = DTLSClientConfig(handshake_timeout=STEP_TIMEOUT)
    config.load_verify_locations(pki.ca)
    config.load_cert_chain(*pki.clients[name])
    try:
        session = await connect_dtls(HOST, server.port, config)
    except DTLSError as exc:
        raise DemoFailure(f"{name} could not connect: {exc}") from None
    member = Member(name, session)
    nursery.start_soon(member.listen)
    return member


async def converse(pki: PKI, server: DTLSServer, nursery: trio.Nursery) -> dict[str, Member]:
    """The script. Each step waits until everyone concerned has seen its effect,
    so every transcript comes out the same on every run."""
    alice = await connect("alice", pki, server, nursery)
    members = {"alice": alice}
    await alice.expect("* welcome alice; here now: alice")

    bob = members["bob"] = await connect("bob", pki, server, nursery)
    await bob.expect("* welcome bob; here now: alice, bob")
    await alice.expect("* bob joined")

    carol = members["carol"] = await connect("carol", pki, server, nursery)
    await carol.expect("* welcome carol; here now: alice, bob, carol")
    await alice.expect("* carol joined")
    await bob.expect("* carol joined")

    await alice.say("hi bob, hi carol!")
    await bob.expect("alice: hi bob, hi carol!")
    await carol.expect("alice: hi bob, hi carol!")

    await bob.say("hey alice. who else is here?")
    await alice.expect("bob: hey alice. who else is here?")
    await carol.expect("bob: hey alice. who else is here?")

    await carol.say("/who")
    await carol.expect("* here now: alice, bob, carol")

    story = "it all started on a dark and stormy night, " * 6
    await carol.say(story)
    await carol.expect(f"! message too long ({len(story.encode())} bytes, limit {MAX_MESSAGE})")
    await carol.say("long story short: me!")
    await alice.expect("carol: long story short: me!")
    await bob.expect("carol: long story short: me!")

    await bob.say("/quit")
    await bob.expect("* bye")
    await bob.wait_until_ended()  # close_notify from the server
    await alice.expect("* bob left (quit)")
    await carol.expect("* bob left (quit)")

    await alice.say("I have to go too. bye carol!")
    await carol.expect("alice: I have to go too. bye carol!")
    await alice.close()
    await carol.expect("* alice left (disconnected)")

    await carol.say("/who")
    await carol.expect("* here now: carol")

    # What must not have happened.
    for member in members.values():
        echoes = [line for line in member.received if line.startswith(f"{member.name}: ")]
        if echoes:
            raise DemoFailure(f"{member.name} got its own message back: {echoes[0]!r}")
        if any(story.strip() in line for line in member.received):
            raise DemoFailure(f"{member.name} received the oversized message")
    return members


def print_conversation(members: dict[str, Member]) -> None:
    print("=== the conversation, as each client saw it (> sent, < received) ===")
    width = max(map(len, members))
    for member in members.values():
        print()
        for line in member.transcript:
            print(f"{member.name:>{width}} | {line}")
    print()


def print_stats(server: DTLSServer, title: str) -> None:
    stats = server.stats().as_dict()
    width = max(map(len, stats))
    print(f"=== {title} ===")
    for name, value in stats.items():
        print(f"  {name:<{width}}  {value}")
    print()


async def run_demo() -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="trio-dtls-demo-") as tmp:
        # Key generation and file writes block: keep them off the event loop.
        pki = await trio.to_thread.run_sync(make_pki, Path(tmp))
        config = DTLSServerConfig(shutdown_grace=2.0)
        config.load_cert_chain(*pki.server)
        config.load_verify_locations(pki.ca)  # client certificates are required
        room = ChatRoom(max_message_bytes=MAX_MESSAGE)
        async with trio.open_nursery() as servers:
            server: DTLSServer = await servers.start(
                partial(serve_dtls, room.handle, 0, config=config, host=HOST)
            )
            print(f"chat server listening on {server.address[0]}:{server.port}")
            print()
            async with trio.open_nursery() as clients:
                members = await converse(pki, server, clients)
                print_conversation(members)
                print_stats(server, "server stats")

                print("shutting the server down gracefully...")
                await server.aclose()
                carol = members["carol"]
                await carol.wait_until_ended()
            print(f"carol saw: {carol.transcript[-1].removeprefix('-- ')}")
            stats = server.stats()
            print(
                f"server stopped: {stats.sessions_closed} sessions closed, "
                f"{stats.sessions_active} active, {stats.handler_errors} handler errors"
            )
            if stats.sessions_active or stats.handler_errors:
                raise DemoFailure("the server did not end cleanly")
    print(f"demo finished in {time.monotonic() - started:.2f} s")


def root_cause(exc: BaseException) -> BaseException:
    """The exception inside (nested) exception groups of one exception each."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def main_async() -> None:
    with trio.move_on_after(TOTAL_TIMEOUT):
        await run_demo()
        return
    raise DemoFailure(f"the demo did not finish within {TOTAL_TIMEOUT} s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="show the server's log")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(main_async)
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        return 1
    except Exception as exc:
        cause = root_cause(exc)
        if isinstance(cause, DemoFailure):
            print(f"demo failed: {cause}", file=sys.stderr)
        else:
            if args.verbose:
                traceback.print_exception(exc)
            print(f"demo failed: {type(cause).__name__}: {cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
