"""Who reads the server's socket (``read_lease``): real UDP on loopback, real certificates.

With one busy session, its handler reads the socket itself (see _reader.py).
These tests hold the server to what that must never cost: a task waiting in
``receive()`` never waits for the lease, news for the reading task's own
session interrupts its wait, and a datagram nobody waits for goes unread for at
most ``read_lease``.
"""

from __future__ import annotations

import pytest
import trio

from trio_dtls_server import CloseReason, DTLSSession
from trio_dtls_server._internals import plain_path_requested
from trio_dtls_server.testing import exchange, wait_for_stats
from trio_dtls_server.testing._plugin import ClientFactory, ServerFactory


class GoesAway:
    """Echoes; after the datagram b"away", sleeps without reading (noting when)."""

    def __init__(self) -> None:
        self.away_at: float | None = None
        self.ended: list[CloseReason | None] = []

    async def __call__(self, session: DTLSSession) -> None:
        async for datagram in session:
            await session.send(datagram)
            if datagram == b"away":
                self.away_at = trio.current_time()
                await trio.sleep(30)
        self.ended.append(session.close_reason)


@pytest.mark.parametrize("read_lease", [0, 0.01])
async def test_many_exchanges_on_one_and_on_several_sessions(
    read_lease: float, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server(read_lease=read_lease)
    lone = await dtls_client(server)
    for i in range(200):
        assert await exchange(lone, b"%d" % i) == b"%d" % i
    others = [await dtls_client(server) for _ in range(4)]

    async def talk(client: DTLSSession, tag: bytes) -> None:
        for i in range(50):
            assert await exchange(client, tag + b"%d" % i) == tag + b"%d" % i

    async with trio.open_nursery() as nursery:
        for n, client in enumerate([lone, *others]):
            nursery.start_soon(talk, client, b"c%d-" % n)
    stats = server.stats()
    assert stats.datagrams_in == stats.datagrams_out == 200 + 5 * 50


# Below one second: a longer wait would cross the client's first retransmission.
@pytest.mark.parametrize(
    ("read_lease", "least", "most"),
    [
        pytest.param(
            0.5,
            0.3,
            0.95,
            marks=pytest.mark.skipif(
                plain_path_requested(), reason="TRIO_DTLS_SERVER_FAST_PATH=0: no handoff"
            ),
        ),
        (0, 0.0, 0.25),
    ],
)
async def test_read_lease_bounds_how_long_a_datagram_nobody_waits_for_goes_unread(
    read_lease: float,
    least: float,
    most: float,
    dtls_server: ServerFactory,
    dtls_client: ClientFactory,
) -> None:
    assert least <= await newcomer_wait(dtls_server, dtls_client, read_lease) <= most


async def newcomer_wait(
    dtls_server: ServerFactory, dtls_client: ClientFactory, read_lease: float
) -> float:
    """Seconds from the only session's handler going away to a newcomer's session.

    That handler reads the socket, then goes away without reading: a new
    client's hello waits for the receive loop to take over.
    """
    handler = GoesAway()
    server = await dtls_server(handler, read_lease=read_lease, shutdown_grace=0.2)
    first = await dtls_client(server)
    assert await exchange(first, b"away") == b"away"
    assert handler.away_at is not None
    await dtls_client(server)
    newcomer = server.sessions[-1]
    assert newcomer.established_at is not None
    return newcomer.established_at - handler.away_at


async def test_tasks_waiting_in_receive_never_wait_for_the_lease(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    handler = GoesAway()
    server = await dtls_server(handler, read_lease=1.0, shutdown_grace=0.2)
    # Alone, this session's handler reads the socket; the second session's
    # handler then waits in receive() while it does.
    leaving = await dtls_client(server)
    assert await exchange(leaving, b"x") == b"x"
    waiting = await dtls_client(server)
    assert await exchange(leaving, b"away") == b"away"
    started = trio.current_time()
    for _ in range(5):
        assert await exchange(waiting, b"quick") == b"quick"
    assert trio.current_time() - started < 0.5


async def test_news_interrupts_the_handler_that_is_reading_for_everyone(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    # A lone session's handler waits on the socket itself; its idle timeout
    # must still end its iteration, and shutdown must still reach it.
    handler = GoesAway()
    server = await dtls_server(handler, idle_timeout=0.3)
    client = await dtls_client(server)
    assert await exchange(client, b"hi") == b"hi"
    with trio.fail_after(3), pytest.raises(trio.EndOfChannel):
        await client.receive()  # close_notify after the idle timeout
    await wait_for_stats(server, sessions_idle_timeout=1, sessions_closed=1)
    assert handler.ended == [CloseReason.IDLE_TIMEOUT]

    other = await dtls_client(server)
    assert await exchange(other, b"hi") == b"hi"
    with trio.fail_after(3):
        await server.aclose()
    assert handler.ended == [CloseReason.IDLE_TIMEOUT, CloseReason.SHUTDOWN]


class OneShot:
    """Answers one datagram, then returns (closing the session)."""

    async def __call__(self, session: DTLSSession) -> None:
        await session.send(await session.receive())


@pytest.mark.parametrize("how", ["peer closes", "handler returns"])
async def test_a_reader_whose_session_ends_hands_the_socket_back_at_once(
    how: str, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    # With a one-second lease, a newcomer would wait for it if the task that
    # read last kept the socket after its session ended.
    if how == "handler returns":
        server = await dtls_server(OneShot(), read_lease=1.0)
    else:
        server = await dtls_server(read_lease=1.0)
    first = await dtls_client(server)
    assert await exchange(first, b"x") == b"x"
    if how == "peer closes":
        await first.aclose()
    await wait_for_stats(server, sessions_active=0, sessions_closed=1)
    started = trio.current_time()
    second = await dtls_client(server)
    assert await exchange(second, b"y") == b"y"
    assert trio.current_time() - started < 0.5


async def test_the_plain_path_turns_the_handoff_off(
    monkeypatch: pytest.MonkeyPatch, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    # TRIO_DTLS_SERVER_FAST_PATH=0 (make test's second run) leaves all reading
    # to the receive loop, whatever read_lease says: no newcomer waits for it.
    monkeypatch.setenv("TRIO_DTLS_SERVER_FAST_PATH", "0")
    assert await newcomer_wait(dtls_server, dtls_client, read_lease=0.5) < 0.25
