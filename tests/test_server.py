"""How a server behaves towards its peers: real UDP on loopback, real certificates."""

from __future__ import annotations

import array
import logging
import os
import socket
from functools import partial

import needs
import pytest
import trio
import trio.testing

from trio_dtls_server import (
    CloseReason,
    DTLSClientConfig,
    DTLSServer,
    DTLSServerConfig,
    DTLSSession,
    HandshakeError,
    HandshakeTimeout,
    SessionClosed,
    connect_dtls,
    serve_dtls,
)
from trio_dtls_server.testing import (
    Faults,
    RawHandshake,
    TestPKI,
    abandon,
    exchange,
    local_address,
    send_raw,
    wait_for_stats,
    wait_until,
)
from trio_dtls_server.testing._plugin import ClientFactory, RelayFactory, ServerFactory


class Recorder:
    """A handler that echoes and remembers how each of its sessions ended."""

    def __init__(self) -> None:
        self.sessions: list[DTLSSession] = []
        self.ended: list[CloseReason | None] = []
        self.errors: list[BaseException] = []

    async def __call__(self, session: DTLSSession) -> None:
        self.sessions.append(session)
        try:
            async for datagram in session:
                await session.send(datagram)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        self.ended.append(session.close_reason)


async def test_echo_with_mutual_certificates(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder)
    client = await dtls_client(server)
    for size in (1, 100, 1200, 9000):
        payload = os.urandom(size)
        assert await exchange(client, payload) == payload
    assert client.protocol_version == "DTLSv1.2"
    assert client.cipher is not None and "GCM" in client.cipher
    server_session = recorder.sessions[0]
    assert server_session.identity == "client"
    assert server_session.peer_certificate is not None
    assert server_session.psk_identity is None
    assert server_session.datagrams_in == 4 and server_session.bytes_in == 1 + 100 + 1200 + 9000
    stats = await wait_for_stats(server, sessions_active=1, datagrams_out=4)
    assert stats.handshakes_completed == 1 and stats.cookies_sent == 1


async def test_psk_key_is_chosen_by_identity(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder)
    for identity in ("device-1", "device-2"):
        client = await dtls_client(server, dtls_pki.psk_client_config(identity))
        assert await exchange(client, identity.encode()) == identity.encode()
        assert "PSK" in (client.cipher or "")
    assert [s.psk_identity for s in recorder.sessions] == ["device-1", "device-2"]
    assert [s.identity for s in recorder.sessions] == ["device-1", "device-2"]


@pytest.mark.parametrize(
    "make_config",
    [
        pytest.param(lambda pki: pki.psk_client_config("device-1", b"wrong key"), id="wrong-key"),
        pytest.param(lambda pki: pki.psk_client_config("nobody", b"some key"), id="unknown-id"),
        pytest.param(lambda pki: pki.client_config(certificate=False), id="no-certificate"),
        pytest.param(lambda pki: pki.untrusted_client_config(), id="untrusted-ca"),
    ],
)
async def test_unauthenticated_client_is_refused_and_server_carries_on(
    dtls_pki: TestPKI,
    dtls_server: ServerFactory,
    dtls_client: ClientFactory,
    make_config: object,
) -> None:
    server = await dtls_server(handshake_timeout=1)
    config = make_config(dtls_pki)  # type: ignore[operator]
    config.handshake_timeout = 2
    with pytest.raises(HandshakeError):
        await connect_dtls(*server.address, config)
    # A wrong PSK makes the client's Finished fail its MAC, and DTLS discards
    # such records silently: then the server only learns by its timeout.
    stats = await wait_for_stats(server, sessions_active=0, handshakes_active=0)
    assert stats.handshakes_failed + stats.handshake_timeouts == 1
    assert stats.handshakes_completed == 0
    good = await dtls_client(server)
    assert await exchange(good, b"still here") == b"still here"


async def test_client_verifies_server_name(dtls_pki: TestPKI, dtls_server: ServerFactory) -> None:
    server = await dtls_server()
    config = dtls_pki.client_config(handshake_timeout=3)
    with pytest.raises(HandshakeError, match="certificate verify failed"):
        await connect_dtls(*server.address, config, server_hostname="example.com")
    with pytest.raises(HandshakeError, match="certificate verify failed"):
        await connect_dtls(
            *server.address, dtls_pki.client_config(handshake_timeout=3).__class__()
        )
    session = await connect_dtls("localhost", server.port, dtls_pki.client_config())
    await session.aclose()


