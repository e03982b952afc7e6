"""The chat room (``trio_dtls_server.apps.chat``) with real clients over loopback DTLS.

Members authenticate with PSK identities "alice", "bob" and "carol", which
become their names; one test uses the harness's client certificate (CN "client").
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import pytest
import trio

from trio_dtls_server import CloseReason, DTLSServer, DTLSSession
from trio_dtls_server.apps.chat import ChatRoom
from trio_dtls_server.testing import TestPKI, wait_for_stats, wait_until
from trio_dtls_server.testing._plugin import ClientFactory, ServerFactory

KEYS = {name: os.urandom(16) for name in ("alice", "bob", "carol")}


async def line(session: DTLSSession, timeout: float = 5.0) -> str:
    """The next datagram from the room, as text."""
    with trio.fail_after(timeout):
        return (await session.receive()).decode()


class Room:
    """A chat server plus a way to add members to it."""

    def __init__(
        self,
        room: ChatRoom,
        server: DTLSServer,
        pki: TestPKI,
        connect: ClientFactory,
    ) -> None:
        self.room = room
        self.server = server
        self._pki = pki
        self._connect = connect
        self.members: dict[str, DTLSSession] = {}

    async def join(self, name: str, *, as_name: str | None = None) -> DTLSSession:
        """Connect ``name`` (a PSK identity), check its welcome, and let the
        members already there read the announcement."""
        session = await self._connect(self.server, self._pki.psk_client_config(name, KEYS[name]))
        shown = as_name or name
        welcome = await line(session)
        assert welcome == f"* welcome {shown}; here now: {', '.join([*self.members, shown])}"
        for other in self.members.values():
            assert await line(other) == f"* {shown} joined"
        self.members[shown] = session
        return session


ChatFactory = Callable[..., Awaitable[Room]]


@pytest.fixture
async def chat(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> ChatFactory:
    """Factory: ``await chat(ChatRoom(...), **server_settings)`` starts a chat server."""

    async def start(room: ChatRoom | None = None, **settings: Any) -> Room:
        room = room or ChatRoom()
        config = dtls_pki.server_config(psk_identities=KEYS, **settings)
        server = await dtls_server(room.handle, config)
        return Room(room, server, dtls_pki, dtls_client)

    return start


async def test_three_members_see_each_other_not_themselves(chat: ChatFactory) -> None:
    room = await chat()
    alice = await room.join("alice")
    bob = await room.join("bob")
    carol = await room.join("carol")
    assert room.room.members == ["alice", "bob", "carol"]

    await alice.send(b"hi all\n")  # the trailing newline is stripped
    assert await line(bob) == "alice: hi all"
    assert await line(carol) == "alice: hi all"
    await bob.send(b"hey alice")
    assert await line(carol) == "bob: hey alice"
    # Alice's next line is bob's message: her own never came back to her.
    assert await line(alice) == "bob: hey alice"
    await carol.send("h\u00e9llo \u2603".encode())
    assert await line(alice) == "carol: h\u00e9llo \u2603"
    assert await line(bob) == "carol: h\u00e9llo \u2603"


async def test_who_lists_members_and_duplicate_names_get_a_suffix(
    chat: ChatFactory, dtls_pki: TestPKI, dtls_client: ClientFactory
) -> None:
    room = await chat()
    alice = await room.join("alice")
    bob = await room.join("bob")
    await room.join("alice", as_name="alice#2")
    # A certificate client is named by its certificate's common name.
    client = await dtls_client(room.server, dtls_pki.client_config())
    assert await line(client) == "* welcome client; here now: alice, bob, alice#2, client"
    for member in room.members.values():
        assert await line(member) == "* client joined"

    await bob.send(b"/who")
    assert await line(bob) == "* here now: alice, bob, alice#2, client"
    await alice.send(b"/WHO please")  # commands ignore case and arguments
    assert await line(alice) == "* here now: alice, bob, alice#2, client"


async def test_vanished_member_is_announced_after_idle_timeout(chat: ChatFactory) -> None:
    room = await chat(idle_timeout=0.5)
    alice = await room.join("alice")
    bob = await room.join("bob")
    del bob  # bob's program vanishes: no close_notify, no datagram ever again
    seen: list[str] = []

    async def listen() -> None:
        async for datagram in alice:
            seen.append(datagram.decode())

    async def keep_alive() -> None:
        # Alice stays active, so that only bob reaches the idle timeout.
        while True:
            await alice.send(b"/who")
            await trio.sleep(0.15)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        nursery.start_soon(keep_alive)
        await wait_until(lambda: "* bob left (idle timeout)" in seen, timeout=5)
        await wait_until(lambda: seen[-1] == "* here now: alice", timeout=2)
        nursery.cancel_scope.cancel()
    assert room.room.members == ["alice"]
    await wait_for_stats(room.server, sessions_idle_timeout=1, sessions_active=1)


async def test_oversized_message_is_refused_and_session_goes_on(chat: ChatFactory) -> None:
    room = await chat(ChatRoom(max_message_bytes=100))
    alice = await room.join("alice")
    bob = await room.join("bob")

    await alice.send(b"x" * 101)
    assert await line(alice) == "! message too long (101 bytes, limit 100)"
    await alice.send(b"y" * 100)  # exactly at the limit: fine
    # Bob's next line is the second message: the first was not broadcast.
    assert await line(bob) == "alice: " + "y" * 100
    await bob.send(b"ok")
    assert await line(alice) == "bob: ok"


async def test_flooding_member_is_throttled(chat: ChatFactory) -> None:
    room = await chat(ChatRoom(rate=5.0, burst=3))
    alice = await room.join("alice")
    bob = await room.join("bob")

    for i in range(6):
        await alice.send(f"m{i}".encode())
    # One "slow down" for the whole flood, not one per dropped message.
    reply = await line(alice)
    assert reply.startswith("! slow down: at most 5 messages a second (bursts of 3)")
    assert [await line(bob) for _ in range(3)] == ["alice: m0", "alice: m1", "alice: m2"]

    await trio.sleep(0.5)  # the bucket refills (5 a second)
    await alice.send(b"calm again")
    assert await line(bob) == "alice: calm again"  # m3 to m5 were dropped
    await alice.send(b"/who")
    assert await line(alice) == "* here now: alice, bob"  # no second "slow down"


async def test_bad_input_gets_an_error_reply_and_the_session_stays(chat: ChatFactory) -> None:
    room = await chat()
    alice = await room.join("alice")
    bob = await room.join("bob")

    await alice.send(b"\xff\xfe not utf-8")
    assert await line(alice) == "! message is not valid UTF-8; not sent"
    await alice.send(b"/dance")
    assert await line(alice) == "! unknown command /dance; try /who or /quit"
    await alice.send(b"\n")  # an empty line is ignored
    # Control characters cannot forge lines on the others' terminals.
    await alice.send(b"hi\n* carol joined\x1b[2J")
    assert await line(bob) == "alice: hi?* carol joined?[2J"


async def test_quit_says_bye_and_ends_the_session(chat: ChatFactory) -> None:
    room = await chat()
    alice = await room.join("alice")
    bob = await room.join("bob")

    await alice.send(b"/quit")
    assert await line(alice) == "* bye"
    with trio.fail_after(5), pytest.raises(trio.EndOfChannel):
        await alice.receive()  # the server sent close_notify after the bye
    assert alice.close_reason is CloseReason.PEER_CLOSED
    assert await line(bob) == "* alice left (quit)"
    assert room.room.members == ["bob"]
    await wait_for_stats(room.server, sessions_closed=1, handler_errors=0)


async def test_member_that_closes_is_announced(chat: ChatFactory) -> None:
    room = await chat()
    alice = await room.join("alice")
    bob = await room.join("bob")

    await alice.aclose()  # close_notify
    assert await line(bob) == "* alice left (disconnected)"
    del room.members["alice"]
    await room.join("alice")  # the name is free again


class FragileRoom(ChatRoom):
    """A room whose handler fails on one message, as a bug would."""

    def format_message(self, name: str, text: str) -> str:
        if text == "boom":
            raise RuntimeError("a bug in the chat room")
        return super().format_message(name, text)


async def test_handler_failure_of_one_member_leaves_the_others_alone(chat: ChatFactory) -> None:
    room = await chat(FragileRoom())
    alice = await room.join("alice")
    bob = await room.join("bob")
    carol = await room.join("carol")

    await alice.send(b"boom")
    assert await line(bob) == "* alice left (error)"
    assert await line(carol) == "* alice left (error)"
    with trio.fail_after(5), pytest.raises(trio.EndOfChannel):
        await alice.receive()  # the server closed alice's session with close_notify
    await wait_for_stats(room.server, handler_errors=1, sessions_active=2)

    await bob.send(b"still here")
    assert await line(carol) == "bob: still here"
    await carol.send(b"/who")
    assert await line(carol) == "* here now: bob, carol"


class FakeSession:
    """Just enough of a session for the room: a peer that can stop reading."""

    def __init__(self, name: str, *, stuck: bool = False) -> None:
        self.identity = name
        self.peer = f"{name}.example:1"
        self.session_id = 0
        self.close_reason: CloseReason | None = None
        self.stuck = stuck
        self.to_room, self._incoming = trio.open_memory_channel[bytes](math.inf)
        self.received: list[str] = []

    async def receive(self) -> bytes:
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            self.close_reason = CloseReason.PEER_CLOSED
            raise

    async def send(self, data: bytes) -> None:
        if self.stuck:
            await trio.sleep_forever()  # a peer the kernel cannot send to
        self.received.append(data.decode())


def has_members(room: ChatRoom, count: int) -> bool:
    return len(room.members) == count


async def test_slow_member_does_not_hold_up_the_room() -> None:
    room = ChatRoom(rate=1e6, burst=1000)
    alice = FakeSession("alice")
    slow = FakeSession("slow", stuck=True)
    carol = FakeSession("carol")
    async with trio.open_nursery() as nursery:
        for count, fake in enumerate((alice, slow, carol), start=1):
            nursery.start_soon(room.handle, cast(DTLSSession, fake))
            await wait_until(partial(has_members, room, count))
        for i in range(500):
            alice.to_room.send_nowait(f"m{i}".encode())
        with trio.fail_after(5):
            await wait_until(lambda: "alice: m499" in carol.received)
        assert [x for x in carol.received if x.startswith("alice:")] == [
            f"alice: m{i}" for i in range(500)
        ]
        # Closing alice is announced to carol at once, although "slow" still hangs.
        alice.to_room.close()
        await wait_until(lambda: "* alice left (disconnected)" in carol.received)
        nursery.cancel_scope.cancel()  # as a server shutdown would, past its grace
    assert room.members == []
    assert slow.received == []