async def test_one_client_config_serves_many_connections(
    dtls_pki: TestPKI, dtls_server: ServerFactory
) -> None:
    # pyOpenSSL >= 26.2 forbids reusing a context that has made a connection.
    server = await dtls_server()
    config = dtls_pki.client_config()
    for _ in range(3):
        session = await connect_dtls(*server.address, config)
        assert await exchange(session, b"x") == b"x"
        await session.aclose()


async def test_handler_error_ends_only_its_own_session(
    dtls_server: ServerFactory,
    dtls_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fragile(session: DTLSSession) -> None:
        async for datagram in session:
            if datagram == b"boom":
                raise RuntimeError("handler bug")
            await session.send(datagram)

    server = await dtls_server(fragile)
    victim = await dtls_client(server)
    victim_peer = "{}:{}".format(*local_address(victim))
    bystander = await dtls_client(server)
    assert await exchange(bystander, b"before") == b"before"
    await victim.send(b"boom")
    with trio.fail_after(5):
        with pytest.raises(trio.EndOfChannel):  # the server closed it with close_notify
            await victim.receive()
    await wait_for_stats(server, handler_errors=1, sessions_active=1)
    assert await exchange(bystander, b"after") == b"after"
    records = [r for r in caplog.records if "handler error" in r.getMessage()]
    assert records and records[0].exc_info is not None
    assert getattr(records[0], "peer", None) == victim_peer
    assert isinstance(getattr(records[0], "session_id", None), int)
    assert victim.close_reason is CloseReason.PEER_CLOSED


async def test_new_handshake_from_same_address_replaces_old_session_quietly(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder)
    first = await dtls_client(server)
    assert await exchange(first, b"one") == b"one"
    address = local_address(first)
    abandon(first)  # the peer reboots: no close_notify, same address afterwards
    second = await connect_dtls(*server.address, dtls_pki.client_config(), local_address=address)
    try:
        assert await exchange(second, b"two") == b"two"
        await wait_until(lambda: recorder.ended == [CloseReason.REPLACED])
        stats = await wait_for_stats(server, sessions_replaced=1, sessions_active=1)
        assert stats.handler_errors == 0 and not recorder.errors
    finally:
        await second.aclose()


async def test_close_notify_ends_iteration_cleanly(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder)
    client = await dtls_client(server)
    assert await exchange(client, b"hello") == b"hello"
    await client.aclose()
    await wait_until(lambda: recorder.ended == [CloseReason.PEER_CLOSED])
    assert not recorder.errors
    stats = await wait_for_stats(server, sessions_closed=1, sessions_active=0)
    assert stats.handler_errors == 0
    with pytest.raises(trio.ClosedResourceError):
        await client.send(b"after close")


async def test_bad_datagrams_harm_nobody(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder)
    target = await dtls_client(server)
    bystander = await dtls_client(server)
    assert await exchange(target, b"ok") == b"ok"
    garbage = [
        b"",
        b"\x17",
        b"\x17\xfe\xfd\x00\x01" + b"\x00" * 6 + b"\xff\xff",  # claims 64 KiB
        b"\x17\xfe\xfd\x00\x01" + b"\x00" * 6 + b"\x00\x10" + os.urandom(16),  # bad MAC
        b"\x15\xfe\xfd\x00\x00" + b"\x00" * 6 + b"\x00\x02\x02\x28",  # plaintext fatal alert
        b"\x16\xfe\xfd\x00\x00" + b"\x00" * 6 + b"\x00\x05\x01\x00\x00",  # truncated hello
        os.urandom(1500),
    ]
    # Into the established session, from its own address ...
    for datagram in garbage:
        send_raw(target, datagram)
    # ... and from strangers.
    with trio.socket.socket(type=socket.SOCK_DGRAM) as stranger:
        for datagram in garbage + [os.urandom(n) for n in range(1, 200, 7)]:
            await stranger.sendto(datagram, server.address)
    assert await exchange(target, b"still ok") == b"still ok"
    assert await exchange(bystander, b"fine") == b"fine"
    stats = server.stats()
    assert stats.sessions_active == 2 and stats.handler_errors == 0
    assert stats.datagrams_invalid > 0 and stats.datagrams_unmatched > 0
    assert not recorder.errors


async def test_client_hello_that_openssl_rejects_fails_one_handshake(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server()
    # Passes our cookie check, but offers only a cipher the server will not use.
    config = dtls_pki.client_config(ciphers="ECDHE-ECDSA-AES128-SHA", handshake_timeout=3)
    with pytest.raises(HandshakeError):
        await connect_dtls(*server.address, config)
    await wait_for_stats(server, handshakes_failed=1)
    client = await dtls_client(server)
    assert await exchange(client, b"x") == b"x"


async def test_records_for_a_closed_session_are_dropped(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server()
    client = await dtls_client(server)
    record = client._conn  # encrypt one record by hand, then close
    record.write(b"late")
    late = record.bio_read(65535)
    assert await exchange(client, b"x") == b"x"
    address = local_address(client)
    await client.aclose()
    await wait_for_stats(server, sessions_active=0)
    with trio.socket.socket(type=socket.SOCK_DGRAM) as sock:
        await sock.bind(address)
        await sock.sendto(late, server.address)
    stats = await wait_for_stats(server, datagrams_unmatched=lambda n: n >= 1)
    assert stats.handler_errors == 0


async def test_half_open_handshake_is_dropped_after_handshake_timeout(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server(handshake_timeout=0.5)
    raw = await RawHandshake.start(server.address, dtls_pki.client_config())
    try:
        await wait_for_stats(server, handshakes_active=1)
        await wait_for_stats(server, handshake_timeouts=1, handshakes_active=0, timeout=3)
    finally:
        raw.close()
    client = await dtls_client(server)
    assert await exchange(client, b"x") == b"x"


async def test_idle_timeout_ends_a_quiet_session(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder, idle_timeout=0.3)
    quiet = await dtls_client(server)
    chatty = await dtls_client(server)
    assert await exchange(quiet, b"hi") == b"hi"
    with trio.move_on_after(0.6):
        while True:
            assert await exchange(chatty, b"ping") == b"ping"
            await trio.sleep(0.05)
    with trio.fail_after(3), pytest.raises(trio.EndOfChannel):
        await quiet.receive()  # close_notify from the server
    assert recorder.ended == [CloseReason.IDLE_TIMEOUT]
    stats = await wait_for_stats(server, sessions_idle_timeout=1, sessions_active=1)
    assert stats.sessions_closed == 1
    assert await exchange(chatty, b"still") == b"still"


async def test_idle_timeout_zero_keeps_sessions(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server(idle_timeout=0)
    client = await dtls_client(server)
    await trio.sleep(0.3)
    assert await exchange(client, b"x") == b"x"
    assert server.stats().sessions_idle_timeout == 0


async def test_max_sessions_refuses_newcomer_when_nobody_is_idle(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server(max_sessions=2, evict_idle_after=60)
    a = await dtls_client(server)
    b = await dtls_client(server)
    with pytest.raises(HandshakeTimeout):
        await connect_dtls(*server.address, dtls_pki.client_config(handshake_timeout=1.5))
    stats = server.stats()
    assert stats.sessions_refused >= 1
    assert stats.sessions_active + stats.handshakes_active == 2
    assert await exchange(a, b"a") == b"a"
    assert await exchange(b, b"b") == b"b"


async def test_max_sessions_evicts_least_recently_active_idle_session(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder, max_sessions=2, evict_idle_after=0.3)
    old = await dtls_client(server)
    busy = await dtls_client(server)
    assert await exchange(old, b"o") == b"o"
    await trio.sleep(0.4)
    assert await exchange(busy, b"b") == b"b"
    newcomer = await dtls_client(server)
    assert await exchange(newcomer, b"n") == b"n"
    with trio.fail_after(3), pytest.raises(trio.EndOfChannel):
        await old.receive()
    assert recorder.ended == [CloseReason.EVICTED]
    await wait_for_stats(server, sessions_evicted=1, sessions_active=2)
    assert await exchange(busy, b"b") == b"b"


async def test_max_sessions_per_ip_bounds_one_address_only(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server(max_sessions_per_ip=2, evict_idle_after=60)
    await dtls_client(server)
    await dtls_client(server)
    with pytest.raises(HandshakeTimeout):
        await connect_dtls(*server.address, dtls_pki.client_config(handshake_timeout=1))
    assert server.stats().sessions_refused >= 1
    # Another source address (all of 127.0.0.0/8 is loopback) is not affected.
    other = await connect_dtls(
        *server.address, dtls_pki.client_config(), local_address=("127.0.0.2", 0)
    )
    try:
        assert await exchange(other, b"x") == b"x"
    finally:
        await other.aclose()


async def test_session_table_stays_bounded_under_many_newcomers(
    dtls_pki: TestPKI, dtls_server: ServerFactory
) -> None:
    server = await dtls_server(max_sessions=5, evict_idle_after=60, handshake_timeout=2)
    half_open = []
    try:
        for _ in range(30):
            half_open.append(await RawHandshake.start(server.address, dtls_pki.client_config()))
        stats = await wait_for_stats(server, sessions_refused=25)
        assert stats.sessions_active + stats.handshakes_active == 5
        assert len(server._by_address) == 5
    finally:
        for raw in half_open:
            raw.close()


async def test_graceful_shutdown_gives_handlers_their_grace_and_sends_close_notify(
    dtls_pki: TestPKI, dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    async def polite(session: DTLSSession) -> None:
        async for datagram in session:
            await session.send(datagram)
        await session.send(b"goodbye")  # iteration ended: the server is shutting down

    server = await dtls_server(polite, shutdown_grace=2)
    clients = [await dtls_client(server) for _ in range(3)]
    for client in clients:
        assert await exchange(client, b"hi") == b"hi"
    with trio.fail_after(3):
        await server.aclose()
    for client in clients:
        with trio.fail_after(1):
            assert await client.receive() == b"goodbye"
            with pytest.raises(trio.EndOfChannel):
                await client.receive()
        with pytest.raises(SessionClosed):
            await client.send(b"anyone?")


async def test_shutdown_cancels_a_handler_that_overstays_its_grace(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    cancelled = trio.Event()

    async def stubborn(session: DTLSSession) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    server = await dtls_server(stubborn, shutdown_grace=0.3)
    client = await dtls_client(server)
    start = trio.current_time()
    with trio.fail_after(3):
        await server.aclose()
    assert cancelled.is_set()
    assert 0.25 <= trio.current_time() - start < 2
    with trio.fail_after(1), pytest.raises(trio.EndOfChannel):
        await client.receive()


async def test_cancelling_serve_dtls_shuts_down_gracefully(dtls_pki: TestPKI) -> None:
    async with trio.open_nursery() as nursery:
        server: DTLSServer = await nursery.start(
            partial(serve_dtls, _echo, 0, config=dtls_pki.server_config())
        )
        client = await connect_dtls(*server.address, dtls_pki.client_config())
        assert await exchange(client, b"x") == b"x"
        nursery.cancel_scope.cancel()
    with trio.fail_after(2), pytest.raises(trio.EndOfChannel):
        await client.receive()
    await client.aclose()


async def _echo(session: DTLSSession) -> None:
    async for datagram in session:
        await session.send(datagram)


@pytest.mark.parametrize(("bind", "connect"), [("::1", "::1"), ("::", "127.0.0.1")])
@needs.ipv6
async def test_ipv6_and_dual_stack(
    dtls_pki: TestPKI, dtls_server: ServerFactory, bind: str, connect: str
) -> None:
    server = await dtls_server(host=bind)
    session = await connect_dtls(connect, server.port, dtls_pki.client_config())
    try:
        assert await exchange(session, b"v6") == b"v6"
    finally:
        await session.aclose()


async def test_logs_one_record_per_session_start_and_end(
    dtls_server: ServerFactory,
    dtls_client: ClientFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trio_dtls_server")
    server = await dtls_server()
    client = await dtls_client(server)
    assert await exchange(client, b"x") == b"x"
    await client.aclose()
    await wait_for_stats(server, sessions_closed=1)
    messages = [r.getMessage() for r in caplog.records if r.name == "trio_dtls_server"]
    started = [m for m in messages if "established" in m]
    ended = [m for m in messages if "ended: peer sent close_notify" in m]
    assert len(started) == 1 and len(ended) == 1
    assert "certificate 'client'" in started[0]


async def test_handler_that_falls_behind_drops_and_counts(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    release = trio.Event()

    async def slow(session: DTLSSession) -> None:
        await release.wait()
        async for datagram in session:
            await session.send(datagram)

    server = await dtls_server(slow, max_queued_datagrams=4)
    client = await dtls_client(server)
    for i in range(10):
        await client.send(b"%d" % i)
    await wait_for_stats(server, datagrams_dropped=6)
    release.set()
    got = [await client.receive() for _ in range(4)]
    assert got == [b"0", b"1", b"2", b"3"]


async def test_shutdown_aborts_handshakes_in_progress_and_counts_them(
    dtls_pki: TestPKI, dtls_server: ServerFactory
) -> None:
    server = await dtls_server(handshake_timeout=30)
    raw = await RawHandshake.start(server.address, dtls_pki.client_config())
    try:
        await wait_for_stats(server, handshakes_active=1)
        with trio.fail_after(3):
            await server.aclose()
        stats = server.stats()
        assert stats.handshakes_aborted == 1
        assert stats.handshakes_active == 0
    finally:
        raw.close()


async def test_a_handler_that_only_sends_does_not_starve_the_server(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    # send() skips most yields to the scheduler; it must still yield sometimes.
    async def firehose(session: DTLSSession) -> None:
        while True:
            await session.send(b"x" * 10)

    server = await dtls_server(firehose)
    first = await dtls_client(server)
    with trio.fail_after(5):
        assert await first.receive() == b"x" * 10
        other = await dtls_client(server)  # the receive loop still gets its turns
    await wait_for_stats(server, sessions_active=2)
    await other.aclose()
    await first.aclose()


async def test_psk_only_server_refuses_a_client_with_no_credentials(
    dtls_pki: TestPKI, dtls_server: ServerFactory
) -> None:
    # A certificate is loaded, but clients authenticate by PSK only: a client
    # that offers certificate suites and no PSK must not get a session.
    config = DTLSServerConfig(handshake_timeout=1, psk_identities=dict(dtls_pki.psk_identities))
    config.load_cert_chain(dtls_pki.files.server_cert, dtls_pki.files.server_key)
    server = await dtls_server(config=config)
    with pytest.raises(HandshakeError):
        await connect_dtls(
            *server.address, dtls_pki.client_config(certificate=False, handshake_timeout=2)
        )
    psk = await connect_dtls(*server.address, dtls_pki.psk_client_config())
    try:
        assert await exchange(psk, b"psk") == b"psk"
    finally:
        await psk.aclose()
    assert server.stats().handshakes_completed == 1


async def _reconnect_with_ticket(
    server: DTLSServer, config: DTLSClientConfig, payload: bytes
) -> tuple[DTLSSession, DTLSSession]:
    """Connect, exchange ``payload``, close, then connect again offering the ticket."""
    first = await connect_dtls(*server.address, config)
    assert await exchange(first, payload) == payload
    await first.aclose()
    again = await connect_dtls(*server.address, config, session=first.tls_session)
    return first, again


async def test_session_resumption_abbreviates_the_handshake(
    dtls_pki: TestPKI, dtls_server: ServerFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder, config=dtls_pki.server_config(psk=False))
    first, again = await _reconnect_with_ticket(server, dtls_pki.client_config(), b"full")
    try:
        assert first.tls_session is not None and not first.session_reused
        assert again.session_reused
        assert await exchange(again, b"resumed") == b"resumed"
        await wait_until(lambda: len(recorder.sessions) == 2)
        # The resumed session still knows who the client is.
        assert recorder.sessions[1].session_reused
        assert recorder.sessions[1].identity == "client"
    finally:
        await again.aclose()


async def test_server_without_session_tickets_does_a_full_handshake(
    dtls_pki: TestPKI, dtls_server: ServerFactory
) -> None:
    # Certificate-only: with PSK identities the server issues no tickets anyway.
    server = await dtls_server(config=dtls_pki.server_config(psk=False, session_tickets=False))
    _, again = await _reconnect_with_ticket(server, dtls_pki.client_config(), b"x")
    try:
        assert not again.session_reused
        assert await exchange(again, b"full") == b"full"
    finally:
        await again.aclose()


async def test_closing_a_client_wakes_its_blocked_reader(
    dtls_server: ServerFactory, dtls_client: ClientFactory, fault_relay: RelayFactory
) -> None:
    server = await dtls_server()
    relay = await fault_relay(server)
    client = await dtls_client(relay.address)
    relay.set_faults(s2c=Faults(blackhole=True))  # nothing will ever arrive
    outcome: list[BaseException] = []

    async def reader() -> None:
        try:
            await client.receive()
        except BaseException as exc:
            outcome.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(2):
            await client.aclose()
            await wait_until(lambda: bool(outcome))
    assert isinstance(outcome[0], trio.ClosedResourceError)


async def test_peer_closing_while_the_reply_is_on_its_way_is_not_a_handler_error(
    dtls_server: ServerFactory, dtls_client: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    received = trio.Event()
    peer_gone = trio.Event()

    async def slow_echo(session: DTLSSession) -> None:
        async for datagram in session:
            received.set()
            await peer_gone.wait()
            await session.send(datagram)  # raises SessionClosed: the peer left

    server = await dtls_server(slow_echo)
    client = await dtls_client(server)
    await client.send(b"reply to this")
    await received.wait()
    await client.aclose()
    await wait_for_stats(server, sessions_active=0)
    peer_gone.set()
    stats = await wait_for_stats(server, sessions_closed=1)
    assert stats.handler_errors == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_another_sessions_end_escaping_a_handler_is_a_handler_error(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    sessions: list[DTLSSession] = []

    async def relay_to_first(session: DTLSSession) -> None:
        sessions.append(session)
        async for datagram in session:
            await sessions[0].send(datagram)  # the first session may be gone

    server = await dtls_server(relay_to_first)
    first = await dtls_client(server)
    await exchange(first, b"hello")
    second = await dtls_client(server)
    await first.aclose()
    await wait_for_stats(server, sessions_active=1)
    await second.send(b"to a closed session")
    await wait_for_stats(server, handler_errors=1)
    assert server.stats().sessions_closed == 2  # the server itself carries on
    third = await dtls_client(server)
    await third.send(b"x")


async def test_handler_raising_an_exception_group_while_cancelled_does_not_stop_the_server(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    # A handler's nursery cancelled by the grace can raise a group that mixes
    # Cancelled with the handler's own error; it must end only that session.
    async def messy(session: DTLSSession) -> None:
        async def fails_on_cleanup() -> None:
            try:
                await trio.sleep_forever()
            finally:
                raise ValueError("cleanup failed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fails_on_cleanup)
            await session.send(await session.receive())
            await trio.sleep_forever()  # cancelled with the child: Cancelled + ValueError

    server = await dtls_server(messy, idle_timeout=0.3, shutdown_grace=0.2)
    first = await dtls_client(server)
    assert await exchange(first, b"x") == b"x"
    await wait_for_stats(server, sessions_idle_timeout=1, handler_errors=1, sessions_closed=1)
    second = await dtls_client(server)  # the server is still serving
    assert await exchange(second, b"y") == b"y"


async def test_a_handler_that_lingers_after_its_peer_closed_is_cancelled_after_the_grace(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    cancelled = trio.Event()

    async def lingering(session: DTLSSession) -> None:
        async for datagram in session:
            await session.send(datagram)
        try:
            await trio.sleep_forever()  # slow cleanup that never ends
        finally:
            cancelled.set()

    server = await dtls_server(lingering, shutdown_grace=0.3)
    client = await dtls_client(server)
    assert await exchange(client, b"x") == b"x"
    await client.aclose()
    with trio.fail_after(2):
        await cancelled.wait()
    await wait_until(lambda: not server._running)


async def test_psk_sessions_do_not_resume_so_they_always_know_their_identity(
    dtls_pki: TestPKI, dtls_server: ServerFactory
) -> None:
    recorder = Recorder()
    server = await dtls_server(recorder)
    config = dtls_pki.psk_client_config("device-2")
    _, again = await _reconnect_with_ticket(server, config, b"hello")
    try:
        assert not again.session_reused
        assert await exchange(again, b"who") == b"who"
        assert [s.psk_identity for s in recorder.sessions] == ["device-2", "device-2"]
    finally:
        await again.aclose()


async def test_send_takes_any_bytes_like_object_by_its_bytes(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server()
    client = await dtls_client(server)
    words = array.array("I", [0x41424344] * 4)  # 16 bytes in 4 items
    await client.send(memoryview(words))
    with trio.fail_after(5):
        assert await client.receive() == words.tobytes()
    await client.send(bytearray(b"mutable"))
    with trio.fail_after(5):
        assert await client.receive() == b"mutable"


async def test_after_aclose_receive_and_send_raise_closed_resource_error(
    dtls_server: ServerFactory, dtls_client: ClientFactory
) -> None:
    server = await dtls_server()
    client = await dtls_client(server)
    await client.send(b"queued")
    await wait_for_stats(server, datagrams_out=1)
    await trio.sleep(0.05)  # the echo reaches the client's socket
    await client.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await client.receive()  # the queued echo is dropped, not returned
    with pytest.raises(trio.ClosedResourceError):
        await client.send(b"more")
